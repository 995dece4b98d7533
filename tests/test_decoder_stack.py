"""The C++ decoder stack (engine/csrc/decoder_stack.cpp) computes exactly what the Python layers
compute, on both CPU kinds' builds, and is installed only where it can."""
from __future__ import annotations

import random

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams, kernels
from engine.device import cpu_features
from engine.layers.decoder_stack import use_fused_stack

KINDS = ["native", "avx2"]


@pytest.fixture(params=KINDS)
def kind(request, monkeypatch):
    """The whole engine on this CPU's build, or forced onto the AVX2 one."""
    if request.param == "avx2":
        if not cpu_features().has_avx2:
            pytest.skip("this CPU has no AVX2")
        monkeypatch.setattr(kernels, "kernel_kind", lambda: "avx2")
    return request.param


def make_engine(path, **options) -> LLMEngine:
    defaults = dict(num_kv_blocks=128, block_size=4, max_num_batched_tokens=7, max_num_seqs=8)
    return LLMEngine(str(path), EngineConfig(**{**defaults, **options}))


def hidden_both_ways(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 5):
    """Every step run through the stack and again through the Python layers: (stack, python)
    hidden states per step. The second run writes the same K/V to the same slots."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    model, runner, scheduler = engine.runner.model, engine.runner, engine.scheduler
    stack = model.model.fused_layers
    pairs = []
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        with torch.inference_mode():
            ids, positions, meta = runner.prepare_inputs(batch)
            fused = model(ids, positions, meta)
            model.model.fused_layers = None
            try:
                python = model(ids, positions, meta)
            finally:
                model.model.fused_layers = stack
        pairs.append((fused, python))
        scheduler.after_step(batch)
        logits = model.compute_logits(fused)
        for seq, index in batch.samples:
            seq.append_token(int(logits.split(batch.num_new_tokens)[index][-1].argmax()))
            if seq.num_output_tokens == max_tokens:
                scheduler.finish(seq, seq.status.FINISHED_LENGTH)
    return pairs


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])     # GQA; sliding window; q/k/v bias
@pytest.mark.parametrize("quantization, dtype", [("none", "float32"), ("int4", "float32"),
                                                 ("int8", "float32"), ("none", "bfloat16")])
def test_the_stack_equals_the_python_layers_bit_for_bit(kind, family, quantization, dtype, tiny_checkpoints):
    engine = make_engine(tiny_checkpoints[family], quantization=quantization, dtype=dtype)
    assert engine.runner.model.model.fused_layers is not None
    rng = random.Random(1)
    vocab = engine.model_config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (19, 1, 6, 30)]   # chunks and decodes mix
    pairs = hidden_both_ways(engine, prompts)
    assert len(pairs) > 5
    for fused, python in pairs:
        assert fused.dtype == python.dtype and torch.equal(fused, python)


def test_it_is_the_path_a_step_takes(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"])
    calls = []
    stack = engine.runner.model.model.fused_layers
    original = stack.stack
    stack.stack = lambda *args: calls.append(len(args)) or original(*args)
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    assert len(calls) >= 3


def test_gpt2_and_moe_keep_their_python_layers(tiny_checkpoints, tiny_moe_checkpoints):
    for path in (tiny_checkpoints["gpt2"], tiny_moe_checkpoints["mixtral"]):
        engine = make_engine(path)
        assert use_fused_stack(engine.runner.model, engine.runner.cpu_kernels) == 0, path


def test_a_layer_with_hooks_is_refused(tiny_checkpoints):
    """Tensor parallelism all-reduces partial sums in forward hooks: the stack would skip them."""
    engine = make_engine(tiny_checkpoints["llama"])
    model, ops = engine.runner.model, engine.runner.cpu_kernels
    assert use_fused_stack(model, ops) == 2
    handle = model.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out)
    try:
        assert use_fused_stack(model, ops) == 0
    finally:
        handle.remove()


def test_without_kernels_the_reference_layers_run(tiny_checkpoints, monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    engine = make_engine(tiny_checkpoints["llama"])
    assert engine.runner.model.model.fused_layers is None
