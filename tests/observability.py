"""One observed load run, shared by the observability tests: a real server (tiny LLaMA with a
KV cache small enough to preempt, the real MiniLM encoder, an API key), a real Prometheus
scraping it every second, and `make loadtest` (locust, headless, 8 users, 15 s) as the load.

    run = observed_load(request)     # once per session
    run.server, run.prometheus (None when missing: run.prometheus_missing), run.locust_rc,
    run.stats (locust's CSV rows by (type, name)), run.started, run.ended

Prometheus is the `prometheus` binary (Debian package `prometheus`, installed by .ci/run).
Missing, its tests fail under CI=true and skip elsewhere.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from service_helpers import API_KEY, EMBEDDING_MODEL, REPO, ServerProcess, free_port, shared_server

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "attnserve.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
# 40 KV blocks of 16 tokens: a few long prompts fill it, so the load preempts.
OBSERVED_ARGS = ["--kv-cache-memory", "320KiB", "--max-num-seqs", "8", "--log-level", "info",
                 "--embedding-model", EMBEDDING_MODEL]
LOAD = dict(users=8, spawn_rate=4, seconds=15, max_new_tokens=32)

# DESIGN.md's metrics, the whole contract: name -> (type, labels).
DESIGN_METRICS = {
    "attnserve_requests_total": ("counter", ("route", "status", "model")),
    "attnserve_prompt_tokens_total": ("counter", ()),
    "attnserve_generation_tokens_total": ("counter", ()),
    "attnserve_preemptions_total": ("counter", ()),
    "attnserve_prefix_cache_queries_total": ("counter", ()),
    "attnserve_prefix_cache_hits_total": ("counter", ()),
    "attnserve_aborted_requests_total": ("counter", ("reason",)),
    "attnserve_embed_inputs_total": ("counter", ("model",)),
    "attnserve_num_requests_running": ("gauge", ()),
    "attnserve_num_requests_waiting": ("gauge", ()),
    "attnserve_kv_cache_usage_ratio": ("gauge", ()),
    "attnserve_engine_alive": ("gauge", ()),
    "attnserve_request_duration_seconds": ("histogram", ("route",)),
    "attnserve_time_to_first_token_seconds": ("histogram", ()),
    "attnserve_inter_token_latency_seconds": ("histogram", ()),
    "attnserve_queue_time_seconds": ("histogram", ()),
    "attnserve_engine_step_duration_seconds": ("histogram", ()),
    "attnserve_batch_size": ("histogram", ()),
    "attnserve_embed_batch_size": ("histogram", ("model",)),
    "attnserve_build_info": ("info", ("version", "model", "device", "dtype")),
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def observed_server(request) -> ServerProcess:
    llama = request.getfixturevalue("tiny_llama")
    return shared_server(request, "observed", ["--model", str(llama), *OBSERVED_ARGS], api_key=API_KEY)


class Prometheus:
    """A real Prometheus on 127.0.0.1 with temporary storage, scraping one attnserve every 1 s
    with the job of deploy/prometheus/prometheus.yml."""

    def __init__(self, binary: str, target: str):
        self.binary, self.port = binary, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="attnserve-prometheus-"))
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "attnserve"]
        job["static_configs"] = [{"targets": [target]}]
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Prometheus":
        log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout}s:\n{self.logs()}")

    def api(self, path: str, **params) -> dict:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else math.nan

    def logs(self) -> str:
        path = self.dir / "prometheus.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class LoadRun:
    server: ServerProcess
    prometheus: Prometheus | None
    prometheus_missing: str
    locust_rc: int
    locust_output: str
    reports: Path
    stats: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0

    def require_prometheus(self) -> Prometheus:
        if self.prometheus is None:
            if in_ci():
                pytest.fail(f"CI needs a real Prometheus: {self.prometheus_missing}")
            pytest.skip(self.prometheus_missing)
        return self.prometheus


_runs: list[LoadRun] = []


def observed_load(request) -> LoadRun:
    if not _runs:
        _runs.append(_run_load(request))
    return _runs[0]


def _run_load(request) -> LoadRun:
    server = observed_server(request)
    prometheus, missing = None, ""
    binary = shutil.which("prometheus")
    if binary is None:
        missing = ("no `prometheus` binary on PATH (Debian: apt-get install prometheus; "
                   ".ci/run installs it)")
    else:
        prometheus = Prometheus(binary, f"127.0.0.1:{server.port}").start()
        request.config.add_cleanup(prometheus.stop)
        _wait_for(lambda: prometheus.value('up{job="attnserve"}') == 1, 20, "the first scrape")
    reports = Path(tempfile.mkdtemp(prefix="attnserve-loadtest-"))
    request.config.add_cleanup(lambda: shutil.rmtree(reports, ignore_errors=True))
    started = time.time()
    # The Makefile's own target, without re-running its install step.
    result = subprocess.run(
        ["make", "-s", "-o", "install-test", "loadtest", f"VENV={sys.prefix}", "HOST=127.0.0.1",
         f"PORT={server.port}", f"LOADTEST_USERS={LOAD['users']}", f"LOADTEST_SPAWN_RATE={LOAD['spawn_rate']}",
         f"LOADTEST_TIME={LOAD['seconds']}s", f"LOADTEST_OUT={reports / 'loadtest'}",
         f"LOADTEST_ARGS=--max-new-tokens {LOAD['max_new_tokens']}"],
        cwd=REPO, env={**os.environ, "LOCUST_ATTNSERVE_API_KEY": API_KEY},
        capture_output=True, text=True, timeout=LOAD["seconds"] + 60)
    ended = time.time()
    run = LoadRun(server, prometheus, missing, result.returncode, result.stdout + result.stderr, reports,
                  started=started, ended=ended)
    stats_file = reports / "loadtest_stats.csv"
    if stats_file.exists():
        with open(stats_file, newline="") as f:
            run.stats = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    if prometheus is not None:                  # Prometheus has scraped everything the load did
        server.wait_idle(10)
        total = server.metric("attnserve_requests_total", route="/generate")
        _wait_for(lambda: prometheus.value('sum(attnserve_requests_total{route="/generate"})') == total,
                  20, "a scrape after the load")
    return run


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)
