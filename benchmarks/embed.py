"""Embedding throughput: attnserve's HTTP /embed under many one-sentence clients against
sentence-transformers encode() in-process, on the same sentences, in one run.

    python -m benchmarks.embed --json embed.json          # 2,000 sentences, 32 clients
    python -m benchmarks.embed --batch-wait-ms 0,2,5 --max-batch-tokens 2048,16384   # a sweep
    python -m benchmarks.embed --url http://127.0.0.1:8000  # a server that is already running

The sentences (benchmarks/sentences.py) are 70% short (3-12 words) and 30% long (40-120),
shuffled. sentence-transformers encodes them all with batch_size 32 and with batch_size 1.
Then our server (started here, one per configuration, unless --url) gets them from --clients
closed-loop clients sharing one keep-alive HTTP/1.1 pool, each POSTing one sentence per
/embed request; throughput is sentences / wall time. Meanwhile a probe client sends one short
sentence at a time: its latencies are those of "a short sentence under load". Every HTTP
vector is compared with sentence-transformers' batch-32 vector (cosine). After the load, a
lone client sends short sentences one at a time to the idle server: "a lone short sentence",
compared with sentence-transformers' batch-1 time per short sentence.

Targets (issue 13): the clients' rate >= 0.9x sentence-transformers' batch-32 rate; a lone
short sentence's p50 <= 2x sentence-transformers' batch-1 time for a short sentence. CPU time
per sentence is given for both sides (process CPU time): on a machine others are using, the
rates move with their load, CPU per sentence much less. The clients run in
this process, on the same cores as the server: --client raw swaps httpx for a minimal HTTP/1.1
client that costs a tenth of the CPU per request (--client httpx,raw measures both).

The server is embeddings-only (`--model none`); --batch-wait-ms, --max-batch-tokens and
--max-batch-size are its flags of the same names; --server-threads starts it through a bootstrap
that sets the encoder's torch threads (benchmark-only: the service has no flag for it);
--omp-wait-policy sets the server's OMP_WAIT_POLICY. Each of them,
--clients and --client take a comma list; every combination gets a row, and every combination
of server settings its own server.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import machine
from benchmarks.peers.launch import free_port, repo_env, wait_ready
from benchmarks.peers.launch import stop as stop_process
from benchmarks.sentences import is_long, mixed_sentences, short_sentences

REPO = Path(__file__).resolve().parent.parent
EMBEDDING_MODEL = "all-minilm-l6-v2"
TARGETS = {"vs_st_batch32": 0.9, "lone_vs_st_batch1": 2.0, "min_cosine": 0.99999}
# --server-threads: sets the encoder's torch threads, then runs `python -m service` (the
# service has no flag for it; its encoder thread takes every core by default).
_BOOTSTRAP = """import dataclasses, os, sys
from service.settings import Settings
encoder_config = Settings.encoder_config
threads = int(os.environ["ATTNSERVE_BENCH_THREADS"])
Settings.encoder_config = lambda self: dataclasses.replace(encoder_config(self), num_threads=threads)
from service.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass(frozen=True)
class ServerConfig:
    """One row of the sweep. None means the server's own default."""
    clients: int
    client: str = "httpx"                 # httpx | raw
    batch_wait_ms: float | None = None
    max_batch_tokens: int | None = None
    max_batch_size: int | None = None
    threads: int | None = None
    omp_wait_policy: str | None = None    # the server's OMP_WAIT_POLICY: active | passive

    @property
    def encoder_knobs(self) -> dict:
        knobs = dict(batch_wait_ms=self.batch_wait_ms, max_batch_tokens=self.max_batch_tokens,
                     max_batch_size=self.max_batch_size)
        return {k: v for k, v in knobs.items() if v is not None}

    @property
    def label(self) -> str:
        knobs = {**self.encoder_knobs, "threads": self.threads, "OMP_WAIT_POLICY": self.omp_wait_policy}
        knobs = [f"{k}={v}" for k, v in knobs.items() if v is not None]
        return f"attnserve /embed, {self.clients} {self.client} clients" + (f" ({', '.join(knobs)})" if knobs else "")


@dataclass
class LoadResult:
    wall_s: float
    latencies_s: list[float]              # one per sentence, in sentence order
    vectors: list[list[float]]
    probe_latencies_s: list[float]
    counters: dict = field(default_factory=dict)   # what changed over the load, see `snapshot`
    lone_latencies_s: list[float] = field(default_factory=list)   # short sentences, one at a time, idle


class ServerProcess:
    """`python -m service` (or the knob bootstrap) on 127.0.0.1 and a free port."""

    def __init__(self, config: ServerConfig, llm_args: list[str], extra_args: list[str], log_level: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        knobs = [arg for name, value in config.encoder_knobs.items()
                 for arg in ("--" + name.replace("_", "-"), str(value))]
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--embedding-model", EMBEDDING_MODEL,
                "--log-level", log_level, *llm_args, *knobs, *extra_args]
        self.command = [sys.executable, *(["-c", _BOOTSTRAP] if config.threads else ["-m", "service"]), *args]
        self.env = repo_env()
        if config.threads is not None:
            self.env["ATTNSERVE_BENCH_THREADS"] = str(config.threads)
            self.env["OMP_NUM_THREADS"] = self.env["MKL_NUM_THREADS"] = str(config.threads)
        if config.omp_wait_policy is not None:
            self.env["OMP_WAIT_POLICY"] = config.omp_wait_policy
        self.log_path = Path(tempfile.mkstemp(prefix="attnserve-embed-bench-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_ready(self.proc, self.url + "/ready", timeout, self.log_path)
        return self

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far: the whole server, and its main thread (the event
        loop, where HTTP parsing, validation and JSON happen). Linux only; else empty."""
        tick = os.sysconf("SC_CLK_TCK")

        def seconds(stat: Path) -> float:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick
        try:
            pid = self.proc.pid
            return {"server_cpu_s": seconds(Path(f"/proc/{pid}/stat")),
                    "event_loop_cpu_s": seconds(Path(f"/proc/{pid}/task/{pid}/stat"))}
        except (OSError, IndexError, ValueError):
            return {}

    def stop(self) -> None:
        """SIGTERM (drains); the log is kept only if the server did not exit cleanly."""
        if self.proc is not None:
            stop_process(self.proc, timeout=60)
        if self.proc is not None and self.proc.returncode == 0:
            self.log_path.unlink(missing_ok=True)
        elif self.proc is not None:
            print(f"server exited with {self.proc.returncode}; its log: {self.log_path}", file=sys.stderr)


# --- the HTTP load ---

class RawConnection:
    """One keep-alive HTTP/1.1 connection that speaks just enough for POST /embed: a tenth of
    httpx's client CPU per request, which shares the cores with the server (--client raw)."""

    def __init__(self, url: str):
        self.url = httpx.URL(url)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.url.host, self.url.port)
        self.writer.write(b"POST /embed HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (self.url.netloc, len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)
        if length is None:
            raise RuntimeError(f"an answer without Content-Length: {head[:500]!r}")
        return int(head.split(b" ", 2)[1]), await self.reader.readexactly(int(length.group(1)))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextlib.asynccontextmanager
async def open_senders(url: str, kind: str, num: int):
    """`num` async send(body) -> (status, body) functions: httpx (one shared keep-alive pool
    of `num` connections) or raw (a RawConnection each)."""
    if kind == "httpx":
        limits = httpx.Limits(max_connections=num, max_keepalive_connections=num)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
            async def send(body: bytes) -> tuple[int, bytes]:
                response = await client.post("/embed", content=body, headers={"Content-Type": "application/json"})
                return response.status_code, response.content
            yield [send] * num
        return
    connections = [RawConnection(url) for _ in range(num)]
    try:
        yield [connection.post for connection in connections]
    finally:
        for connection in connections:
            connection.close()


async def embed_one(send, text: str) -> tuple[list[float], float]:
    body = json.dumps({"inputs": text, "normalize": True, "truncate": True}).encode()
    started = time.perf_counter()
    status, content = await send(body)
    latency = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"/embed answered {status}: {content[:500]!r}")
    (vector,) = json.loads(content)
    return vector, latency


async def run_load(url: str, sentences: list[str], num_clients: int, probe_texts: list[str],
                   probe_pause_s: float, warmup: list[str], snapshot=lambda: {},
                   client: str = "httpx") -> LoadResult:
    """num_clients closed-loop clients take the sentences in order, one per request, while a
    probe sends probe_texts one at a time (pausing probe_pause_s between them). `snapshot()`
    (a dict of counters) is taken after the warm-up and when the last sentence is answered."""
    async with open_senders(url, client, num_clients + 1) as senders:
        warm = iter(warmup)                            # opens every connection once

        async def warm_client(send):
            for text in warm:
                await embed_one(send, text)
        await asyncio.gather(*map(warm_client, senders))

        vectors: list = [None] * len(sentences)
        latencies = [0.0] * len(sentences)
        next_index = iter(range(len(sentences)))      # shared: each client takes the next sentence
        done = asyncio.Event()

        async def load_client(send):
            for i in next_index:
                vectors[i], latencies[i] = await embed_one(send, sentences[i])

        async def probe(send) -> list[float]:
            seen = []
            for text in itertools.cycle(probe_texts):
                if done.is_set():
                    return seen
                seen.append((await embed_one(send, text))[1])
                try:
                    await asyncio.wait_for(done.wait(), probe_pause_s)
                except TimeoutError:
                    pass
            return seen

        before = snapshot()
        probing = asyncio.ensure_future(probe(senders[-1]))
        started = time.perf_counter()
        await asyncio.gather(*map(load_client, senders[:-1]))
        wall = time.perf_counter() - started
        after = snapshot()
        done.set()
        counters = {key: after[key] - before[key] for key in before.keys() & after.keys()}
        return LoadResult(wall, latencies, vectors, await probing, counters)


async def lone_latencies(url: str, texts: list[str], client: str = "httpx") -> list[float]:
    """One client, one short sentence at a time, nothing else running: each one's latency."""
    async with open_senders(url, client, 1) as (send,):
        await embed_one(send, texts[0])                # the connection, opened
        return [(await embed_one(send, text))[1] for text in texts]


def embed_batch_totals(url: str) -> dict[str, float]:
    """The server's attnserve_embed_batch_size histogram: batches and inputs so far."""
    text = httpx.get(url + "/metrics", timeout=10).text
    totals = {"sum": 0.0, "count": 0.0}               # summed over the model label
    for kind, value in re.findall(r"^attnserve_embed_batch_size_(sum|count)(?:\{[^}]*\})? (\S+)$", text, re.M):
        totals[kind] += float(value)
    return {"batched_inputs": totals["sum"], "batches": totals["count"]}


def measure_server(url: str, server: ServerProcess | None, sentences: list[str], config: ServerConfig,
                   probe_texts: list[str], probe_pause_s: float, warmup: list[str]) -> LoadResult:
    def snapshot() -> dict[str, float]:
        return {"client_cpu_s": time.process_time(), **(server.cpu_seconds() if server else {}),
                **embed_batch_totals(url)}
    result = asyncio.run(run_load(url, sentences, config.clients, probe_texts, probe_pause_s, warmup,
                                  snapshot, config.client))
    result.lone_latencies_s = asyncio.run(lone_latencies(url, probe_texts[:50], config.client))
    return result


# --- sentence-transformers, statistics ---

def st_encode(model, sentences: list[str], batch_size: int) -> tuple[dict[str, float], np.ndarray]:
    """sentences/s of model.encode(batch_size=...) over all, the short and the long sentences,
    the CPU milliseconds per sentence ("cpu_ms"), and the normalized vectors. Short and long
    are two calls: encode() sorts by length anyway, so together they take what one call takes,
    and each class gets its own rate."""
    warm = model.encode(sentences[: 2 * batch_size], batch_size=batch_size, show_progress_bar=False)
    vectors = np.zeros((len(sentences), warm.shape[1]), dtype=np.float32)
    seconds, cpu_started = {}, time.process_time()
    for kind in ("short", "long"):
        rows = [i for i, text in enumerate(sentences) if is_long(text) == (kind == "long")]
        if rows:
            started = time.perf_counter()
            vectors[rows] = model.encode([sentences[i] for i in rows], batch_size=batch_size,
                                         normalize_embeddings=True, show_progress_bar=False)
            seconds[kind] = (len(rows), time.perf_counter() - started)
    cpu_ms = 1000 * (time.process_time() - cpu_started) / len(sentences)
    rates = {kind: num / elapsed for kind, (num, elapsed) in seconds.items()}
    return {"all": len(sentences) / sum(elapsed for _, elapsed in seconds.values()), **rates,
            "cpu_ms": cpu_ms}, vectors


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def latency_ms(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    p50, p90, p99 = np.percentile(np.asarray(values) * 1000, [50, 90, 99])
    return {"n": len(values), "p50": round(float(p50), 1), "p90": round(float(p90), 1), "p99": round(float(p99), 1),
            "max": round(max(values) * 1000, 1)}


def median_run(runs: list, rate) -> tuple[int, float]:
    """(index, rate) of the run with the median rate (the lower middle for even counts)."""
    order = sorted(range(len(runs)), key=lambda i: rate(runs[i]))
    index = order[(len(order) - 1) // 2]
    return index, rate(runs[index])


def server_load(run: LoadResult, num_requests: int) -> dict:
    """Batching and CPU over the load: inputs per batch, cores busy, CPU ms per request."""
    counters, out = run.counters, {}
    if counters.get("batches"):
        out["mean_batch_size"] = round(counters["batched_inputs"] / counters["batches"], 1)
    for key in ("server_cpu_s", "event_loop_cpu_s", "client_cpu_s"):
        if key in counters:
            name = key.removesuffix("_cpu_s")
            out[f"{name}_cores_busy"] = round(counters[key] / run.wall_s, 2)
            out[f"{name}_cpu_ms_per_request"] = round(1000 * counters[key] / num_requests, 2)
    return out


# --- the run ---

def configs_of(args) -> list[list[ServerConfig]]:
    """The sweep, one list per server: configurations that differ only in their clients share it."""
    servers = itertools.product(args.batch_wait_ms, args.max_batch_tokens, args.max_batch_size, args.server_threads,
                                args.omp_wait_policy)
    return [[ServerConfig(clients, client, *knobs) for clients, client in itertools.product(args.clients, args.client)]
            for knobs in servers]


def summarize(config: ServerConfig, runs: list[LoadResult], sentences: list[str], reference: np.ndarray,
              st32: float, st1: float, num_tokens: int, st1_short_ms: float | None = None) -> dict:
    """One row: the median run's rate and latencies, every run's cosines."""
    index, rate = median_run(runs, lambda run: len(sentences) / run.wall_s)
    run = runs[index]
    short = [lat for lat, text in zip(run.latencies_s, sentences) if not is_long(text)]
    lone = latency_ms(run.lone_latencies_s)
    return {
        "config": {**asdict(config), "label": config.label}, "sent_s": round(rate, 1),
        "tok_s": round(num_tokens / run.wall_s), "all_rates": [round(len(sentences) / r.wall_s, 1) for r in runs],
        "vs_st_batch32": round(rate / st32, 3), "vs_st_batch1": round(rate / st1, 2),
        "min_cosine": float(min(cosines(r.vectors, reference).min() for r in runs)),
        "latency_ms": latency_ms(run.latencies_s), "short_latency_ms": latency_ms(short),
        "probe_latency_ms": latency_ms(run.probe_latencies_s), "lone_latency_ms": lone,
        "lone_vs_st_batch1": round(lone["p50"] / st1_short_ms, 2) if st1_short_ms and lone["n"] else None,
        **server_load(run, len(sentences)),
    }


def run_benchmark(args) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from engine.loader import resolve_model_path

    if args.st_threads:
        torch.set_num_threads(args.st_threads)
    sentences = mixed_sentences(args.num_sentences, seed=args.seed)
    probe_texts = short_sentences(200, seed=args.seed + 1)
    warmup = short_sentences(args.warmup, seed=args.seed + 2)
    model = SentenceTransformer(str(resolve_model_path(EMBEDDING_MODEL)), device="cpu")
    num_tokens = sum(map(len, model.tokenizer(sentences)["input_ids"]))
    num_long = sum(map(is_long, sentences))

    st32_runs = [st_encode(model, sentences, 32) for _ in range(args.repeats)]
    st32_index, st32 = median_run(st32_runs, lambda run: run[0]["all"])
    reference = st32_runs[0][1]
    st1_sentences = sentences[: args.st_batch1_sentences or len(sentences)]
    st1_runs = [st_encode(model, st1_sentences, 1) for _ in range(args.repeats)]
    st1_index, st1 = median_run(st1_runs, lambda run: run[0]["all"])
    st1_vs_32 = cosines(st1_runs[0][1], reference[: len(st1_sentences)]).min()

    st1_short = st1_runs[st1_index][0].get("short")
    st1_short_ms = 1000 / st1_short if st1_short else None
    results = {"machine": machine(), "torch_threads": torch.get_num_threads(),
               "num_sentences": len(sentences), "num_long": num_long, "num_tokens": num_tokens,
               "st_batch32_sent_s": round(st32, 1), "st_batch1_sent_s": round(st1, 1),
               "st_batch32_cpu_ms_per_sentence": round(st32_runs[st32_index][0]["cpu_ms"], 2),
               "st_batch1_short_ms": round(st1_short_ms, 1) if st1_short_ms else None,
               "st_batch1_sentences": len(st1_sentences),
               "st_by_length_sent_s": {f"batch{b}_{kind}": round(rate, 1) for b, rates in
                                       ((32, st32_runs[st32_index][0]), (1, st1_runs[st1_index][0]))
                                       for kind, rate in rates.items() if kind not in ("all", "cpu_ms")},
               "st_batch1_vs_batch32_min_cosine": float(st1_vs_32), "targets": TARGETS, "servers": []}
    for group in configs_of(args):
        server = None
        if args.url is None:
            server = ServerProcess(group[0], args.llm_args.split(), args.server_arg, args.server_log_level).start()
        try:
            for config in group:
                runs = [measure_server(args.url or server.url, server, sentences, config, probe_texts,
                                       args.probe_pause_ms / 1000, warmup) for _ in range(args.repeats)]
                results["servers"].append(summarize(config, runs, sentences, reference, st32, st1, num_tokens,
                                                    st1_short_ms))
        finally:
            if server is not None:
                server.stop()
    return results


def report(results: dict) -> None:
    st32, st1, n = results["st_batch32_sent_s"], results["st_batch1_sent_s"], results["num_sentences"]
    print(f"machine: {results['machine']}; torch threads (sentence-transformers): {results['torch_threads']}")
    print(f"sentences: {n} ({n - results['num_long']} short of 3-12 words, {results['num_long']} long of "
          f"40-120), {results['num_tokens']} tokens; model {EMBEDDING_MODEL}, fp32 CPU")
    print(f"{'system':<72}{'sent/s':>9}{'tok/s':>8}{'vs ST b32':>11}{'vs ST b1':>10}")
    tok_per_sent = results["num_tokens"] / n
    print(f"{'sentence-transformers encode(batch_size=32)':<72}{st32:>9.1f}{st32 * tok_per_sent:>8.0f}"
          f"{1:>10.2f}x{st32 / st1:>9.2f}x")
    st32_cpu = results.get("st_batch32_cpu_ms_per_sentence")
    subset = results["st_batch1_sentences"]
    st1_label = "sentence-transformers encode(batch_size=1)" + (f", first {subset}" if subset < n else "")
    print(f"{st1_label:<72}{st1:>9.1f}{'':>8}{st1 / st32:>10.2f}x{1:>9.2f}x")
    for row in results["servers"]:
        print(f"{row['config']['label']:<72}{row['sent_s']:>9.1f}{row['tok_s']:>8}"
              f"{row['vs_st_batch32']:>10.2f}x{row['vs_st_batch1']:>9.2f}x")
    by_length = results["st_by_length_sent_s"]
    print("sentence-transformers by length, sent/s: " + ", ".join(f"{k} {v}" for k, v in by_length.items())
          + f"; batch 1 vs batch 32 min cosine {results['st_batch1_vs_batch32_min_cosine']:.7f}")
    print(f"sentence-transformers batch 32: {st32_cpu} ms CPU per sentence; batch 1: "
          f"{results.get('st_batch1_short_ms')} ms per short sentence")
    for row in results["servers"]:
        lat, short, probe = row["latency_ms"], row["short_latency_ms"], row["probe_latency_ms"]
        print(f"\n{row['config']['label']}: runs {row['all_rates']} sent/s")
        print(f"  short sentence under load (probe, n={probe['n']}): p50 {probe.get('p50')} ms, "
              f"p99 {probe.get('p99')} ms")
        lone = row["lone_latency_ms"]
        print(f"  a lone short sentence (n={lone['n']}): p50 {lone.get('p50')} ms, p99 {lone.get('p99')} ms: "
              f"{row['lone_vs_st_batch1']}x sentence-transformers' batch-1 time")
        print(f"  load requests: all p50 {lat['p50']} / p99 {lat['p99']} ms; "
              f"short ones p50 {short.get('p50')} / p99 {short.get('p99')} ms")
        print(f"  server: {row.get('mean_batch_size')} inputs per encoder batch; {row.get('server_cores_busy')} "
              f"cores busy ({row.get('server_cpu_ms_per_request')} ms CPU per request), of which the event loop "
              f"{row.get('event_loop_cores_busy')} "
              f"({row.get('event_loop_cpu_ms_per_request')} ms CPU per request); client "
              f"{row['client_cores_busy']} cores busy ({row['client_cpu_ms_per_request']} ms per request)")
        lone_ok = row["lone_vs_st_batch1"] is not None and row["lone_vs_st_batch1"] <= TARGETS["lone_vs_st_batch1"]
        ok = [row["vs_st_batch32"] >= TARGETS["vs_st_batch32"], lone_ok, row["min_cosine"] > TARGETS["min_cosine"]]
        print(f"  min cosine vs sentence-transformers over {n}: {row['min_cosine']:.7f}; targets "
              f"(>= {TARGETS['vs_st_batch32']}x b32 rate, lone p50 <= {TARGETS['lone_vs_st_batch1']}x b1 time, "
              f"cosine > {TARGETS['min_cosine']}): {', '.join('met' if x else 'MISSED' for x in ok)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list:
        return [None if part in ("", "default") else int(part) for part in text.split(",")]

    def floats(text: str) -> list:
        return [None if part in ("", "default") else float(part) for part in text.split(",")]

    def policies(text: str) -> list:
        values = [None if part in ("", "default") else part.lower() for part in text.split(",")]
        if not set(values) <= {None, "active", "passive"}:
            raise argparse.ArgumentTypeError(f"OMP_WAIT_POLICY is active or passive, got {text!r}")
        return values

    def clients(text: str) -> list[str]:
        kinds = text.split(",")
        if not set(kinds) <= {"httpx", "raw"}:
            raise argparse.ArgumentTypeError(f"clients are httpx or raw, got {text!r}")
        return kinds

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-sentences", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=ints, default=[32], help="concurrent clients (comma list)")
    parser.add_argument("--batch-wait-ms", type=floats, default=[None], help="EncoderEngine batch_wait_ms (list)")
    parser.add_argument("--max-batch-tokens", type=ints, default=[None], help="EncoderEngine max_batch_tokens (list)")
    parser.add_argument("--max-batch-size", type=ints, default=[None], help="EncoderEngine max_batch_size (list)")
    parser.add_argument("--server-threads", type=ints, default=[None], help="the server's torch threads (list)")
    parser.add_argument("--omp-wait-policy", type=policies, default=[None],
                        help="the server's OMP_WAIT_POLICY: active, passive or default (list); passive stops "
                             "idle OpenMP threads spinning on cores the event loop and clients need")
    parser.add_argument("--st-threads", type=int, help="torch threads for sentence-transformers (default: torch's)")
    parser.add_argument("--st-batch1-sentences", type=int, default=0,
                        help="sentences for the slow batch_size=1 leg (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each leg; the median is reported")
    parser.add_argument("--warmup", type=int, default=64, help="short sentences sent before timing")
    parser.add_argument("--probe-pause-ms", type=float, default=20.0, help="the probe's pause between requests")
    parser.add_argument("--client", type=clients, default=["httpx"],
                        help="httpx (httpx.AsyncClient) and/or raw (a minimal asyncio HTTP/1.1 client, a tenth "
                             "of the client CPU): a comma list")
    parser.add_argument("--url", help="measure this running server instead of starting one")
    parser.add_argument("--llm-args", default="--model none",
                        help="the server's generation-model flags (default: none, an embeddings-only server)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="=--FLAG=VALUE",
                        help="another flag for the server (repeatable; write --server-arg=--x=y)")
    parser.add_argument("--server-log-level", default="info",
                        help="the server's --log-level (its default, info, logs a line per request)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    knobs = [args.batch_wait_ms, args.max_batch_tokens, args.max_batch_size, args.server_threads,
             args.omp_wait_policy]
    if args.url and any(value != [None] for value in knobs):
        parser.error("--url measures a running server: its batching knobs cannot be set from here")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run_benchmark(args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
