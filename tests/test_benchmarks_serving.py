"""benchmarks/serving.py: the closed-loop client, SSE timing and statistics, against a real
server on the tiny model and the in-process engine (no peers, no plot)."""
from __future__ import annotations

import asyncio
import json

import pytest
from conftest import save_tiny_checkpoint

from benchmarks import serving
from benchmarks.peers.clients import RequestRecord, chunk_text, closed_loop, parse_event
from tests.service_helpers import NO_ENCODER, TINY_ARGS, ServerProcess

PROMPTS = ["The cat sat on the mat.", "def add(a, b):", "Once upon a time there was",
           "Paged attention keeps keys", "The dog sat on the log.", "Once upon a time"]
OUTPUT_LEN = 8


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Only the tiny LLaMA (the session's tiny_llama fixture saves every family)."""
    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("serving-bench"))


@pytest.fixture(scope="module")
def server(llama):
    server = ServerProcess(["--model", str(llama), *TINY_ARGS, *NO_ENCODER]).start()
    yield server
    server.stop(timeout=10)


def record(start: float, chunks: list[float], num_tokens: int | None = None) -> RequestRecord:
    return RequestRecord(start=start, chunk_times=chunks, end=chunks[-1],
                         num_tokens=len(chunks) if num_tokens is None else num_tokens)


def test_summarize_times_from_first_send_to_last_end():
    records = [record(0.0, [0.1, 0.2, 0.3, 0.4]), record(0.0, [0.5, 0.6, 0.7, 0.8]),
               RequestRecord(start=0.0, end=0.05, error="HTTP 500: boom")]
    s = serving.summarize(records, output_len=4)
    assert s["requests"] == 3 and s["failed"] == 1
    assert s["duration_s"] == pytest.approx(0.8)
    assert s["output_tok_s"] == pytest.approx(8 / 0.8)
    assert s["req_s"] == pytest.approx(2 / 0.8)
    assert s["ttft_p50_ms"] == pytest.approx(300.0)
    assert s["itl_p50_ms"] == pytest.approx(100.0) and s["itl_p99_ms"] == pytest.approx(100.0)
    assert s["decode_tok_s"] == pytest.approx(10.0)
    assert s["all_exact_length"]
    assert not serving.summarize([record(0.0, [0.1], num_tokens=1)], output_len=4)["all_exact_length"]


def test_sse_parsing():
    assert parse_event('data: {"choices": [{"text": "hi"}]}') == {"choices": [{"text": "hi"}]}
    assert parse_event("data: [DONE]") == "[DONE]"
    assert parse_event(": keep-alive") is None and parse_event("") is None
    assert chunk_text({"choices": [{"text": "a"}]}) == "a"
    assert chunk_text({"choices": [{"delta": {"content": "b"}}]}) == "b"
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""


def test_closed_loop_keeps_exactly_c_requests_in_flight():
    in_flight, peak = 0, 0

    async def send(prompt: str) -> RequestRecord:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        return record(0.0, [0.1], num_tokens=len(prompt))

    records = asyncio.run(closed_loop(send, ["a" * n for n in range(1, 8)], concurrency=3))
    assert peak == 3
    assert [r.num_tokens for r in records] == list(range(1, 8))     # prompt order kept


def test_ratios_targets_and_table_tolerate_missing_systems():
    level = serving.summarize([record(0.0, [0.1, 0.2])], output_len=2)
    results = {"attnserve": {1: level, 16: level}, "llamacpp-batched": {16: {**level, "output_tok_s": 5.0}}}
    rows = serving.ratio_rows(results, [1, 16])
    assert rows[1]["x_llamacpp-batched"] == pytest.approx(level["output_tok_s"] / 5.0)
    assert rows[0]["x_transformers"] is None
    goals = serving.targets(results)
    measured = {what: value for what, value, _, _ in goals}
    assert measured["tok/s vs llama.cpp at C=16"] == pytest.approx(level["output_tok_s"] / 5.0)
    assert measured["tok/s vs transformers at C=16"] is None
    text = serving.format_table(results) + serving.format_ratios(rows) + serving.format_targets(goals)
    assert "attnserve" in text and "n/a" in text


def test_levels_cap_the_one_at_a_time_servers():
    args = serving.parse_args(["--sequential-min", "4", "--transformers-max-concurrency", "4"])
    prompts = {1: list("abcdefgh"), 8: list("abcdefghijklmnop")}
    assert serving.levels_for("transformers", args, [1, 8], prompts) == {1: list("abcd")}
    assert serving.levels_for("llamacpp-server", args, [1, 8], prompts) == {1: list("abcd"), 8: list("abcdefgh")}
    assert serving.levels_for("attnserve", args, [1, 8], prompts) == prompts


def test_a_variant_is_the_server_with_its_extra_flags():
    args = serving.parse_args(["--server-args", "--max-num-seqs 8", "--variant", "int8=--quantization int8"])
    command, ready = serving.server_command("attnserve-int8", args, 1234)
    assert command[-4:] == ["--max-num-seqs", "8", "--quantization", "int8"] and ready == "/ready"
    assert "--quantization" not in serving.server_command("attnserve", args, 1234)[0]
    assert serving.openai_body("attnserve-int8", "p", 4, [2])["ignore_eos"]


def test_http_levels_against_a_real_server(server):
    levels = {1: PROMPTS[:3], 2: PROMPTS[3:]}
    records = asyncio.run(serving.drive_http(server.url, "attnserve", "Hello", levels, OUTPUT_LEN, [2]))
    assert set(records) == {1, 2}
    for c, level in records.items():
        assert all(r.error is None for r in level), [r.error for r in level]
        assert [r.num_tokens for r in level] == [OUTPUT_LEN] * 3       # ignore_eos honoured
        assert all(1 <= len(r.chunk_times) <= OUTPUT_LEN and r.ttft > 0 for r in level)
        assert all(r.start < r.chunk_times[0] <= r.chunk_times[-1] <= r.end for r in level)
        s = serving.summarize(level, OUTPUT_LEN)
        assert s["failed"] == 0 and s["all_exact_length"] and s["output_tok_s"] > 0
    json.dumps({c: serving.summarize(r, OUTPUT_LEN) for c, r in records.items()})   # --json can write it


def test_inprocess_engine_levels(llama):
    from benchmarks.peers.inprocess import build_engine, run_levels
    engine = build_engine(str(llama), ["--kv-cache-memory", "16MiB", "--max-num-seqs", "8"])
    try:
        results = asyncio.run(run_levels(engine, "Hello", [(1, PROMPTS[:3]), (2, PROMPTS[3:])], OUTPUT_LEN))
    finally:
        engine.stop()
    for c, level in results:
        assert [r.num_tokens for r in level] == [OUTPUT_LEN] * 3 and all(r.error is None for r in level)
        assert serving.summarize(level, OUTPUT_LEN)["all_exact_length"]
