"""T5 (v1.0) and T5 v1.1 / Flan-T5 against transformers, and the engine serving them.

Logits within 1e-4 of transformers (fp32) from safetensors and .bin, every variant of
conftest.T5_VARIANTS (both FFN kinds, tied and untied heads, two bucket settings); the paged,
chunked engine step by step; 32 greedy tokens equal to transformers' generate(), alone and
batched with requests of other lengths under a KV budget small enough to force preemption;
cross blocks freed with their sequence; the config and head rules; the limits.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import T5_VARIANTS, make_scheduler, save_tiny_t5_checkpoint, tiny_t5_model
from safetensors.torch import load_file, save_file
from test_engine import make_engine, run_with_random_arrivals

from engine import SamplingParams, kernels
from engine.config import ModelConfig, UnsupportedModelError
from engine.errors import PromptTooLongError
from engine.layers.attention import Attention, TorchAttention, build_attn_metadata, build_cross_attn_metadata
from engine.layers.fused import FusedRMSNorm
from engine.layers.norm import RMSNorm
from engine.llm_engine import LLM
from engine.loader import CheckpointError, build_model, open_checkpoint
from engine.kv_cache import BlockManager
from engine.seq2seq import Seq2SeqMetadata
from engine.sequence import Sequence, SequenceStatus

VARIANTS = list(T5_VARIANTS)
# Encoder inputs and decoder inputs of different lengths; the longest pass 20 (the small
# buckets' max_distance) and 16 (the default buckets' first logarithmic one).
ENCODER_INPUTS = [[5, 9, 200, 31, 7, 1], [42, 1], [3 + (i * 37) % 300 for i in range(40)] + [1],
                  [11, 12, 13, 14, 15, 16, 17, 1]]
DECODER_INPUTS = [[0, 4, 8, 15, 16, 23, 42], [0], [0] + [7 + (i * 11) % 290 for i in range(30)], [0, 9, 9]]


def our_logits(path, encoder_inputs=ENCODER_INPUTS, decoder_inputs=DECODER_INPUTS) -> torch.Tensor:
    """Our model over a one-step batch: every encoder input encoded into its cross blocks and
    every decoder input run whole against a small paged cache."""
    checkpoint = open_checkpoint(path)
    config = checkpoint.config
    model = build_model(checkpoint, torch.float32, torch.device("cpu"))
    block_size, num_blocks = 4, 64
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    pool = torch.zeros(2, len(layers), config.num_heads, num_blocks, block_size, config.head_dim)
    for i, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = pool[0, i], pool[1, i]
    blocks = iter(range(num_blocks))
    tables = [[next(blocks) for _ in range(-(-len(d) // block_size))] for d in decoder_inputs]
    cross = [[next(blocks) for _ in range(-(-len(e) // block_size))] for e in encoder_inputs]
    dec_lens, enc_lens = [len(d) for d in decoder_inputs], [len(e) for e in encoder_inputs]
    slots = [cross[i][p // block_size] * block_size + p % block_size
             for i, e in enumerate(encoder_inputs) for p in range(len(e))]
    meta = Seq2SeqMetadata(
        build_attn_metadata(dec_lens, dec_lens, tables, block_size),
        build_cross_attn_metadata(dec_lens, enc_lens, cross, block_size),
        build_attn_metadata(enc_lens, enc_lens, None, 1, causal=False),
        torch.tensor([t for e in encoder_inputs for t in e]), torch.tensor(slots))
    with torch.inference_mode():
        ids = torch.tensor([t for d in decoder_inputs for t in d])
        return model.compute_logits(model(ids, None, meta))           # (sum of decoder lengths, vocab)


def reference_logits(hf_model, encoder_inputs=ENCODER_INPUTS, decoder_inputs=DECODER_INPUTS) -> torch.Tensor:
    """transformers on one right-padded batch, encoder padding masked; padded rows dropped."""
    def padded(rows):
        longest = max(len(r) for r in rows)
        return (torch.tensor([r + [0] * (longest - len(r)) for r in rows]),
                torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows]))
    ids, mask = padded(encoder_inputs)
    decoder_ids, _ = padded(decoder_inputs)
    with torch.no_grad():
        logits = hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    return torch.cat([logits[i, : len(d)] for i, d in enumerate(decoder_inputs)])


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int = 32) -> list[int]:
    # transformers 5 sizes generate()'s cache by the encoder's depth: with a deeper decoder
    # (t5_buckets8) it fails, so that one recomputes every step instead.
    symmetric = hf_model.config.num_decoder_layers == hf_model.config.num_layers
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=symmetric)
    return out[0, 1:].tolist()                                          # after the decoder start token


# -- the model against transformers -----------------------------------------------------------

@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_on_a_padded_batch(variant, safe, tmp_path):
    path = save_tiny_t5_checkpoint(variant, tmp_path / variant, safe_serialization=safe)
    config = open_checkpoint(path).config
    assert config.tie_word_embeddings == (variant in ("t5", "t5_buckets8", "t5_gated_tied"))
    diff = (our_logits(path) - reference_logits(tiny_t5_model(variant))).abs().max()
    assert diff < 1e-4


def test_transformers_4_configs_read_the_same(tmp_path):
    """A v1.1 config as transformers 4 wrote it (Flan-T5's: tie_word_embeddings false, no
    scale_decoder_outputs) and v1.0's (neither key) mean what transformers 5 reads them as."""
    path = save_tiny_t5_checkpoint("flan_t5", tmp_path / "v11")
    hf = json.loads((path / "config.json").read_text())
    for key in ("scale_decoder_outputs", "dense_act_fn", "is_gated_act"):
        hf.pop(key, None)
    (path / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": False}))
    config = open_checkpoint(path).config
    assert not config.tie_word_embeddings and not config.scale_decoder_outputs and config.gated_mlp
    assert config.hidden_act == "gelu_new"
    assert (our_logits(path) - reference_logits(tiny_t5_model("flan_t5"))).abs().max() < 1e-4
    v10 = ModelConfig.from_hf({k: v for k, v in tiny_t5_model("t5").config.to_dict().items()
                               if k not in ("scale_decoder_outputs", "tie_word_embeddings")})
    assert v10.tie_word_embeddings and v10.scale_decoder_outputs and v10.hidden_act == "relu"


def test_config_fields_and_refusals():
    config = ModelConfig.from_hf(tiny_t5_model("t5_buckets8").config.to_dict())
    assert (config.family, config.is_encoder_decoder, config.decoder_start_token_id) == ("t5", True, 0)
    assert (config.num_layers, config.num_encoder_layers, config.num_heads, config.head_dim) == (3, 2, 4, 16)
    assert (config.relative_attention_num_buckets, config.relative_attention_max_distance) == (8, 20)
    assert config.max_position_embeddings == 512 and config.eos_token_ids == (1,)
    hf = tiny_t5_model("t5").config.to_dict()
    with pytest.raises(UnsupportedModelError, match=r"T5EncoderModel.*supported: T5ForConditionalGeneration"):
        ModelConfig.from_hf({**hf, "architectures": ["T5EncoderModel"]})
    with pytest.raises(UnsupportedModelError, match=r"feed_forward_proj 'gelu-gated'"):
        ModelConfig.from_hf({**hf, "feed_forward_proj": "gelu-gated"})
    with pytest.raises(ValueError, match=r"relative_attention_max_distance above half"):
        ModelConfig.from_hf({**hf, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 16})


def test_missing_cross_attention_weight_is_named(tmp_path):
    path = save_tiny_t5_checkpoint("flan_t5", tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["decoder.block.1.layer.1.EncDecAttention.v.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"decoder\.block\.1\.layer\.1\.EncDecAttention\.kv_proj\.weight:v_proj"):
        build_model(open_checkpoint(path), torch.float32, torch.device("cpu"))


# -- the engine: paged decoder, cross blocks, batching, preemption ----------------------------

@pytest.mark.parametrize("variant", ["t5_buckets8", "flan_t5"])
def test_engine_steps_compute_what_a_full_forward_computes(variant, tiny_t5_checkpoints):
    """Every step's logits, batched with other requests, equal transformers' over the same
    encoder input and decoder tokens (a preempted sequence's recompute included)."""
    engine = make_engine(tiny_t5_checkpoints[variant], num_kv_blocks=22, max_num_batched_tokens=16)
    assert isinstance(engine.runner.backend, TorchAttention)          # the op takes no position bias
    if kernels.load() is not None:                                     # but the norms run fused
        norms = [m for m in engine.runner.model.modules() if isinstance(m, (RMSNorm, FusedRMSNorm))]
        assert norms and all(isinstance(m, FusedRMSNorm) for m in norms)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] + [1] for n in (5, 30, 1, 17)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    seqs = [engine.requests[f"r{i}"].seqs[0] for i in range(len(prompts))]
    rows = {seq.seq_id: {} for seq in seqs}                            # decoder position -> logits
    runner, scheduler = engine.runner, engine.scheduler
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        with torch.inference_mode():
            ids, positions, meta = runner.prepare_inputs(batch)
            logits = runner.model.compute_logits(runner.model(ids, positions, meta))
        chunks = logits.split(batch.num_new_tokens)
        for seq, chunk in zip(batch.seqs, chunks):
            for j, row in enumerate(chunk):
                rows[seq.seq_id][seq.num_computed_tokens + j] = row
        scheduler.after_step(batch)
        for seq, index in batch.samples:
            seq.append_token(int(chunks[index][-1].argmax()))
            if seq.num_output_tokens == 12:
                scheduler.finish(seq, seq.status.FINISHED_LENGTH)
    assert scheduler.num_preemptions > 0
    reference = tiny_t5_model(variant)
    for seq, prompt in zip(seqs, prompts):
        expected = reference_logits(reference, [prompt], [seq.token_ids[:-1]])
        ours = torch.stack([rows[seq.seq_id][p] for p in range(len(seq.token_ids) - 1)])
        assert (ours - expected).abs().max() < 1e-4
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("variant", VARIANTS)
def test_32_greedy_tokens_equal_transformers_alone_and_batched_under_preemption(variant, tiny_t5_checkpoints):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] + [1] for n in (0, 6, 13, 22, 9, 30)]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    reference = tiny_t5_model(variant)
    expected = {f"r{i}": hf_greedy(reference, prompt) for i, prompt in enumerate(prompts)}
    alone = LLM(str(tiny_t5_checkpoints[variant]), num_kv_blocks=64, block_size=4)
    for i, prompt in enumerate(prompts):
        assert alone.generate([prompt], params)[0].token_ids == expected[f"r{i}"], f"r{i} alone"
    # 36 blocks of 4: the longest request (31 encoder tokens, 33 decoder) takes 17 of them.
    engine = make_engine(tiny_t5_checkpoints[variant], num_kv_blocks=36, max_num_batched_tokens=24)
    batched = run_with_random_arrivals(engine, {f"r{i}": (p, params) for i, p in enumerate(prompts)}, seed=2)
    assert engine.scheduler.num_preemptions > 0
    assert batched == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_sampled_completions_share_the_encoder_output_and_match_alone(tiny_t5_checkpoints):
    """n = 3 seeded completions fork off one encoder pass (their cross blocks shared), and each
    equals the same request run beside others and under preemption."""
    path = tiny_t5_checkpoints["flan_t5"]
    params = SamplingParams(max_tokens=20, temperature=0.9, seed=11, n=3, ignore_eos=True)
    prompt = [5, 17, 42, 8, 99, 3, 1]
    engine = make_engine(path)
    engine.add_request("n3", prompt, params)
    engine.step()
    seqs = engine.requests["n3"].seqs
    assert seqs[1].cross_block_table == seqs[0].cross_block_table != []
    assert {engine.block_manager.ref_counts[b] for b in seqs[0].cross_block_table} == {3}
    alone = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                alone = [c.token_ids for c in out.outputs]
    rng = random.Random(3)
    crowded = make_engine(path, num_kv_blocks=30, max_num_batched_tokens=16)
    others = {f"o{i}": ([rng.randrange(3, 300) for _ in range(n)] + [1],
                        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)) for i, n in enumerate((20, 3, 11))}
    results = {}
    pending = [("n3", (prompt, params)), *others.items()]
    for request_id, (p, sp) in pending:
        crowded.add_request(request_id, p, sp)
    while crowded.has_unfinished_requests():
        for out in crowded.step():
            if out.finished:
                results[out.request_id] = [c.token_ids for c in out.outputs]
    assert crowded.scheduler.num_preemptions > 0
    assert results["n3"] == alone
    assert crowded.block_manager.num_free_blocks == crowded.block_manager.num_blocks


def test_aborts_free_cross_blocks_at_once(tiny_t5_checkpoints):
    engine = make_engine(tiny_t5_checkpoints["t5"], num_kv_blocks=64)
    engine.add_request("running", [7] * 30 + [1], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("waiting", [9] * 12 + [1], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    seq = engine.requests["running"].seqs[0]
    assert len(seq.cross_block_table) == 8 and len(seq.block_table) == 1
    engine.abort_request("running")
    engine.abort_request("waiting")
    engine.step()
    assert engine.block_manager.num_free_blocks == 64 and not engine.has_unfinished_requests()


def test_limits_bound_the_encoder_input_and_the_decoder_apart(tiny_t5_checkpoints):
    engine = make_engine(tiny_t5_checkpoints["t5"], num_kv_blocks=64, max_model_len=40)
    limits = engine.limits
    assert limits.is_encoder_decoder and limits.max_model_len == 40
    assert limits.max_prompt_len == limits.max_encoder_len == 64 * 4 - 40
    limits.validate_prompt([5] * 216)
    with pytest.raises(PromptTooLongError, match=r"217 tokens but this encoder-decoder model encodes at most 216"):
        limits.validate_prompt([5] * 217)
    limits.validate_fit(216, 39)                      # the input does not count against the decoder
    with pytest.raises(PromptTooLongError, match=r"generates at most 39 tokens"):
        limits.validate_fit(3, 40)
    out = LLM(str(tiny_t5_checkpoints["t5"]), num_kv_blocks=64, block_size=4, max_model_len=40).generate(
        [[5] * 200 + [1]], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 39 and out.finish_reason == "length"
    assert out.prompt_token_ids == [5] * 200 + [1]


def test_text_in_text_out_with_the_t5_tokenizer(tiny_t5_checkpoints):
    """The prompt is encoded with </s> appended; the output decodes like transformers'
    tokenizer.decode(generated, skip_special_tokens=True)."""
    llm = LLM(str(tiny_t5_checkpoints["flan_t5"]), num_kv_blocks=64, block_size=4)
    out = llm.generate(["the river watches the garden"], SamplingParams(max_tokens=16, temperature=0,
                                                                       ignore_eos=True))[0]
    assert out.prompt_token_ids[-1] == 1                                # </s>
    assert out.token_ids == hf_greedy(tiny_t5_model("flan_t5"), out.prompt_token_ids, 16)
    assert out.text == llm.tokenizer.decode(out.token_ids)


# -- the scheduler and block manager, no model ----------------------------------------------

def t5_seq(seq_id: int, num_encoder_tokens: int, decoder_ids=(0,), max_tokens: int = 16) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(decoder_ids), 1, max_tokens,
                    encoder_token_ids=[100 + seq_id * 1000 + i for i in range(num_encoder_tokens)])


def test_cross_blocks_come_with_admission_and_go_with_the_sequence():
    scheduler = make_scheduler(num_blocks=16, block_size=4)
    seq = t5_seq(0, 10)
    scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.encoder_seqs == [seq] and batch.num_new_tokens == [1]
    assert len(seq.cross_block_table) == 3 and len(seq.block_table) == 1
    assert not set(seq.cross_block_table) & set(seq.block_table)
    scheduler.after_step(batch)
    seq.append_token(7)
    assert scheduler.schedule().encoder_seqs == []                   # decodes read what is there
    scheduler.finish(seq, SequenceStatus.FINISHED_LENGTH)
    assert scheduler.block_manager.num_free_blocks == 16 and seq.cross_block_table == []


def test_an_encoder_input_runs_whole_in_the_budget_or_first_and_alone():
    scheduler = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=16)
    a, b, long = t5_seq(0, 10), t5_seq(1, 10), t5_seq(2, 40)
    for seq in (a, b, long):
        scheduler.add(seq)
    def step():
        batch = scheduler.schedule()
        scheduler.after_step(batch)
        for seq, _ in batch.samples:
            seq.append_token(5)
        return batch
    first = step()                                                   # a: 1 + 10 tokens; b would overdraw
    assert first.encoder_seqs == [a]
    second = step()                                                  # a decodes; b's 11 fit the 15 left
    assert second.encoder_seqs == [b] and second.seqs == [a, b]
    third = step()                                                   # 40 > 14 left: alone, as the first prompt work
    assert third.encoder_seqs == [long] and third.seqs == [a, b, long]


def test_preemption_frees_the_cross_blocks_and_readmission_encodes_again():
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=32)
    old, new = t5_seq(0, 12, max_tokens=30), t5_seq(1, 12, max_tokens=30)
    for seq in (old, new):
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.encoder_seqs == [old, new]                          # 2 x (3 cross + 1) blocks: all 8
    scheduler.after_step(batch)
    for seq in (old, new):
        seq.append_token(5)
    for _ in range(4):                                               # position 4 needs a fifth block each
        batch = scheduler.schedule()
        scheduler.after_step(batch)
        for seq, _ in batch.samples:
            seq.append_token(5)
    assert new.num_preemptions == 1 and new.cross_block_table == [] and new in scheduler.waiting
    scheduler.finish(old, SequenceStatus.FINISHED_LENGTH)
    again = scheduler.schedule()
    # Its encoder runs again; its full decoder block survived in the prefix cache (hashed from
    # its encoder input), so only the last decoder token is recomputed.
    assert again.encoder_seqs == [new] and again.num_new_tokens == [1] and new.num_computed_tokens == 4
    assert len(new.cross_block_table) == 3


def test_decoder_blocks_are_shared_only_under_the_same_encoder_input():
    manager = BlockManager(32, 4)
    decoder = [0, 5, 6, 7, 8, 9, 10, 11, 12]
    first = t5_seq(0, 6, decoder)
    manager.allocate(first, len(decoder))
    first.num_computed_tokens = len(decoder)
    manager.cache_computed_blocks(first)
    other_input = t5_seq(1, 6, decoder)
    same_input = t5_seq(2, 6, decoder)
    same_input.encoder_token_ids = list(first.encoder_token_ids)
    assert manager.find_cached_prefix(other_input) == []
    assert manager.find_cached_prefix(same_input) == first.block_table[:2]


# -- other dtypes and quantized weights ----------------------------------------------------------

def test_bfloat16_stays_close_to_float32(tiny_t5_checkpoints):
    """The bias tables and their -inf masks in bf16 too: the first step's logits close to fp32."""
    prompt = [5, 17, 42, 8, 99, 3, 1]

    def first_logits(dtype):
        engine = make_engine(tiny_t5_checkpoints["flan_t5"], dtype=dtype)
        engine.add_request("r", prompt, SamplingParams(max_tokens=1))
        batch = engine.scheduler.schedule()
        return engine.runner.execute(batch).float()
    exact, low = first_logits("float32"), first_logits("bfloat16")
    assert (low - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_t5_runs_batched_as_alone(mode, tiny_t5_checkpoints):
    """Every linear quantized (the tied head from the shared embedding): a request's tokens beside
    others and under preemption are what it gets alone."""
    path = tiny_t5_checkpoints["t5"]
    rng = random.Random(2)
    requests = {f"r{i}": ([rng.randrange(3, 300) for _ in range(n)] + [1],
                          SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for i, n in enumerate((3, 25, 12))}
    crowded = make_engine(path, num_kv_blocks=20, quantization=mode)
    assert crowded.quantization_summary.mode == mode and crowded.quantization_summary.lm_head == "Q8_0"
    batched = run_with_random_arrivals(crowded, requests, seed=1)
    assert crowded.scheduler.num_preemptions > 0
    alone = make_engine(path, quantization=mode)
    for request_id, request in requests.items():
        assert run_with_random_arrivals(alone, {request_id: request}, seed=0)[request_id] == batched[request_id]
