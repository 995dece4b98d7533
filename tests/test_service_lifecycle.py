"""Disconnects, backpressure, drain on SIGTERM and a failed load, against real servers."""
from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time

import httpx
import openai
import pytest

from service_helpers import API_KEY, TINY_ARGS, ServerProcess, shared_server, sse_events

LONG = {"max_new_tokens": 450, "ignore_eos": True}       # seconds on a CPU: never waited for


@pytest.fixture(scope="module")
def server(request, tiny_llama):
    return shared_server(request, "main", ["--model", str(tiny_llama), *TINY_ARGS], api_key=API_KEY)


def test_a_dropped_stream_frees_its_blocks(server):
    aborted = server.metric("attnserve_aborted_requests_total", reason="client_disconnect")
    started = time.monotonic()
    with server.client() as client, client.stream("POST", "/generate_stream",
                                                  json={"inputs": "The cat", "parameters": LONG}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()                    # (leaving this iterator closes the connection)
        events = [json.loads(payload) for payload in itertools.islice(sse_events(lines), 3)]
        assert [e["index"] for e in events] == [1, 2, 3]
        assert server.get("/info").json()["num_requests_running"] == 1
        lines.close()
    info = server.wait_idle(timeout=3)
    assert info["num_requests_running"] == 0 and info["num_requests_waiting"] == 0
    assert info["num_free_blocks"] == info["num_blocks"]
    assert time.monotonic() - started < 8
    assert server.metric("attnserve_aborted_requests_total", reason="client_disconnect") == aborted + 1
    assert server.metric("attnserve_num_requests_running") == 0
    assert server.metric("attnserve_kv_cache_usage_ratio") == 0


@pytest.mark.parametrize("route, body", [
    ("/generate", {"inputs": "The cat", "parameters": LONG}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 450,
                              "ignore_eos": True}),
])
def test_a_client_that_leaves_a_plain_request_aborts_it(server, route, body):
    aborted = server.metric("attnserve_aborted_requests_total", reason="client_disconnect")
    with pytest.raises(httpx.ReadTimeout):
        server.post(route, json=body, timeout=httpx.Timeout(60, read=0.7))
    info = server.wait_idle(timeout=3)
    assert info["num_requests_running"] == 0 and info["num_free_blocks"] == info["num_blocks"]
    assert server.metric("attnserve_aborted_requests_total", reason="client_disconnect") == aborted + 1


def test_queue_overflow_is_429_at_once_and_admitted_requests_complete(tiny_llama):
    server = ServerProcess(["--model", str(tiny_llama), *TINY_ARGS, "--max-num-seqs", "1",
                            "--max-queue", "2"]).start()
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async def until(predicate):
                for _ in range(500):
                    if predicate((await client.get("/info")).json()):
                        return
                    await asyncio.sleep(0.02)
                raise AssertionError("the server never got there")

            running = asyncio.ensure_future(client.post("/generate", json={
                "inputs": "The cat", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}))
            await until(lambda info: info["num_requests_running"] == 1)
            waiting = [asyncio.ensure_future(client.post("/v1/completions", json={
                "prompt": f"The dog {i}", "max_tokens": 4, "ignore_eos": True})) for i in range(2)]
            await until(lambda info: info["num_requests_waiting"] == 2)
            started = time.monotonic()
            rejected = await asyncio.gather(
                client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}),
                client.post("/generate_stream", json={"inputs": "x"}),
                client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}))
            elapsed = time.monotonic() - started
            try:                                  # what the official client makes of it
                await asyncio.to_thread(oai.completions.create, model=None, prompt="x", max_tokens=2)
                client_error = None
            except openai.RateLimitError as exc:
                client_error = exc
            assert not running.done()
            return rejected, elapsed, client_error, await asyncio.gather(running, *waiting)

    try:
        rejected, elapsed, client_error, admitted = asyncio.run(scenario())
        assert elapsed < 1.0
        for r in rejected:
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert rejected[0].json()["error_type"] == "overloaded"
        assert rejected[1].headers["content-type"].startswith("application/json")
        assert rejected[2].json()["error"]["type"] == "rate_limit_error"
        assert isinstance(client_error, openai.RateLimitError)
        assert [r.status_code for r in admitted] == [200, 200, 200]
        assert admitted[1].json()["usage"]["completion_tokens"] == 4
        assert server.metric("attnserve_requests_total", route="/generate", status="429") == 1
        assert server.metric("attnserve_requests_total", route="/v1/completions", status="429") == 2
        started = time.monotonic()                # and SIGTERM when idle: exit 0 at once
        assert server.stop() == 0
        assert time.monotonic() - started < 5
    finally:
        server.stop()


def _stream(server: ServerProcess, parameters: dict, out: list, first: threading.Event) -> None:
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", server.url + "/generate_stream", json={"inputs": "Once upon", "parameters": parameters}) as r:
        out.append(r.status_code)
        for payload in sse_events(r.iter_lines()):
            out.append(json.loads(payload))
            first.set()


def test_sigterm_drains_streams_refuses_new_work_and_exits_0(tiny_llama):
    server = ServerProcess(["--model", str(tiny_llama), *TINY_ARGS, "--drain-timeout", "1.5"]).start()
    try:
        short, long = {"max_new_tokens": 6, "ignore_eos": True}, LONG
        results = [[] for _ in range(4)]
        firsts = [threading.Event() for _ in range(4)]
        threads = [threading.Thread(target=_stream, args=(server, p, results[i], firsts[i]))
                   for i, p in enumerate([short, short, long, long])]
        for thread in threads:
            thread.start()
        assert all(event.wait(30) for event in firsts)
        signalled = time.monotonic()
        server.signal()
        time.sleep(0.2)
        refused = server.post("/generate", json={"inputs": "hi"})
        assert refused.status_code == 503 and refused.json()["error_type"] == "not_ready"
        assert server.post("/v1/completions", json={"prompt": "hi"}).json()["error"]["type"] == "service_unavailable_error"
        assert server.get("/ready").status_code == 503
        assert server.get("/health").status_code == 200           # alive, just draining
        for thread in threads:
            thread.join(30)
        code = server.proc.wait(30)
        assert code == 0, server.logs()[-3000:]
        assert time.monotonic() - signalled < 20
        for result in results[:2]:                                 # finished within the timeout
            assert result[0] == 200 and result[-1]["details"]["generated_tokens"] == 6
            assert result[-1]["generated_text"] is not None and len(result) == 7
        for result in results[2:]:                                 # aborted at the timeout
            assert result[0] == 200 and result[-1].get("error_type") == "not_ready", (len(result), result[-2:])
            assert 1 <= len(result) - 2 < 450
        logs = server.logs()
        assert "draining" in logs and "Traceback" not in logs
    finally:
        server.stop()


def test_a_model_that_fails_to_load_exits_1():
    server = ServerProcess(["--model", "/nonexistent/model", "--embedding-model", "none"]).start(wait=False)
    try:
        assert server.proc.wait(60) == 1
        assert "nonexistent" in server.logs()
    finally:
        server.stop()
