"""Reliability at the edges an operator meets: a drain that keeps its deadline, one client
unable to starve the others, tokenizer floods that cannot stall liveness, each token's exact
bytes, and the small bounds (stop strings, the encoder queue, prompt + max_tokens).

Deadlines here are correctness bounds, generous enough for a loaded 2-core CI machine."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from service_helpers import NO_ENCODER, TINY_ARGS, ServerProcess, edges_server

LONG = {"max_tokens": 400, "ignore_eos": True}
PROMPT_200 = "The cat sat. " * 50                     # ~200 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def server(request):
    return edges_server(request)


# -- the drain keeps its deadline -------------------------------------------------------------

def test_sigterm_while_a_32_prompt_request_runs_exits_within_the_drain_timeout(tiny_llama):
    server = ServerProcess(["--model", str(tiny_llama), "--kv-cache-memory", "16MiB", "--max-num-seqs", "64",
                            *NO_ENCODER, "--drain-timeout", "1"]).start()
    try:
        body = {"prompt": [f"Story number {i}: once upon a time" for i in range(32)], **LONG}
        answers = []
        client = threading.Thread(target=lambda: answers.append(
            httpx.post(server.url + "/v1/completions", json=body, timeout=120)))
        client.start()
        deadline = time.monotonic() + 30
        while server.get("/info").json()["num_requests_running"] + server.get("/info").json()["num_requests_waiting"] < 32:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        signalled = time.monotonic()
        server.signal()
        code = server.proc.wait(30)
        elapsed = time.monotonic() - signalled
        client.join(30)
        assert code == 0 and elapsed < 1 + 2 + 2, elapsed          # drain timeout + 2 s (+ CI slack)
        assert answers and answers[0].status_code == 503, answers
    finally:
        server.stop()


# -- one client cannot starve the others ------------------------------------------------------

def test_a_small_request_finishes_while_another_client_holds_the_largest_request(server):
    # 4 prompts x n=8: every sequence the server runs at once (--max-num-seqs 8), 4 times over.
    big = {"prompt": ["The cat", "The dog", "A bird", "Some fish"], "n": 8, "stream": True, **LONG}
    done = threading.Event()

    def hold():
        with httpx.stream("POST", server.url + "/v1/completions", json=big, timeout=300) as r:
            for _ in r.iter_lines():
                if done.is_set():
                    return                                       # leaving aborts it
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        deadline = time.monotonic() + 30
        while server.get("/info").json()["num_requests_running"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)
        started = time.monotonic()
        r = server.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True})
        elapsed = time.monotonic() - started
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert elapsed < 5, elapsed
    finally:
        done.set()
        holder.join(60)
    assert server.wait_idle(10)["num_free_blocks"] == server.get("/info").json()["num_blocks"]


def test_max_queue_counts_sequences(tiny_llama):
    server = ServerProcess(["--model", str(tiny_llama), *TINY_ARGS, *NO_ENCODER, "--max-queue", "8"]).start()
    try:
        r = server.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 2})
        assert r.status_code == 422 and "9 sequences" in r.json()["error"]["message"]
        assert server.post("/v1/completions", json={"prompt": ["a", "b"], "n": 4, "max_tokens": 2}).status_code == 200
    finally:
        server.stop()


# -- tokenizer floods -------------------------------------------------------------------------

# 20 clients, each sending 1 MB /tokenize bodies back to back (reading the answers as they
# come), from a process of their own so that the measuring client is not slowed by them.
_FLOOD = """
import sys, threading, httpx
url, seconds = sys.argv[1], float(sys.argv[2])
text = ("The quick brown fox jumps over the lazy dog. " * 23_000)[:1_000_000]
body, statuses, stop = httpx._content.json_dumps({"inputs": text}), [], threading.Event()
def flood():
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            with client.stream("POST", url, content=body, headers={"Content-Type": "application/json"}) as r:
                for _ in r.iter_raw():
                    pass
                statuses.append(r.status_code)
threads = [threading.Thread(target=flood) for _ in range(20)]
[t.start() for t in threads]
threading.Event().wait(seconds)
stop.set()
[t.join() for t in threads]
print(sorted(set(statuses)), len(statuses))
"""


def test_health_and_generation_stay_quick_under_a_flood_of_1mb_tokenize_calls(server):
    flood = subprocess.Popen([sys.executable, "-c", _FLOOD, server.url + "/tokenize", "8"],
                             stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)
        health = []
        for _ in range(60):
            started = time.monotonic()
            assert server.get("/health").status_code == 200
            health.append(time.monotonic() - started)
            time.sleep(0.05)
        started = time.monotonic()
        r = server.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
        generate_s = time.monotonic() - started
    finally:
        out, _ = flood.communicate(timeout=120)
    statuses = json.loads(out.split("]")[0] + "]")
    p95 = statistics.quantiles(health, n=20)[18]
    # The targets are 100 ms and 1 s (BENCHMARKS.md measures them); CI shares two cores with
    # the flood, so its bounds are looser: before, /health took up to 9.7 s here.
    assert r.status_code == 200 and generate_s < 2.0, generate_s
    assert p95 < 1.0, (p95, max(health))
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses


def test_a_1mb_tokenize_answer_is_streamed_and_whole(server):
    text = "word " * 200_000
    with httpx.stream("POST", server.url + "/tokenize", json={"inputs": text}, timeout=120) as r:
        assert r.status_code == 200 and r.headers.get("content-length") is None
        tokens = json.loads(b"".join(r.iter_bytes()))
    assert len(tokens) >= 200_000 and tokens[-1]["stop"] <= len(text)


def test_detokenize_of_a_million_ids_leaves_health_alone(server):
    ids = [5] * 1_000_000
    result = []
    worker = threading.Thread(target=lambda: result.append(server.post("/detokenize", json={"inputs": ids}, timeout=120)))
    worker.start()
    slowest = 0.0
    while worker.is_alive():
        started = time.monotonic()
        assert server.get("/health").status_code == 200
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.02)
    worker.join()
    assert result[0].status_code == 200 and slowest < 1.0            # decoding on the event loop: 0.77 s


# -- each token's exact bytes -----------------------------------------------------------------

PROMPT_WITH_SCRIPTS = "Emoji 🎉🔥👍, 日本語のテキスト, 한국어, e\u0301 a\u0308 combining marks:"


def test_chat_logprob_bytes_join_to_the_content(server):
    for seed in range(3):
        r = server.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": PROMPT_WITH_SCRIPTS}], "max_tokens": 40, "logprobs": True,
            "top_logprobs": 2, "temperature": 1.0, "seed": seed, "ignore_eos": True})
        choice = r.json()["choices"][0]
        # (a special token adds no text: its bytes are null)
        joined = b"".join(bytes(entry["bytes"] or []) for entry in choice["logprobs"]["content"])
        assert joined.decode("utf-8", errors="replace") == choice["message"]["content"], joined
        for entry in choice["logprobs"]["content"]:
            assert "\ufffd" not in entry["token"]
            if entry["token"].startswith("bytes:"):
                assert entry["token"] == "bytes:" + "".join(f"\\x{b:02x}" for b in entry["bytes"])


def test_completion_logprob_tokens_never_show_a_replacement_character(server):
    r = server.post("/v1/completions", json={"prompt": PROMPT_WITH_SCRIPTS, "max_tokens": 40, "logprobs": 3,
                                            "echo": True, "temperature": 1.0, "seed": 3, "ignore_eos": True})
    logprobs = r.json()["choices"][0]["logprobs"]
    assert all("\ufffd" not in token for token in logprobs["tokens"])
    assert all("\ufffd" not in token for top in logprobs["top_logprobs"] if top for token in top)


# -- the small bounds -------------------------------------------------------------------------

@pytest.mark.parametrize("stop", ["x" * 513, ["x" * 513]])
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
])
def test_a_stop_string_is_bounded_in_both_forms(server, path, body, stop):
    r = server.post(path, json={**body, "stop": stop})
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("stop"), r.text


def test_the_encoder_queue_has_its_own_bound(server):
    too_many = server.post("/embed", json={"inputs": ["a sentence"] * 17})
    assert too_many.status_code == 422 and "the limit is 16" in too_many.json()["error"]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: server.post("/embed", json={"inputs": ["a sentence"] * 16}), range(24)))
    assert {a.status_code for a in answers} <= {200, 429} and any(a.status_code == 429 for a in answers)
    assert all(a.json()["error_type"] == "overloaded" for a in answers if a.status_code == 429)


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", {"prompt": PROMPT_200, "max_tokens": 400}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT_200}], "max_tokens": 400},
     "max_tokens"),
    ("/generate", {"inputs": PROMPT_200, "parameters": {"max_new_tokens": 400}}, "parameters.max_new_tokens"),
])
def test_a_prompt_and_an_explicit_cap_that_do_not_fit_are_a_400(server, path, body, field):
    r = server.post(path, json=body)
    assert r.status_code == 400, r.text
    message = r.text
    assert field in message and "512" in message


def test_a_default_cap_is_cut_to_fit(server):
    r = server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT_200}],
                                                  "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["total_tokens"] == 512
