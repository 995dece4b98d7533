"""quantization="int8": int8 weights (one scale per output row), bf16 activations, on the CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.device import cpu_features
from engine.layers.linear import MergedLinear
from engine.quantization import INT8_KERNEL_MAX_ROWS, Int8Linear, quantize_int8
from service.settings import load_settings

needs_bf16 = pytest.mark.skipif(not cpu_features().has_native_bf16, reason="this CPU has no native bf16")


@pytest.mark.parametrize("num_rows", [1, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1, 40])
def test_int8_linear_computes_with_its_quantized_weights_on_either_path(num_rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=True)
    quantized = Int8Linear.from_linear(linear)
    scales = linear.weight.abs().amax(dim=1) / 127
    assert (quantized.qweight.float() - linear.weight / scales[:, None]).abs().max() <= 0.5 + 1e-4
    x = torch.randn(num_rows, 96)
    out = quantized(x.bfloat16()).float()
    dequantized = quantized.qweight.float() * scales[:, None]
    expected = F.linear(x, dequantized, linear.bias)
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()       # bf16 rounding
    exact = linear(x)
    assert F.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.999


def test_a_merged_projection_still_splits_into_its_parts():
    merged = MergedLinear(32, {"q_proj": 16, "k_proj": 8, "v_proj": 8}, bias=False)
    quantized = Int8Linear.from_linear(merged)
    q, k, v = quantized.split(quantized(torch.randn(3, 32, dtype=torch.bfloat16)))
    assert (q.shape, k.shape, v.shape) == ((3, 16), (3, 8), (3, 8))


@needs_bf16
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_an_int8_engine_predicts_what_the_fp32_engine_does(family, tiny_checkpoints):
    """Every linear layer and the (tied or untied) head become int8; logits barely move."""
    def last_logits(**options):
        engine = LLMEngine(str(tiny_checkpoints[family]), EngineConfig(num_kv_blocks=64, block_size=4, **options))
        engine.add_request("r", list(range(3, 40)), SamplingParams(max_tokens=1))
        return engine, engine.runner.execute(engine.scheduler.schedule()).float()[0]

    engine, int8 = last_logits(quantization="int8")
    _, fp32 = last_logits()
    assert engine.dtype == torch.bfloat16
    layers = [m for m in engine.runner.model.modules() if isinstance(m, (nn.Linear, Int8Linear))]
    assert layers and all(isinstance(m, Int8Linear) for m in layers)
    assert isinstance(engine.runner.model.lm_head, Int8Linear)
    assert F.cosine_similarity(int8, fp32, dim=0) > 0.995
    assert int(int8.argmax()) == int(fp32.argmax())


@needs_bf16
def test_int8_generation_runs_batched_with_preemption(tiny_llama):
    engine = LLMEngine(str(tiny_llama), EngineConfig(num_kv_blocks=24, block_size=4, quantization="int8"))
    for i in range(12):
        engine.add_request(f"r{i}", list(range(3, 13 + i)), SamplingParams(max_tokens=20, ignore_eos=True))
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert len(finished) == 12 and all(len(o.outputs[0].token_ids) == 20 for o in finished.values())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_int8_is_refused_where_it_cannot_be_fast(tiny_llama):
    with pytest.raises(ValueError, match="bfloat16"):
        quantize_int8(nn.Linear(4, 4), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="CPU"):
        quantize_int8(nn.Linear(4, 4), torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4")
    assert load_settings(["--quantization", "int8"]).engine_config().quantization == "int8"
    assert load_settings(["--quantization", "none"]).quantization is None


@pytest.mark.slow
@needs_bf16
def test_int8_perplexity_on_the_bundled_text_is_within_2_percent_of_fp32():
    from benchmarks.perplexity import MAX_INCREASE, compare
    result = compare("smollm2-135m-instruct", window=256)
    print(result)
    assert 0 < result["increase"] <= MAX_INCREASE
