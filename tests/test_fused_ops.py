"""The fused CPU ops (engine/csrc/fused_ops.cpp) against the PyTorch modules they replace, on
this CPU's build and on the AVX2 build, and in the engine."""
from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams, kernels, model_runner
from engine.device import cpu_features
from engine.layers.activations import SiluAndMul
from engine.layers.fused import FusedApplyRotary, FusedRMSNorm, FusedSiluAndMul, use_fused_ops
from engine.layers.norm import RMSNorm
from engine.layers.rotary import ApplyRotary, RotaryEmbedding

KINDS = ["native", "avx2"]


@pytest.fixture(params=KINDS)
def ops(request):
    if request.param == "avx2" and not cpu_features().has_avx2:
        pytest.skip("this CPU has no AVX2")
    module = kernels.load() if request.param == "native" else kernels.load("avx2")
    assert module is not None
    return module


def tolerance(dtype):
    return {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, dim", [(1, 576), (7, 64), (33, 130)])
def test_rms_norm_equals_the_reference(ops, dtype, rows, dim):
    torch.manual_seed(rows)
    norm = RMSNorm(dim, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    wide = torch.randn(rows, dim + 9).to(dtype)                   # a strided view, as q out of qkv
    x = wide[:, 3: 3 + dim]
    torch.testing.assert_close(FusedRMSNorm(norm, ops)(x), norm(x), **tolerance(dtype))
    batch = torch.randn(2, rows, dim).to(dtype)                   # any leading shape
    torch.testing.assert_close(FusedRMSNorm(norm, ops)(batch), norm(batch), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, q_heads, kv_heads, head_dim", [(1, 9, 3, 64), (5, 4, 2, 32), (17, 2, 1, 8)])
def test_rotary_equals_the_reference(ops, dtype, tokens, q_heads, kv_heads, head_dim):
    torch.manual_seed(tokens)
    cos, sin = RotaryEmbedding(head_dim, 10000.0)(torch.randint(0, 4000, (tokens,)), dtype)
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim).to(dtype)
    q, k, _ = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    expected_q, expected_k = ApplyRotary(head_dim)(q, k, cos, sin)
    got_q, got_k = FusedApplyRotary(head_dim, ops)(q, k, cos, sin)
    torch.testing.assert_close(got_q, expected_q, **tolerance(dtype))
    torch.testing.assert_close(got_k, expected_k, **tolerance(dtype))
    assert got_q.data_ptr() == q.data_ptr()                        # in place, in the qkv output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, size", [(1, 1536), (9, 40)])
def test_silu_mul_equals_the_reference(ops, dtype, rows, size):
    gate_up = (torch.randn(rows, 2 * size) * 4).to(dtype)
    torch.testing.assert_close(FusedSiluAndMul(ops)(gate_up), SiluAndMul()(gate_up), **tolerance(dtype))


def test_rows_never_depend_on_their_batch(ops):
    norm = RMSNorm(64, 1e-6)
    x = torch.randn(40, 64)
    fused = FusedRMSNorm(norm, ops)
    assert torch.equal(fused(x)[7:8], fused(x[7:8]))


def test_the_engine_swaps_them_in_and_keeps_its_greedy_tokens(tiny_checkpoints, monkeypatch):
    def greedy(path) -> tuple[list[list[int]], LLMEngine]:
        engine = LLMEngine(str(path), EngineConfig(num_kv_blocks=64, block_size=4))
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        for i, prompt in enumerate([[5, 6, 7], list(range(3, 40)), [9] * 11]):
            engine.add_request(str(i), prompt, params)
        done = {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
        return [done[str(i)] for i in range(3)], engine

    for family in ("llama", "qwen2", "mistral"):
        fused, engine = greedy(tiny_checkpoints[family])
        kinds = {type(m) for m in engine.runner.model.modules()}
        assert {FusedRMSNorm, FusedApplyRotary, FusedSiluAndMul} <= kinds
        with monkeypatch.context() as patch:
            patch.setattr(model_runner, "use_fused_ops", lambda model, ops: 0)
            reference, _ = greedy(tiny_checkpoints[family])
        assert fused == reference, family


def test_use_fused_ops_counts_what_it_swapped(ops, tiny_checkpoints):
    engine = LLMEngine(str(tiny_checkpoints["llama"]), EngineConfig(num_kv_blocks=16, block_size=4))
    assert use_fused_ops(engine.runner.model, ops) == 0              # done once already


def test_argmax_logsumexp_equals_the_reference(ops):
    from engine.sampling import row_stats
    torch.manual_seed(0)
    logits = torch.randn(9, 49152 + 5) * 5
    logits[2, 100] = logits[2, 7] = 50.0                             # a tie: the first wins
    logits[3, :1000] = float("-inf")                                 # masked tokens are fine
    ids, lse = ops.argmax_logsumexp(logits)
    expected_ids, expected_lse = row_stats(logits)
    assert torch.equal(ids, expected_ids) and ids[2] == 7
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-6)
    for bad in (float("nan"), float("inf")):
        broken = logits.clone()
        broken[4, 12345] = bad
        assert torch.isnan(ops.argmax_logsumexp(broken)[1][4]) and torch.isfinite(ops.argmax_logsumexp(broken)[1][3])
    short = torch.randn(3, 5)                                         # a row shorter than a vector
    torch.testing.assert_close(ops.argmax_logsumexp(short)[1], row_stats(short)[1])
