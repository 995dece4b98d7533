"""Issue 18's targets on the default model, one server, one run:

    python -m benchmarks.hostile_load [--server-args "..."] [--url http://127.0.0.1:PORT]

1. Tokenizer flood: 20 clients (threads of a process of their own) each send 1 MB `/tokenize`
   bodies back to back for --flood-s seconds while one prober calls `/health` every 50 ms and
   another sends a 2-token `/generate` every 0.5 s. Prints `/health` p50 / p99 and the 2-token
   latency p50 / max (targets: `/health` p99 < 100 ms, the small request < 1 s).
2. Starvation: one client sends the largest request the server's limits allow here (4 prompts x
   n = max_num_seqs / 4, 256 tokens each, EOS ignored), alone, then again with a second client
   sending 4-token requests one after another. Prints the big request's tokens/s in both runs and
   the small requests' latency (target: the small one within 5 s; the big one's rate within 10% of
   the server's before the fairness change, which is measured by pointing --url at that server).

--url skips starting a server (measure another build, e.g. an older commit, on the same machine).
"""
from __future__ import annotations

import argparse
import multiprocessing
import shlex
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from benchmarks.common import machine
from benchmarks.peers.launch import free_port, serve

ONE_MB_TEXT = "The quick brown fox jumps over the lazy dog. " * (1_000_000 // 45)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def flood(url: str, seconds: float, clients: int, statuses) -> None:
    """`clients` threads sending 1 MB /tokenize bodies back to back; their statuses into `statuses`."""
    stop = threading.Event()
    answers: list[int] = []

    def one_client() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                answers.append(client.post(url + "/tokenize", json={"inputs": ONE_MB_TEXT}).status_code)

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    statuses.put(answers)


def tokenizer_flood(url: str, seconds: float, clients: int) -> dict:
    # The flood runs in a process of its own: its 20 threads would otherwise hold this
    # process's lock and slow the probes' own clocks, not the server's answers.
    statuses = multiprocessing.get_context("spawn").Queue()
    flooder = multiprocessing.get_context("spawn").Process(target=flood, args=(url, seconds, clients, statuses))
    flooder.start()
    stop = threading.Event()
    health_ms, small_ms = [], []

    def probe_health() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get(url + "/health").raise_for_status()
                health_ms.append(1e3 * (time.perf_counter() - started))
                time.sleep(0.05)

    def probe_generate() -> None:
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.post(url + "/generate", json=body).raise_for_status()
                small_ms.append(1e3 * (time.perf_counter() - started))
                time.sleep(0.5)

    with ThreadPoolExecutor(2) as pool:
        warm_up = min(1.0, seconds / 4)                 # the flood under way first
        time.sleep(warm_up)
        futures = [pool.submit(probe_health), pool.submit(probe_generate)]
        time.sleep(seconds - warm_up)
        stop.set()
        for future in futures:
            future.result()
    flood_answers = statuses.get(timeout=300)
    flooder.join()
    return {"health_p50_ms": statistics.median(health_ms), "health_p99_ms": percentile(health_ms, 0.99),
            "generate_2tok_p50_ms": statistics.median(small_ms), "generate_2tok_max_ms": max(small_ms),
            "tokenize_200": flood_answers.count(200), "tokenize_429": flood_answers.count(429),
            "tokenize_other": len(flood_answers) - flood_answers.count(200) - flood_answers.count(429)}


def big_request(url: str, max_num_seqs: int, max_tokens: int) -> tuple[float, int]:
    prompts = ["The history of the city", "Once upon a time", "The recipe calls for", "In the beginning"]
    body = {"prompt": prompts, "n": max(1, max_num_seqs // len(prompts)), "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 1.0, "seed": 0}
    started = time.perf_counter()
    answer = httpx.post(url + "/v1/completions", json=body, timeout=3600)
    answer.raise_for_status()
    return time.perf_counter() - started, answer.json()["usage"]["completion_tokens"]


def starvation(url: str, max_tokens: int) -> dict:
    max_num_seqs = httpx.get(url + "/info", timeout=10).json()["max_num_seqs"]
    alone_s, tokens = big_request(url, max_num_seqs, max_tokens)
    stop, small_s = threading.Event(), []

    def small_client() -> None:
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 4}}
        with httpx.Client(timeout=600) as client:
            while not stop.is_set() and client.get(url + "/info").json()["num_requests_running"] == 0:
                time.sleep(0.01)                         # the big request is admitted first
            while not small_s or not stop.is_set():
                started = time.perf_counter()
                client.post(url + "/generate", json=body).raise_for_status()
                small_s.append(time.perf_counter() - started)

    thread = threading.Thread(target=small_client)
    thread.start()
    shared_s, _ = big_request(url, max_num_seqs, max_tokens)
    stop.set()
    thread.join()
    return {"sequences": max_num_seqs, "tokens": tokens, "big_alone_tok_s": tokens / alone_s,
            "big_shared_tok_s": tokens / shared_s, "small_requests": len(small_s),
            "small_p50_s": statistics.median(small_s), "small_max_s": max(small_s)}


def measure(url: str, args) -> None:
    flood = tokenizer_flood(url, args.flood_s, args.flood_clients)
    print(f"tokenizer flood ({args.flood_clients} clients x 1 MB /tokenize, {args.flood_s:.0f} s): "
          f"/health p50 {flood['health_p50_ms']:.1f} ms, p99 {flood['health_p99_ms']:.1f} ms (target < 100); "
          f"2-token /generate p50 {flood['generate_2tok_p50_ms']:.0f} ms, max {flood['generate_2tok_max_ms']:.0f} ms "
          f"(target < 1000); /tokenize answers: {flood['tokenize_200']} x 200, {flood['tokenize_429']} x 429, "
          f"{flood['tokenize_other']} other", flush=True)
    starved = starvation(url, args.max_tokens)
    print(f"starvation ({starved['sequences']} sequences x {args.max_tokens} tokens in one request): "
          f"big request alone {starved['big_alone_tok_s']:.1f} tok/s, beside a small client "
          f"{starved['big_shared_tok_s']:.1f} tok/s; {starved['small_requests']} small requests, "
          f"p50 {starved['small_p50_s']:.2f} s, max {starved['small_max_s']:.2f} s (target < 5)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-args", default="", help="extra flags for `python -m service`")
    parser.add_argument("--url", default=None, help="measure a server that is already running")
    parser.add_argument("--flood-s", type=float, default=30.0)
    parser.add_argument("--flood-clients", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    if args.url:
        measure(args.url, args)
        return
    port = free_port()
    command = [sys.executable, "-m", "service", "--port", str(port), *shlex.split(args.server_args)]
    with serve(command, port, ready_path="/ready") as url:
        measure(url, args)


if __name__ == "__main__":
    main()
