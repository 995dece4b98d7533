"""Mixture-of-Experts decoders (Mixtral, Qwen2-MoE, OLMoE) against transformers.

The grouped experts against their dense reference; logits from every checkpoint layout
(per-expert tensors, transformers 5's fused pair, .bin) within 1e-4 of transformers; the
paged, chunked, prefix-cached engine; 32 greedy tokens equal to transformers' generate(), alone
and batched with requests of other lengths under a KV budget small enough to force preemption;
GGUF files as llama.cpp writes them; the loader's refusals. The variants (conftest.MOE_VARIANTS)
cover top-1 and top-2, with and without renormalization, and a shared expert.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import MOE_VARIANTS, save_tiny_checkpoint, tiny_hf_model
from safetensors.torch import load_file, save_file
from test_engine import make_engine, prompts_with_shared_prefix, run_with_random_arrivals
from test_models import our_logits, reference_logits

from engine import SamplingParams
from engine.config import ModelConfig
from engine.gguf_file import hf_config_from_gguf, iter_gguf_tensors, read_metadata
from engine.layers.moe import GroupedExperts, TopKRouter, grouped_matmul, grouped_matmul_loop
from engine.llm_engine import LLM
from engine.loader import CheckpointError, build_model, open_checkpoint
from tests.gguf_writer import write_gguf

VARIANTS = list(MOE_VARIANTS)


# -- the layer: grouped experts against the dense reference ----------------------------------

def random_experts(num_experts: int, hidden: int, intermediate: int, seed: int = 0) -> GroupedExperts:
    torch.manual_seed(seed)
    experts = GroupedExperts(num_experts, hidden, intermediate, F.silu)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.2)
        experts.down_proj.normal_(std=0.2)
    return experts


@pytest.mark.parametrize("num_tokens, num_experts, top_k, hidden, intermediate", [
    (1, 8, 2, 64, 32),          # one token: six of eight experts idle
    (37, 8, 2, 64, 32),
    (50, 4, 1, 64, 32),
    (23, 6, 3, 24, 40),
    (19, 5, 2, 20, 12),         # widths grouped_mm cannot take: the per-expert loop
])
def test_grouped_experts_equal_the_dense_reference(num_tokens, num_experts, top_k, hidden, intermediate):
    experts = random_experts(num_experts, hidden, intermediate)
    aligned = hidden % 8 == 0 and intermediate % 8 == 0
    assert experts.matmul is (grouped_matmul if aligned else grouped_matmul_loop)
    router = TopKRouter(hidden, num_experts, top_k, renormalize=False)
    with torch.no_grad():
        router.weight.normal_()
    x = torch.randn(num_tokens, hidden)
    weights, expert_ids = router(x)
    with torch.inference_mode():
        grouped = experts(x, expert_ids, weights)
        dense = experts.forward_dense(x, expert_ids, weights)
    assert grouped.shape == (num_tokens, hidden)
    assert (grouped - dense).abs().max() < 1e-5


def test_grouped_experts_in_bfloat16_stay_close_to_float32():
    experts = random_experts(8, 64, 32)
    x = torch.randn(40, 64)
    weights, expert_ids = torch.rand(40, 8).topk(2, dim=-1)          # two distinct experts a token
    with torch.inference_mode():
        exact = experts.forward_dense(x, expert_ids, weights)
        low = experts.to(torch.bfloat16)(x.bfloat16(), expert_ids, weights.bfloat16()).float()
    assert (low - exact).abs().max() < 0.05 * exact.abs().max()


def test_one_grouped_matmul_per_projection_whatever_the_batch(monkeypatch):
    """Grouped by expert: the step's tokens go through two grouped GEMMs, never a loop over them."""
    experts = random_experts(8, 64, 32)
    calls = []
    real = F.grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(F, "grouped_mm", counting)
    for num_tokens in (1, 64):
        calls.clear()
        with torch.inference_mode():
            experts(torch.randn(num_tokens, 64), torch.randint(0, 8, (num_tokens, 2)), torch.rand(num_tokens, 2))
        assert calls == [2 * num_tokens, 2 * num_tokens]        # gate_up, then down: all rows at once


@pytest.mark.parametrize("renormalize", [False, True])
def test_router_keeps_the_top_k_softmax_weights(renormalize):
    router = TopKRouter(16, 6, 2, renormalize)
    with torch.no_grad():
        router.weight.normal_()
    x = torch.randn(9, 16)
    weights, expert_ids = router(x)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    expected, expected_ids = probs.topk(2, dim=-1)
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
        assert torch.allclose(weights.sum(-1), torch.ones(9))
    assert torch.equal(expert_ids, expected_ids)
    assert torch.allclose(weights, expected, atol=1e-6)


# -- against transformers ------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["per-expert", "fused", "bin"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_on_a_padded_batch(variant, layout, tmp_path):
    model = tiny_hf_model(variant)
    # transformers 5 writes one tensor per expert (Mixtral's block_sparse_moe/w1..w3 names
    # included) unless asked for its own fused gate_up_proj / down_proj.
    model.save_pretrained(tmp_path, save_original_format=layout != "fused")
    tensors = load_file(tmp_path / "model.safetensors")
    assert any(".experts.gate_up_proj" in n for n in tensors) == (layout == "fused")
    if layout == "bin":                    # transformers 5 writes safetensors only: convert
        torch.save(tensors, tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    assert (our_logits(tmp_path) - reference_logits(model)).abs().max() < 1e-4


def test_experts_spread_over_shards_are_stacked_whole(tmp_path):
    model = tiny_hf_model("qwen2_moe_top1")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    layer0 = {weight_map[n] for n in weight_map if n.startswith("model.layers.0.mlp.experts.")}
    assert len(layer0) > 1                                  # one layer's experts in several files
    assert (our_logits(tmp_path) - reference_logits(model)).abs().max() < 1e-4


def test_config_fields_of_each_family():
    configs = {v: ModelConfig.from_hf(tiny_hf_model(v).config.to_dict()) for v in VARIANTS}
    mixtral, qwen, qwen1, olmoe, olmoe1 = (configs[v] for v in ("mixtral", "qwen2_moe", "qwen2_moe_top1",
                                                                "olmoe", "olmoe_top1"))
    assert (mixtral.family, mixtral.num_experts, mixtral.num_experts_per_tok) == ("moe", 4, 2)
    assert mixtral.norm_topk_prob and mixtral.sliding_window == 12 and mixtral.moe_intermediate_size == 128
    assert qwen.shared_expert_intermediate_size == 96 and qwen.moe_intermediate_size == 32
    assert qwen.dense_layers == (1,) and qwen.qkv_bias and not qwen.o_bias and not qwen.norm_topk_prob
    assert qwen1.norm_topk_prob and qwen1.num_experts_per_tok == 1 and qwen1.dense_layers == ()
    assert olmoe.qk_norm and olmoe.clip_qkv is None and olmoe.num_experts == 8 and not olmoe.qkv_bias
    assert olmoe1.clip_qkv == 1.5
    sparse_step = ModelConfig.from_hf({**tiny_hf_model("qwen2_moe").config.to_dict(), "mlp_only_layers": [],
                                       "decoder_sparse_step": 2})
    assert sparse_step.dense_layers == (0,)                       # layer i routed when (i + 1) % step == 0
    with pytest.raises(ValueError, match=r"num_experts_per_tok must be in \[1, num_experts 4\], got 5"):
        ModelConfig.from_hf({**tiny_hf_model("mixtral").config.to_dict(), "num_experts_per_tok": 5})


# -- the engine: paged KV, chunked prefill, prefix cache, batching, preemption -------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_paged_chunked_prefix_cached_logits_equal_a_full_forward(variant, tiny_moe_checkpoints):
    engine = make_engine(tiny_moe_checkpoints[variant], max_num_batched_tokens=7)   # chunks split blocks
    prompts = prompts_with_shared_prefix(random.Random(0), engine.model_config.vocab_size)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    seqs = [engine.requests[f"r{i}"].seqs[0] for i in range(len(prompts))]
    logits_by_seq = {seq.seq_id: [] for seq in seqs}
    runner, scheduler = engine.runner, engine.scheduler
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        with torch.inference_mode():
            ids, positions, meta = runner.prepare_inputs(batch)
            logits = runner.model.compute_logits(runner.model(ids, positions, meta))
        chunks = logits.split(batch.num_new_tokens)
        for seq, chunk in zip(batch.seqs, chunks):
            logits_by_seq[seq.seq_id].append(chunk)
        scheduler.after_step(batch)
        for seq, index in batch.samples:
            seq.append_token(int(chunks[index][-1].argmax()))
            if seq.num_output_tokens == 6:
                scheduler.finish(seq, seq.status.FINISHED_LENGTH)
    assert any(seq.num_cached_tokens for seq in seqs)                # the prefix cache was used
    reference = tiny_hf_model(variant)
    for seq in seqs:
        with torch.no_grad():
            expected = reference(torch.tensor([seq.token_ids[:-1]])).logits[0][seq.num_cached_tokens:]
        ours = torch.cat(logits_by_seq[seq.seq_id])
        assert ours.shape == expected.shape
        assert (ours - expected).abs().max() < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_32_greedy_tokens_equal_transformers_alone_and_batched_under_preemption(variant, tiny_moe_checkpoints):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 380) for _ in range(n)] for n in (1, 6, 13, 22, 9, 30)]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    reference = tiny_hf_model(variant)
    expected = {}
    for i, prompt in enumerate(prompts):
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        expected[f"r{i}"] = out[0, len(prompt):].tolist()
    alone = LLM(str(tiny_moe_checkpoints[variant]), num_kv_blocks=64, block_size=4)
    for i, prompt in enumerate(prompts):
        assert alone.generate([prompt], params)[0].token_ids == expected[f"r{i}"], f"r{i} alone"
    # 24 blocks of 4 tokens hold the longest sequence (62 tokens) and a little more: preemption.
    engine = make_engine(tiny_moe_checkpoints[variant], num_kv_blocks=24, max_num_batched_tokens=24)
    batched = run_with_random_arrivals(engine, {f"r{i}": (p, params) for i, p in enumerate(prompts)}, seed=2)
    assert engine.scheduler.num_preemptions > 0
    assert batched == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# -- GGUF ------------------------------------------------------------------------------------------

# GGUF has no sliding window for "llama" (Mixtral) and no dense layers for qwen2moe: those
# variants are written without them, as llama.cpp could hold them.
GGUF_VARIANTS = {"mixtral": dict(sliding_window=None), "qwen2_moe": dict(mlp_only_layers=[]),
                 "qwen2_moe_top1": {}, "olmoe": {}}


@pytest.mark.parametrize("variant", sorted(GGUF_VARIANTS))
def test_f32_gguf_loads_to_the_logits_of_its_safetensors_twin(variant, tmp_path):
    model = tiny_hf_model(variant, **GGUF_VARIANTS[variant])
    twin = save_tiny_checkpoint(variant, tmp_path / "twin", **GGUF_VARIANTS[variant])
    path = write_gguf(model, tmp_path / f"{variant}.gguf")
    names = read_metadata(path)["GGUF.tensor_names"]
    assert "blk.0.ffn_gate_exps.weight" in names and "blk.0.ffn_gate_inp.weight" in names
    expected = ModelConfig.from_hf(model.config.to_dict())
    got = ModelConfig.from_hf(hf_config_from_gguf(read_metadata(path)))
    for field in ("model_type", "architecture", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "norm_topk_prob", "shared_expert_intermediate_size", "dense_layers", "qk_norm", "qkv_bias",
                  "o_bias", "sliding_window", "head_dim", "num_kv_heads", "intermediate_size"):
        assert getattr(got, field) == getattr(expected, field), field
    assert (our_logits(path) - our_logits(twin)).abs().max() < 1e-5
    assert (our_logits(path) - reference_logits(model)).abs().max() < 1e-4


def test_gguf_routing_keys_and_their_defaults(tmp_path):
    """llama.cpp renormalizes Mixtral's top-k and not qwen2moe's or olmoe's unless the file's
    expert_weights_norm says so; olmoe's clamp_kqv is clip_qkv."""
    def config_of(variant, **metadata):
        path = tmp_path / f"{variant}.gguf"
        if not path.exists():
            write_gguf(tiny_hf_model(variant, **GGUF_VARIANTS.get(variant, {})), path)
        return hf_config_from_gguf({**read_metadata(path), **metadata})
    assert config_of("mixtral")["model_type"] == "mixtral"
    assert ModelConfig.from_hf(config_of("mixtral")).norm_topk_prob
    assert not config_of("qwen2_moe")["norm_topk_prob"]
    assert config_of("qwen2_moe", **{"qwen2moe.expert_weights_norm": True})["norm_topk_prob"]
    assert config_of("olmoe")["clip_qkv"] is None
    assert ModelConfig.from_hf(config_of("olmoe", **{"olmoe.attention.clamp_kqv": 1.5})).clip_qkv == 1.5


@pytest.mark.parametrize("tensor_type", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "olmoe"])
def test_quantized_gguf_matches_transformers_on_the_dequantized_weights(variant, tensor_type, tmp_path):
    """The twin of a quantized file is the original model holding the file's dequantized values."""
    model = tiny_hf_model(variant, **GGUF_VARIANTS[variant])
    path = write_gguf(model, tmp_path / f"{variant}.gguf", tensor_type=tensor_type)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in transformers_names(dict(iter_gguf_tensors(path))).items():
            state[name].copy_(tensor.reshape(state[name].shape))
    assert (our_logits(path) - reference_logits(model)).abs().max() < 1e-4


def transformers_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GGUF tensors under their HF names -> transformers 5's state-dict names (experts fused)."""
    renames = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    out, stacked = {}, {}
    for name, tensor in tensors.items():
        head, found, tail = name.replace(".block_sparse_moe.", ".mlp.").partition(".mlp.experts.")
        if not found:
            out[head] = tensor
            continue
        assert tensor.dim() == 3                                # (num_experts, out, in)
        projection = tail.removesuffix(".weight")
        stacked[head, renames.get(projection, projection)] = tensor
    for (head, projection), tensor in stacked.items():
        if projection == "gate_proj":
            out[f"{head}.mlp.experts.gate_up_proj"] = torch.cat([tensor, stacked[head, "up_proj"]], dim=1)
        elif projection == "down_proj":
            out[f"{head}.mlp.experts.down_proj"] = tensor
    return out


# -- refusals --------------------------------------------------------------------------------------

def test_a_missing_expert_is_named(tmp_path):
    path = save_tiny_checkpoint("qwen2_moe_top1", tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks tensors for model\.layers\.1\.mlp\.experts\.gate_up_proj:up_proj:2"):
        build_model(open_checkpoint(path), torch.float32, torch.device("cpu"))


def test_a_misshapen_or_extra_expert_names_the_tensor(tmp_path):
    path = save_tiny_checkpoint("mixtral", tmp_path / "m")
    original = load_file(path / "model.safetensors")
    tensors = {**original, "model.layers.0.block_sparse_moe.experts.1.w2.weight": torch.zeros(64, 100)}
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"block_sparse_moe\.experts\.1\.w2\.weight.*\(64, 100\).*\(64, 128\)"):
        build_model(open_checkpoint(path), torch.float32, torch.device("cpu"))
    tensors = {**original, "model.layers.0.block_sparse_moe.experts.4.w1.weight": torch.zeros(128, 64)}
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.4\.w1\.weight.*expert 4 does not exist \(the model has 4\)"):
        build_model(open_checkpoint(path), torch.float32, torch.device("cpu"))


def test_unsupported_moe_settings_are_refused(tmp_path):
    path = save_tiny_checkpoint("qwen2_moe", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 8}))
    with pytest.raises(CheckpointError, match=r"qwen2_moe with use_sliding_window=true is not supported"):
        open_checkpoint(path)
