"""The Prometheus metrics: exactly DESIGN.md's set, buckets for LLM latencies, and values that
equal what was sent — counters, token counts and histogram counts after known requests on
every generation route, embeds, refusals and a client that leaves mid-stream."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import httpx
import pytest
from observability import DESIGN_METRICS, observed_server
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import sse_events

from service.metrics import LATENCY_BUCKETS, SIZE_BUCKETS, STEP_BUCKETS, TOKEN_LATENCY_BUCKETS, Metrics


def families(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, label names) of an exposition, as Prometheus names them."""
    out = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {label for s in family.samples for label in s.labels if label != "le"}
        out[name] = (family.type, tuple(sorted(labels)))
    return out


# -- the registry, alone ------------------------------------------------------------------------

def test_exactly_the_design_metrics():
    metrics = Metrics()
    metrics.set_build("1.2.3", "m", "cpu", "float32")
    metrics.requests.labels("/generate", "200", "m").inc()
    metrics.request_duration.labels("/generate").observe(0.1)
    metrics.embed_inputs.labels("e").inc()
    metrics.observe_embed_batch("e", 4, 40)
    found = families(metrics.render().decode())
    expected = {name: ("gauge" if kind == "info" else kind, tuple(sorted(labels)))    # info is a gauge
                for name, (kind, labels) in DESIGN_METRICS.items()}                  # on the wire
    assert found == expected


def test_buckets_span_llm_latencies():
    assert LATENCY_BUCKETS[0] <= 0.01 and LATENCY_BUCKETS[-1] >= 300     # ms to minutes
    assert TOKEN_LATENCY_BUCKETS[0] <= 0.001 and TOKEN_LATENCY_BUCKETS[-1] >= 2.5
    assert STEP_BUCKETS[0] <= 0.001 and STEP_BUCKETS[-1] >= 5
    assert SIZE_BUCKETS[0] == 1 and SIZE_BUCKETS[-1] >= 256
    for buckets in (LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, STEP_BUCKETS, SIZE_BUCKETS):
        assert list(buckets) == sorted(set(buckets))


def test_step_observation_counts_what_each_step_did():
    metrics = Metrics()
    metrics.observe_step(SimpleNamespace(duration_s=0.02, num_seqs=3, num_preempted=1,
                                         num_prefix_queries=0, num_prefix_hits=0))
    metrics.observe_step(SimpleNamespace(duration_s=0.01, num_seqs=0, num_preempted=0,
                                         num_prefix_queries=60, num_prefix_hits=32))
    text = metrics.render().decode()
    value = lambda name: next(s.value for f in text_string_to_metric_families(text)   # noqa: E731
                              for s in f.samples if s.name == name)
    assert value("attnserve_prefix_cache_queries_total") == 60
    assert value("attnserve_prefix_cache_hits_total") == 32
    assert value("attnserve_preemptions_total") == 1
    assert value("attnserve_engine_step_duration_seconds_count") == 2
    assert value("attnserve_batch_size_count") == 1                # empty steps carry no batch
    assert value("attnserve_batch_size_sum") == 3


# -- a real server ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(request):
    return observed_server(request)


COUNTED = ("attnserve_prompt_tokens_total", "attnserve_generation_tokens_total",
           "attnserve_time_to_first_token_seconds_count", "attnserve_time_to_first_token_seconds_sum",
           "attnserve_queue_time_seconds_count", "attnserve_queue_time_seconds_sum",
           "attnserve_inter_token_latency_seconds_count", "attnserve_embed_inputs_total",
           "attnserve_embed_batch_size_count", "attnserve_engine_step_duration_seconds_count",
           "attnserve_batch_size_count")
ROUTES = ("/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/embed",
          "/v1/embeddings")


def snapshot(server) -> dict:
    snap = {name: server.metric(name) for name in COUNTED}
    for route in ROUTES:
        snap[route, "200"] = server.metric("attnserve_requests_total", route=route, status="200")
        snap[route, "duration"] = server.metric("attnserve_request_duration_seconds_count", route=route)
        snap[route, "duration_sum"] = server.metric("attnserve_request_duration_seconds_sum", route=route)
    for status in ("401", "422"):
        snap["/generate", status] = server.metric("attnserve_requests_total", route="/generate", status=status)
    return snap


def test_counters_and_histograms_equal_what_was_sent(server):
    server.wait_idle()
    before = snapshot(server)
    n_tokens = lambda text: len(server.post("/tokenize", json={"inputs": text}).json())  # noqa: E731
    prompt_tokens = 0
    # /generate: 3 requests, 3 + 4 + 5 tokens
    for i, prompt in enumerate(["one two three", "The dog sat on the log", "Paged attention"]):
        r = server.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 3 + i, "ignore_eos": True}})
        assert r.status_code == 200
        prompt_tokens += n_tokens(prompt)
    # /generate_stream: 2 streams of 4 tokens, read to their last event
    for prompt in ("The cat sat", "Once upon a time"):
        with server.client().stream("POST", "/generate_stream", json={
                "inputs": prompt, "parameters": {"max_new_tokens": 4, "ignore_eos": True}}) as r:
            events = [json.loads(e) for e in sse_events(r.iter_lines())]
        assert len(events) == 4 and events[-1]["details"]["generated_tokens"] == 4
        prompt_tokens += n_tokens(prompt)
    # /v1/chat/completions streaming: 5 tokens; its usage says the prompt length
    with server.client().stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 5, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}) as r:
        chunks = [e for e in sse_events(r.iter_lines())]
    usage = json.loads(chunks[-2])["usage"]
    assert chunks[-1] == "[DONE]" and usage["completion_tokens"] == 5
    prompt_tokens += usage["prompt_tokens"]
    # /v1/completions, n=2: one engine request, 2 x 3 tokens, 3 outputs
    r = server.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 3, "n": 2,
                                             "temperature": 1.0, "seed": 7, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
    prompt_tokens += r.json()["usage"]["prompt_tokens"]
    # embeds: 3 + 1 inputs; refusals: one 422, one 401
    assert server.post("/embed", json={"inputs": ["a", "b", "c"]}).status_code == 200
    assert server.post("/v1/embeddings", json={"input": "d"}).status_code == 200
    assert server.post("/generate", json={"inputs": ""}).status_code == 422
    assert httpx.post(server.url + "/generate", json={"inputs": "x"}).status_code == 401
    server.wait_idle()

    after = snapshot(server)
    delta = {key: after[key] - before[key] for key in before}
    num_generations = 3 + 2 + 1 + 1
    assert delta["attnserve_prompt_tokens_total"] == prompt_tokens
    assert delta["attnserve_generation_tokens_total"] == (3 + 4 + 5) + 2 * 4 + 5 + 2 * 3
    assert delta["attnserve_time_to_first_token_seconds_count"] == num_generations
    assert delta["attnserve_queue_time_seconds_count"] == num_generations
    # one gap per token after a generation's first (the n=2 request's tokens come in pairs)
    assert delta["attnserve_inter_token_latency_seconds_count"] == (2 + 3 + 4) + 2 * 3 + 4 + 2
    assert delta["attnserve_embed_inputs_total"] == 4
    assert delta["attnserve_embed_batch_size_count"] >= 2
    for route, count in (("/generate", 3), ("/generate_stream", 2), ("/v1/chat/completions", 1),
                         ("/v1/completions", 1), ("/embed", 1), ("/v1/embeddings", 1)):
        assert delta[route, "200"] == count, route
        refused = 2 if route == "/generate" else 0             # refusals are timed too
        assert delta[route, "duration"] == count + refused, route
    assert delta["/generate", "422"] == 1 and delta["/generate", "401"] == 1
    # queue time <= TTFT, and each TTFT lies within its request (arrival to last byte)
    assert 0 < delta["attnserve_queue_time_seconds_sum"] <= delta["attnserve_time_to_first_token_seconds_sum"]
    assert delta["attnserve_time_to_first_token_seconds_sum"] <= sum(
        delta[route, "duration_sum"] for route in ("/generate", "/generate_stream", "/v1/chat/completions",
                                                   "/v1/completions"))
    steps = delta["attnserve_engine_step_duration_seconds_count"]
    assert 0 < delta["attnserve_batch_size_count"] <= steps
    assert server.metric("attnserve_num_requests_running") == 0
    assert server.metric("attnserve_num_requests_waiting") == 0
    assert server.metric("attnserve_kv_cache_usage_ratio") == 0
    assert server.metric("attnserve_engine_alive") == 1


def test_a_client_that_leaves_mid_stream_is_an_abort(server):
    before = server.metric("attnserve_aborted_requests_total", reason="client_disconnect")
    tokens = server.metric("attnserve_generation_tokens_total")
    with server.client().stream("POST", "/generate_stream", json={
            "inputs": "The cat sat", "parameters": {"max_new_tokens": 400, "ignore_eos": True}}) as r:
        next(sse_events(r.iter_lines()))
    deadline = time.monotonic() + 10
    while server.metric("attnserve_aborted_requests_total", reason="client_disconnect") == before:
        assert time.monotonic() < deadline, "no abort counted"
        time.sleep(0.05)
    assert server.metric("attnserve_aborted_requests_total", reason="client_disconnect") == before + 1
    server.wait_idle()
    assert 1 <= server.metric("attnserve_generation_tokens_total") - tokens < 400


def test_prefix_cache_counts_repeated_prompts(server):
    prompt = "Paged attention keeps keys and values in fixed-size blocks. " * 4     # > 2 blocks
    queries = server.metric("attnserve_prefix_cache_queries_total")
    hits = server.metric("attnserve_prefix_cache_hits_total")
    for _ in range(2):
        assert server.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 1}}).status_code == 200
    num_prompt = len(server.post("/tokenize", json={"inputs": prompt}).json())
    assert server.metric("attnserve_prefix_cache_queries_total") - queries == 2 * num_prompt
    assert server.metric("attnserve_prefix_cache_hits_total") - hits == (num_prompt - 1) // 16 * 16


def test_build_info_names_what_is_served(server):
    info = server.get("/info").json()
    text = server.metrics()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "attnserve_build_info"]
    (sample,) = family.samples
    assert sample.value == 1
    assert sample.labels == {"version": info["version"], "model": info["model_id"],
                             "device": info["model_device_type"], "dtype": info["model_dtype"]}
