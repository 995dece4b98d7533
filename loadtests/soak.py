"""Soak: a server under saturating load for a long while, with its memory and latency watched.

    python loadtests/soak.py [--duration 600] [--users 48] [--model NAME] [--out reports/soak.json]
    make soak                      # 10 minutes on the default models; SOAK_TIME=60 for CI's length

It starts `python -m service` on a free port (--max-num-seqs 16, --max-queue 16: more users than
that always keeps the engine full and the queue at its bound), runs the users of
loadtests/locustfile.py against it (generate, stream, chat stream, embed) with locust as a
library, and samples the server's RSS every 2 s. After the run, the server must be idle:
nothing running or waiting, every KV block free, /health 200.

Pass (exit 0) when
  - no request failed, except 429s (the queue at its bound: refused at once, by design);
  - RSS grew less than 5% from the first window after warm-up to the last window;
  - the p99 latency of the last window is within 1.5x that of the first.
Warm-up: the first min(60 s, duration / 6); windows: min(60 s, a third of the rest). Figures go
to stdout and, as JSON, to --out.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import gevent  # noqa: E402
import httpx  # noqa: E402
import psutil  # noqa: E402
from locust.env import Environment  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "loadtests"), str(REPO)]
import locustfile  # noqa: E402

from benchmarks.peers.launch import free_port, repo_env, stop, wait_ready  # noqa: E402

MAX_RSS_GROWTH = 0.05
MAX_P99_RATIO = 1.5


def start_server(args, port: int, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--model", args.model,
               "--max-num-seqs", str(args.max_num_seqs), "--max-queue", str(args.max_queue),
               "--kv-cache-memory", args.kv_cache_memory, *args.server_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=repo_env())
    wait_ready(proc, f"http://127.0.0.1:{port}/ready", 300, log_path)
    return proc


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) >= 2 else float("nan")


def run(args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(args.out).with_suffix(".server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server = start_server(args, port, log_path)
    try:
        return soak(args, url, psutil.Process(server.pid), log_path)
    finally:
        stop(server, timeout=60)


def soak(args, url: str, server: psutil.Process, log_path: Path) -> dict:
    requests: list[tuple[float, str, float, int | None, str | None]] = []   # (t, name, ms, status, error)
    rss: list[tuple[float, int]] = []
    env = Environment(user_classes=[locustfile.GenerateUser, locustfile.StreamUser, locustfile.ChatStreamUser,
                                    locustfile.EmbedUser], host=url)
    env.parsed_options = SimpleNamespace(max_new_tokens=args.max_new_tokens, attnserve_api_key="")
    started = time.monotonic()

    def on_request(request_type, name, response_time, response=None, exception=None, **_):
        if request_type == "TTFT":
            return
        status = getattr(response, "status_code", None)
        requests.append((time.monotonic() - started, f"{request_type} {name}", response_time, status,
                         None if exception is None else f"{type(exception).__name__}: {str(exception)[:200]}"))
    env.events.request.add_listener(on_request)

    def sample_rss():
        while True:
            rss.append((time.monotonic() - started, server.memory_info().rss))
            gevent.sleep(2)

    runner = env.create_local_runner()
    sampler = gevent.spawn(sample_rss)
    runner.start(args.users, spawn_rate=args.users)
    gevent.spawn_later(args.duration, runner.quit)
    runner.greenlet.join()
    sampler.kill()
    elapsed = time.monotonic() - started

    warmup = min(60.0, args.duration / 6)
    window = min(60.0, (args.duration - warmup) / 3)
    first, last = (warmup, warmup + window), (args.duration - window, args.duration)

    def inside(t, span):
        return span[0] <= t < span[1]

    ok = [r for r in requests if r[4] is None]
    refused = [r for r in requests if r[4] is not None and r[3] == 429]
    failed = [r for r in requests if r[4] is not None and r[3] != 429]
    rss_first = statistics.median(v for t, v in rss if inside(t, first))
    rss_last = statistics.median(v for t, v in rss if inside(t, last))
    p99_first = p99([ms for t, _, ms, _, _ in ok if inside(t, first)])
    p99_last = p99([ms for t, _, ms, _, _ in ok if inside(t, last)])
    idle = _idle(url)
    report = {
        "duration_s": round(elapsed, 1), "users": args.users, "model": args.model,
        "max_num_seqs": args.max_num_seqs, "max_queue": args.max_queue, "max_new_tokens": args.max_new_tokens,
        "requests": len(requests), "ok": len(ok), "refused_429": len(refused), "failed": len(failed),
        "failures": sorted({f"{r[1]}: {r[4]}" for r in failed})[:10],
        "requests_per_s": round(len(ok) / elapsed, 2),
        "by_route": {name: sum(1 for r in ok if r[1] == name) for name in sorted({r[1] for r in ok})},
        "warmup_s": warmup, "first_window_s": first, "last_window_s": last,
        "rss_mib_first_window": round(rss_first / 2**20, 1), "rss_mib_last_window": round(rss_last / 2**20, 1),
        "rss_mib_max": round(max(v for _, v in rss) / 2**20, 1),
        "rss_growth": round(rss_last / rss_first - 1, 4),
        "p99_ms_first_window": round(p99_first), "p99_ms_last_window": round(p99_last),
        "p99_ratio": round(p99_last / p99_first, 3),
        "after": idle, "rss_samples_mib": [(round(t), round(v / 2**20, 1)) for t, v in rss],
        "server_log": str(log_path),
    }
    report["passed"] = (not failed and report["rss_growth"] < args.max_rss_growth
                        and report["p99_ratio"] <= MAX_P99_RATIO and idle["idle"])
    return report


def _idle(url: str) -> dict:
    """Once the load stops: nothing runs or waits, every block is free, /health answers 200."""
    deadline = time.monotonic() + 30
    while True:
        info = httpx.get(url + "/info", timeout=10).json()
        idle = (info["num_requests_running"] == 0 and info["num_requests_waiting"] == 0
                and info["num_free_blocks"] == info["num_blocks"])
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    health = httpx.get(url + "/health", timeout=10).status_code
    return {"idle": idle and health == 200, "health": health, "num_requests_running": info["num_requests_running"],
            "num_requests_waiting": info["num_requests_waiting"],
            "free_blocks": f"{info['num_free_blocks']}/{info['num_blocks']}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--users", type=int, default=48, help="concurrent locust users (default 48)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-rss-growth", type=float, default=MAX_RSS_GROWTH,
                        help="RSS growth between the first and last windows that fails the soak "
                             f"(default {MAX_RSS_GROWTH})")
    parser.add_argument("--out", default="reports/soak.json")
    parser.add_argument("server_args", nargs="*", help="more server flags, after --")
    args = parser.parse_args(argv)
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"soak {report['duration_s']} s, {report['users']} users on {report['model']}: {report['ok']} answered, "
          f"{report['refused_429']} refused 429 (queue full), {report['failed']} failed; "
          f"{report['requests_per_s']} req/s")
    print(f"RSS {report['rss_mib_first_window']} -> {report['rss_mib_last_window']} MiB "
          f"({report['rss_growth']:+.2%}; max {report['rss_mib_max']} MiB); p99 {report['p99_ms_first_window']} -> "
          f"{report['p99_ms_last_window']} ms (x{report['p99_ratio']}); after: {report['after']}")
    for failure in report["failures"]:
        print("failure:", failure)
    print("PASSED" if report["passed"] else "FAILED", f"(details: {args.out})")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
