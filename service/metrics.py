"""Every Prometheus metric of the server, prefix `attnserve_`, in one registry per app.

Fed from three places: the engine thread after each step (`observe_step`), the encoder's
worker after each batch (`observe_embed_batch`), and the routes (requests, tokens, latencies,
aborts). Gauges read live state when scraped, so an idle engine never shows stale numbers.
Counters count what clients sent and got: prompt tokens of admitted requests, tokens
generated for them (an aborted request counts what it got before the abort).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info,
                               disable_created_metrics, generate_latest)

disable_created_metrics()         # no `*_created` series: they double the exposition for nothing

# Seconds, from a cached prefill (ms) to a long generation (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
                   60.0, 120.0, 300.0, 600.0)
# Per token: 1 ms (a GPU decode) to seconds (a decode behind a long prefill chunk).
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
                         0.3, 0.5, 1.0, 2.5, 5.0)
# One step: a GPU decode (sub-ms) to a long CPU prefill chunk (seconds).
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

CONTENT_TYPE = CONTENT_TYPE_LATEST
ABORT_REASONS = ("client_disconnect", "shutdown", "error")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ns = "attnserve"
        # Counters
        self.requests = Counter("requests_total", "HTTP requests by route, status code and the model that "
                                "served them (empty for routes without one)",
                                ["route", "status", "model"], namespace=ns, registry=r)
        self.prompt_tokens = Counter("prompt_tokens_total", "prompt tokens of admitted generation requests",
                                     namespace=ns, registry=r)
        self.generation_tokens = Counter("generation_tokens_total", "tokens generated for clients",
                                         namespace=ns, registry=r)
        self.preemptions = Counter("preemptions_total", "sequences preempted for KV blocks",
                                   namespace=ns, registry=r)
        self.prefix_queries = Counter("prefix_cache_queries_total", "prompt tokens looked up in the prefix cache",
                                      namespace=ns, registry=r)
        self.prefix_hits = Counter("prefix_cache_hits_total", "prompt tokens found in the prefix cache",
                                   namespace=ns, registry=r)
        self.aborted = Counter("aborted_requests_total", "generation requests aborted, by reason",
                               ["reason"], namespace=ns, registry=r)
        for reason in ABORT_REASONS:
            self.aborted.labels(reason)
        self.embed_inputs = Counter("embed_inputs_total", "inputs the encoders ran, by model",
                                    ["model"], namespace=ns, registry=r)
        # Gauges (live)
        self.running = Gauge("num_requests_running", "generation requests being run",
                             namespace=ns, registry=r)
        self.waiting = Gauge("num_requests_waiting", "generation requests admitted, not yet scheduled",
                             namespace=ns, registry=r)
        self.kv_usage = Gauge("kv_cache_usage_ratio", "fraction of KV blocks in use",
                              namespace=ns, registry=r)
        self.engine_alive = Gauge("engine_alive", "1 while the engine loop runs and makes progress",
                                  namespace=ns, registry=r)
        # Histograms
        self.request_duration = Histogram("request_duration_seconds",
                                          "HTTP request duration (streams: to the last byte)",
                                          ["route"], buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.ttft = Histogram("time_to_first_token_seconds", "arrival to first generated token",
                              buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.itl = Histogram("inter_token_latency_seconds", "time between a request's consecutive tokens",
                             buckets=TOKEN_LATENCY_BUCKETS, namespace=ns, registry=r)
        self.queue_time = Histogram("queue_time_seconds", "arrival to first scheduled",
                                    buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.step_duration = Histogram("engine_step_duration_seconds", "one engine step",
                                       buckets=STEP_BUCKETS, namespace=ns, registry=r)
        self.batch_size = Histogram("batch_size", "sequences per engine step",
                                    buckets=SIZE_BUCKETS, namespace=ns, registry=r)
        self.embed_batch_size = Histogram("embed_batch_size", "inputs per encoder batch, by model",
                                          ["model"], buckets=SIZE_BUCKETS, namespace=ns, registry=r)
        self.build = Info("build", "version and what is served", namespace=ns, registry=r)
        for gauge in (self.running, self.waiting, self.kv_usage, self.engine_alive):
            gauge.set_function(lambda: 0.0)

    # -- wiring -----------------------------------------------------------------------------

    def set_build(self, version: str, model: str, device: str, dtype: str) -> None:
        self.build.info({"version": version, "model": model, "device": device, "dtype": dtype})

    def bind_engine(self, running: Callable[[], int], waiting: Callable[[], int],
                    kv_usage: Callable[[], float], alive: Callable[[], bool]) -> None:
        self.running.set_function(lambda: float(running()))
        self.waiting.set_function(lambda: float(waiting()))
        self.kv_usage.set_function(lambda: float(kv_usage()))
        self.engine_alive.set_function(lambda: 1.0 if alive() else 0.0)

    # -- engine thread ------------------------------------------------------------------------

    def observe_step(self, stats) -> None:
        """A StepStats (engine/llm_engine.py): what one step did."""
        self.step_duration.observe(stats.duration_s)
        if stats.num_seqs:
            self.batch_size.observe(stats.num_seqs)
        if stats.num_preempted:
            self.preemptions.inc(stats.num_preempted)
        if stats.num_prefix_queries:
            self.prefix_queries.inc(stats.num_prefix_queries)
        if stats.num_prefix_hits:
            self.prefix_hits.inc(stats.num_prefix_hits)

    def observe_embed_batch(self, model: str, num_inputs: int, num_tokens: int) -> None:
        self.embed_batch_size.labels(model).observe(num_inputs)

    def render(self) -> bytes:
        return generate_latest(self.registry)
