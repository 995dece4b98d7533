"""Decode steps replayed from CUDA graphs produce the tokens eager steps produce (device only)."""
import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_graph_decode_equals_eager_decode(tiny_checkpoints):
    prompts = [[5, 17, 42, 8], [99, 3], list(range(10, 50)), [7] * 17, [200, 201, 202]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = {}
    for eager in (True, False):
        llm = LLM(str(tiny_checkpoints["llama"]), device="cuda", dtype="float32", num_kv_blocks=256,
                  block_size=16, max_num_seqs=8, enforce_eager=eager)
        assert (llm.engine.runner.graphs is None) == eager
        outputs[eager] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outputs[True] == outputs[False]
