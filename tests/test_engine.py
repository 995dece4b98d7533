"""The generation engine end to end on tiny random models: the paged, chunked path computes
what a plain forward computes; batching, preemption and prefix caching never change a
request's tokens; nothing leaks."""
import random

import pytest
import torch
from conftest import tiny_hf_model

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.llm_engine import LLM

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "gpt2"]


def make_engine(path, **options) -> LLMEngine:
    defaults = dict(num_kv_blocks=256, block_size=4, max_num_batched_tokens=64, max_num_seqs=64)
    return LLMEngine(str(path), EngineConfig(**{**defaults, **options}))


def prompts_with_shared_prefix(rng: random.Random, vocab: int) -> list[list[int]]:
    shared = [rng.randrange(3, vocab) for _ in range(13)]             # spans 3+ blocks of 4
    return [shared + [rng.randrange(3, vocab) for _ in range(n)] for n in (9, 1, 0)] + \
        [[rng.randrange(3, vocab) for _ in range(22)]]


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_chunked_logits_equal_a_full_forward(family, tiny_checkpoints):
    engine = make_engine(tiny_checkpoints[family], max_num_batched_tokens=7)  # chunks split blocks
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
        for seq, chunk in zip(batch.seqs, logits.split(batch.num_new_tokens)):
            logits_by_seq[seq.seq_id].append(chunk)
        scheduler.after_step(batch)
        for seq, index in batch.samples:
            seq.append_token(int(logits.split(batch.num_new_tokens)[index][-1].argmax()))
            if seq.num_output_tokens == 6:
                scheduler.finish(seq, seq.status.FINISHED_LENGTH)
    assert any(seq.num_cached_tokens for seq in seqs)                # the prefix cache was used
    reference = tiny_hf_model(family)
    for seq in seqs:
        ours = torch.cat(logits_by_seq[seq.seq_id])
        with torch.no_grad():
            expected = reference(torch.tensor([seq.token_ids[:-1]])).logits[0]
        computed = expected[seq.num_cached_tokens:]                  # cached positions were not run
        assert ours.shape == computed.shape
        assert (ours - computed).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generation_equals_transformers_generate(family, tiny_checkpoints):
    llm = LLM(str(tiny_checkpoints[family]), num_kv_blocks=128, block_size=4)
    prompt = [5, 17, 42, 8, 99, 3]
    ours = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    reference = tiny_hf_model(family)
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours.token_ids == expected


def run_with_random_arrivals(engine: LLMEngine, requests: dict[str, tuple], seed: int) -> dict[str, list[int]]:
    """Add requests at random steps while stepping; returns each request's tokens."""
    rng = random.Random(seed)
    pending = list(requests.items())
    results = {}
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randrange(0, 4)):
            if pending:
                request_id, (prompt, params) = pending.pop(0)
                engine.add_request(request_id, prompt, params)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
    return results


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batched_output_is_identical_to_one_at_a_time(temperature, tiny_llama):
    rng = random.Random(1)
    requests = {}
    for i in range(40):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(1, 40))]
        params = SamplingParams(max_tokens=rng.randrange(1, 24), temperature=temperature,
                                seed=1000 + i if temperature else None, ignore_eos=True)
        requests[f"r{i}"] = (prompt, params)
    # A pool of 40 blocks of 4 tokens cannot hold 40 requests: preemption is forced.
    engine = make_engine(tiny_llama, num_kv_blocks=40, max_num_batched_tokens=24)
    batched = run_with_random_arrivals(engine, requests, seed=2)
    assert engine.scheduler.num_preemptions > 0
    alone_engine = make_engine(tiny_llama)
    for request_id, (prompt, params) in requests.items():
        alone = run_with_random_arrivals(alone_engine, {request_id: (prompt, params)}, seed=3)
        assert batched[request_id] == alone[request_id], request_id
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_cache_hit_computes_only_the_suffix_with_identical_output(tiny_llama):
    engine = make_engine(tiny_llama)
    prefix = list(range(10, 22))                                      # exactly 3 blocks of 4
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    run_with_random_arrivals(engine, {"first": (prefix + [30, 31], params)}, seed=0)
    before = engine.counters.num_prompt_tokens_computed
    cached = run_with_random_arrivals(engine, {"second": (prefix + [40, 41, 42], params)}, seed=0)
    assert engine.counters.num_prompt_tokens_computed - before == 3
    uncached = make_engine(tiny_llama, enable_prefix_caching=False)
    assert run_with_random_arrivals(uncached, {"second": (prefix + [40, 41, 42], params)}, seed=0) == cached


def test_eviction_under_pressure_keeps_results_correct(tiny_llama):
    rng = random.Random(4)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    prompts = {f"p{i}": ([rng.randrange(3, 300) for _ in range(17)], params) for i in range(12)}
    small = make_engine(tiny_llama, num_kv_blocks=24)
    first = run_with_random_arrivals(small, prompts, seed=0)
    # Most recently run first: their blocks survived eviction and are hit.
    again = run_with_random_arrivals(small, {f"again-{k}": v for k, v in reversed(prompts.items())}, seed=1)
    assert all(again[f"again-{k}"] == first[k] for k in prompts)
    assert small.counters.num_prefix_hits > 0


def test_aborts_mid_prefill_and_mid_decode_leak_no_blocks(tiny_llama):
    engine = make_engine(tiny_llama, num_kv_blocks=64, max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    engine.add_request("decoding", [5] * 6, params)
    engine.add_request("prefilling", list(range(3, 60)), params)
    engine.add_request("waiting", [7] * 9, params)
    engine.step()
    engine.step()
    assert engine.requests["prefilling"].seqs[0].num_computed_tokens < 57
    for request_id in ("decoding", "prefilling", "waiting"):
        engine.abort_request(request_id)
    outputs = engine.step()
    assert {o.request_id: o.finish_reason for o in outputs} == {
        "decoding": "abort", "prefilling": "abort", "waiting": "abort"}
    engine.abort_request("decoding")                                  # finished: a no-op
    engine.abort_request("never-existed")
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_stop_strings_across_token_boundaries_are_cut_from_text_and_stream(tiny_llama):
    engine = make_engine(tiny_llama)
    base = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    text = run_text(engine, "The cat sat", base)
    pieces = [engine.tokenizer.decode([t]) for t in engine.tokenizer.encode(text, add_special_tokens=False)]
    start = len(pieces[0]) + len(pieces[1]) - 1                       # spans tokens 2 and 3
    stop = text[start: start + 3]
    assert len(stop.strip()) > 0
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop, "zzzz-never"])
    engine.add_request("stopped", "The cat sat", params)
    streamed, final = "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed += out.outputs[0].delta_text
            final = out
    assert final.text == text[: text.index(stop)] == streamed
    assert final.finish_reason == "stop" and final.outputs[0].stop_reason == stop


def run_text(engine, prompt, params):
    engine.add_request("probe", prompt, params)
    while engine.has_unfinished_requests():
        outputs = engine.step()
    return outputs[0].text


def test_stop_token_ids_and_eos_end_generation(tiny_llama):
    llm = LLM(str(tiny_llama), num_kv_blocks=64)
    probe = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    stop_at = probe.token_ids[3]
    expected = probe.token_ids[: probe.token_ids.index(stop_at) + 1]
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                   stop_token_ids=[stop_at]))[0]
    assert out.token_ids == expected
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    llm.engine.eos_token_ids = frozenset({stop_at})                   # as if it were the EOS
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0))[0]
    assert out.token_ids == expected
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason is None


def test_n_completions_share_the_prompt_computation(tiny_llama):
    engine = make_engine(tiny_llama, enable_prefix_caching=False)
    prompt = list(range(3, 23))
    engine.add_request("n3", prompt, SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=7,
                                                    ignore_eos=True))
    while engine.has_unfinished_requests():
        outputs = engine.step()
    final = outputs[0]
    assert [c.index for c in final.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1
    assert engine.counters.num_prompt_tokens_computed == len(prompt)  # prefilled once for all 3
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prompt_too_long_names_both_lengths(tiny_llama):
    engine = make_engine(tiny_llama, max_model_len=32)
    with pytest.raises(ValueError, match=r"40 tokens.*31"):
        engine.add_request("long", [5] * 40, SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, 384\)"):
        engine.add_request("oov", [5, 384], SamplingParams())


def test_more_completions_than_sequences_per_step_is_refused(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=8)
    with pytest.raises(ValueError, match=r"n 11 exceeds max_num_seqs 8"):
        engine.add_request("r", [5, 6], SamplingParams(n=11))
    assert not engine.has_unfinished_requests()


def test_generation_stops_at_max_model_len(tiny_llama):
    engine = make_engine(tiny_llama, max_model_len=16)
    engine.add_request("r", [5] * 10, SamplingParams(max_tokens=100, ignore_eos=True))
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert len(outputs[0].token_ids) == 6 and outputs[0].finish_reason == "length"


def test_a_failure_in_one_request_fails_it_alone(tiny_llama, monkeypatch):
    engine = make_engine(tiny_llama)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    engine.add_request("good", [5, 6, 7], params)
    engine.add_request("bad", [8, 9, 10], params)

    def explode(*args):
        raise RuntimeError("injected")
    monkeypatch.setattr(engine.requests["bad"].completions[0], "add_token", explode)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert finished["bad"].finish_reason == "error" and "injected" in finished["bad"].error
    assert finished["good"].finish_reason == "length" and len(finished["good"].token_ids) == 5
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_cpu_caps_prompt_tokens_by_the_decodes_running_unless_told(tiny_checkpoints):
    from engine.scheduler import PrefillCap
    default = make_engine(tiny_checkpoints["llama"], max_num_batched_tokens=512)
    assert default.scheduler.prefill_cap == PrefillCap(floor=32, ceiling=512, per_decode=2)
    fixed = make_engine(tiny_checkpoints["llama"], max_num_batched_tokens=512, max_prefill_tokens=100)
    assert fixed.scheduler.prefill_cap == PrefillCap(floor=100, ceiling=512)
