"""EngineConfig.quantization: auto / none / int8 / int4, chosen once per engine
(engine/quantization.py), on every CPU kind this machine can pretend to be."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import EngineConfig, LLMEngine, SamplingParams, kernels
from engine.device import CPU_FEATURES_ENV, cpu_features
from engine.layers.attention import build_attn_metadata
from engine.layers.quant_blocks import BlockRows
from engine.layers.quantized_linear import QuantizedLinear
from engine.loader import build_model, open_checkpoint
from engine.quantization import plan_quantization
from service.settings import load_settings
from tests.gguf_writer import write_gguf
from conftest import tiny_hf_model


def last_logits(path, **options) -> tuple[LLMEngine, torch.Tensor]:
    engine = LLMEngine(str(path), EngineConfig(num_kv_blocks=64, block_size=4, **options))
    engine.add_request("r", list(range(3, 40)), SamplingParams(max_tokens=1))
    return engine, engine.runner.execute(engine.scheduler.schedule()).float()[0]


def rounded_weights_logits(path, bits: int) -> torch.Tensor:
    """The float model with each linear weight rounded to its blocks and back (the head to
    Q8_0): what a quantized engine computes, but for its int8 activations."""
    model = build_model(open_checkpoint(path), torch.float32, torch.device("cpu"))
    with torch.no_grad():
        for module in list(model.modules()):
            if isinstance(module, nn.Linear):
                module.weight.copy_(BlockRows.quantize(module.weight, bits).dequantize())
        head = model.lm_head if model.lm_head is not None else model.get_input_embeddings()
        head.weight.copy_(BlockRows.quantize(head.weight, 8).dequantize())
    prompt = list(range(3, 40))
    with torch.inference_mode():
        meta = build_attn_metadata([len(prompt)], [len(prompt)], None, 1)
        return model.compute_logits(model(torch.tensor(prompt), torch.arange(len(prompt)), meta))[-1]


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_a_quantized_engine_computes_with_its_rounded_weights(family, mode, tiny_checkpoints):
    """Every linear layer and the (tied or untied) head run from blocks."""
    path = tiny_checkpoints[family]
    engine, quantized = last_logits(path, quantization=mode)
    assert engine.dtype == torch.float32 and engine.quantization_summary.mode == mode
    layers = [m for m in engine.runner.model.modules() if isinstance(m, (nn.Linear, QuantizedLinear))]
    assert layers and all(isinstance(m, QuantizedLinear) for m in layers)
    assert engine.runner.model.lm_head.format == "Q8_0"
    expected = rounded_weights_logits(path, 8 if mode == "int8" else 4)
    # What is left is the int8 activations' rounding, large on these wide random weights.
    assert F.cosine_similarity(quantized, expected, dim=0) > 0.99
    assert int(quantized.argmax()) == int(expected.argmax())
    if mode == "int8":
        _, fp32 = last_logits(path)
        assert F.cosine_similarity(quantized, fp32, dim=0) > 0.995


def test_int8_runs_with_bfloat16_activations_too(tiny_llama):
    engine, bf16 = last_logits(tiny_llama, quantization="int8", dtype="bfloat16")
    _, fp32 = last_logits(tiny_llama)
    assert engine.dtype == torch.bfloat16
    assert F.cosine_similarity(bf16, fp32, dim=0) > 0.99


def test_int4_generation_runs_batched_with_preemption(tiny_llama):
    engine = LLMEngine(str(tiny_llama), EngineConfig(num_kv_blocks=24, block_size=4, quantization="int4"))
    for i in range(12):
        engine.add_request(f"r{i}", list(range(3, 13 + i)), SamplingParams(max_tokens=20, ignore_eos=True))
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert len(finished) == 12 and all(len(o.outputs[0].token_ids) == 20 for o in finished.values())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_quantized_request_gets_the_same_tokens_alone_or_batched(tiny_llama):
    def tokens(num_others: int) -> list[int]:
        engine = LLMEngine(str(tiny_llama), EngineConfig(num_kv_blocks=64, block_size=4, quantization="int4"))
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        for i in range(num_others):
            engine.add_request(f"other{i}", list(range(5 + i, 30 + 2 * i)), params)
        engine.add_request("r", list(range(3, 20)), params)
        outputs = {}
        while engine.has_unfinished_requests():
            outputs |= {o.request_id: o for o in engine.step() if o.finished}
        return outputs["r"].outputs[0].token_ids
    assert tokens(0) == tokens(5)


def test_auto_quantizes_only_a_block_quantized_gguf_with_kernels(tiny_checkpoints, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    q4 = open_checkpoint(write_gguf(tiny_hf_model("llama"), tmp_path / "q4.gguf", tensor_type="Q4_1"))
    f32 = open_checkpoint(write_gguf(tiny_hf_model("llama"), tmp_path / "f32.gguf"))
    assert plan_quantization("auto", q4, cpu).mode == "gguf"
    assert plan_quantization("auto", f32, cpu).mode == "none"
    assert plan_quantization("auto", open_checkpoint(tiny_checkpoints["llama"]), cpu).mode == "none"
    assert plan_quantization("auto", q4, torch.device("cuda")).mode == "none"
    assert plan_quantization("none", q4, cpu).mode == "none"
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert plan_quantization("auto", q4, cpu).mode == "none"
    with pytest.raises(ValueError, match="C\\+\\+ CPU kernels"):
        plan_quantization("int8", q4, cpu)


def test_an_avx2_cpu_gets_the_avx2_kernels(tiny_llama, monkeypatch):
    if not cpu_features().has_avx2:
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv(CPU_FEATURES_ENV, "avx2,fma")
    engine, avx2 = last_logits(tiny_llama, quantization="int8")
    assert engine.quantization_summary.kernels == "avx2"
    monkeypatch.delenv(CPU_FEATURES_ENV)
    engine, native = last_logits(tiny_llama, quantization="int8")
    assert engine.quantization_summary.kernels == kernels.kernel_kind()
    assert torch.allclose(avx2, native, rtol=1e-4, atol=1e-4)


def test_quantization_is_refused_where_it_cannot_run(tiny_llama):
    checkpoint = open_checkpoint(tiny_llama)
    with pytest.raises(ValueError, match="CPU"):
        plan_quantization("int8", checkpoint, torch.device("cuda"))
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int3")
    assert EngineConfig().quantization == "auto"
    assert EngineConfig(quantization=None).quantization == "none"
    assert load_settings(["--quantization", "int4"]).engine_config().quantization == "int4"
    assert load_settings(["--quantization", "none"]).engine_config().quantization == "none"
    assert load_settings([]).engine_config().quantization == "auto"


@pytest.mark.slow
def test_int8_and_int4_perplexity_on_the_bundled_text_is_within_2_percent_of_fp32():
    from benchmarks.perplexity import MAX_INCREASE, compare
    result = compare("smollm2-135m-instruct", window=256, modes=("none", "int8", "int4"))
    print(result)
    for mode in ("int8", "int4"):
        assert abs(result["modes"][mode]["increase"]) <= MAX_INCREASE[mode], mode
