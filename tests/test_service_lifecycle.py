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
from service_helpers import NO_ENCODER, TINY_ARGS, ServerProcess, alive, descendants, main_server, sse_events

LONG = {"max_new_tokens": 450, "ignore_eos": True}       # seconds on a CPU: never waited for


@pytest.fixture(scope="module")
def server(request):
    return main_server(request)


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
    with pytest.raises(httpx.ReadTimeout):           # the client gives up long before the end
        server.post(route, json=body, timeout=httpx.Timeout(60, read=0.15))
    info = server.wait_idle(timeout=3)
    assert info["num_requests_running"] == 0 and info["num_free_blocks"] == info["num_blocks"]
    assert server.metric("attnserve_aborted_requests_total", reason="client_disconnect") == aborted + 1


def test_queue_overflow_is_429_at_once_and_admitted_requests_complete(tiny_llama):
    server = ServerProcess(["--model", str(tiny_llama), *TINY_ARGS, *NO_ENCODER, "--max-num-seqs", "1",
                            "--max-queue", "2", "--drain-timeout", "0"]).start()
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async def until(predicate):
                for _ in range(2000):
                    if predicate((await client.get("/info")).json()):
                        return
                    await asyncio.sleep(0.005)
                raise AssertionError("the server never got there")

            running = asyncio.ensure_future(client.post("/generate", json={"inputs": "The cat", "parameters": LONG}))
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
        # This server serves no encoder: its routes say so.
        assert server.post("/embed", json={"inputs": "hi"}).status_code == 404
        assert server.post("/v1/embeddings", json={"input": "hi"}).json()["error"]["code"] == "model_not_found"

        # SIGTERM with --drain-timeout 0: what runs or waits is aborted; its stream ends with
        # an error event; the process exits 0.
        results, firsts = [[], []], [threading.Event(), threading.Event()]
        threads = [threading.Thread(target=_stream, args=(server, LONG, results[i], firsts[i])) for i in range(2)]
        threads[0].start()
        assert firsts[0].wait(30)
        threads[1].start()
        deadline = time.monotonic() + 10
        while server.get("/info").json()["num_requests_waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        server.signal()
        for thread in threads:
            thread.join(30)
        assert server.proc.wait(30) == 0
        running, queued = results
        summary = [(len(r), r[-1]) for r in results]
        assert running[0] == 200 and 1 <= len(running) - 2 < 450, summary
        assert running[-1].get("error_type") == "not_ready", summary
        assert queued == [200, {"error": queued[1]["error"], "error_type": "not_ready"}], summary
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
    server = ServerProcess(["--model", str(tiny_llama), *TINY_ARGS, *NO_ENCODER, "--drain-timeout", "60",
                            "--log-prompts", "--cors-origins", "http://app.example"]).start()
    try:
        preflight = httpx.options(server.url + "/generate", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.options(server.url + "/generate", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
        parameters = {"max_new_tokens": 120, "ignore_eos": True}
        results = [[] for _ in range(4)]
        firsts = [threading.Event() for _ in range(4)]
        threads = [threading.Thread(target=_stream, args=(server, parameters, results[i], firsts[i]))
                   for i in range(4)]
        for thread in threads:
            thread.start()
        assert all(event.wait(30) for event in firsts)
        tokenize_workers = descendants(server.proc.pid)          # --max-tokenize-concurrency (2) processes
        assert len(tokenize_workers) == 2, tokenize_workers
        signalled = time.monotonic()
        server.signal()
        while server.get("/ready").status_code == 200:     # (a refused connection would raise)
            assert time.monotonic() - signalled < 2
        refused = server.post("/generate", json={"inputs": "hi"})
        assert refused.status_code == 503 and refused.json()["error_type"] == "not_ready"
        assert server.post("/v1/completions", json={"prompt": "hi"}).json()["error"]["type"] == "service_unavailable_error"
        assert server.get("/health").status_code == 200           # alive, just draining
        assert any(len(result) < 121 for result in results)        # streams were still running
        for thread in threads:
            thread.join(60)
        code = server.proc.wait(30)
        assert code == 0, server.logs()[-3000:]
        assert not any(map(alive, tokenize_workers))               # stopped with the server
        for result in results:                                     # every stream finished
            assert result[0] == 200 and len(result) == 121
            assert result[-1]["details"]["generated_tokens"] == 120 and result[-1]["generated_text"] is not None
        logs = server.logs()
        assert "draining" in logs and "Traceback" not in logs
        assert "prompt='Once upon'" in logs                         # --log-prompts
    finally:
        server.stop()


def test_a_model_that_fails_to_load_exits_1():
    server = ServerProcess(["--model", "/nonexistent/model", "--embedding-model", "none"]).start(wait=False)
    try:
        assert server.proc.wait(60) == 1
        assert "nonexistent" in server.logs()
    finally:
        server.stop()
