"""Online serving benchmark, like vLLM's: C concurrent streaming clients against attnserve's
HTTP server and its peers, on the same model, in the same run.

    python -m benchmarks.serving --plot serving.png --json serving.json

Systems, run one after another (each alone on the machine, peers with --threads threads;
attnserve uses every core in its affinity, the same number by default):
  attnserve         `python -m service`, OpenAI /v1/completions, stream, ignore_eos
  inprocess         the same engine and flags through AsyncLLMEngine, no HTTP (server overhead)
  llamacpp-server   llama-cpp-python's OpenAI server on the same GGUF (serves one request at a time)
  llamacpp-batched  llama.cpp's batch API: one sequence per client, decoding together
  transformers      a naive FastAPI server: model.generate, one request at a time

Each concurrency level C sends a fixed number of requests (default max(2C, 16)) from C closed-loop
clients: each sends its next request as soon as its previous one ends. Prompts are distinct slices
of the bundled text, mixed lengths, the same for every system, no two sharing a prefix (prefix
caching earns nothing); greedy, EOS ignored, so every request generates exactly --output-len tokens.
The one-at-a-time servers run fewer requests (max(C, --sequential-min)): their throughput does not
depend on C and their queues are as long; transformers stops at --transformers-max-concurrency.
TTFT: request sent -> first chunk with text. ITL: gaps between chunks with text (vLLM's definitions).

Fairness notes: llama.cpp and attnserve (its default, --quantization auto) compute with the
GGUF's own 4-bit blocks (8-bit LM head); transformers dequantizes them to float32. The HTTP
clients share the machine with the server they drive (as every HTTP system's do); llamacpp-
batched has no client, no HTTP and no detokenization, so it is llama.cpp's ceiling rather than
a server. llama-cpp-python's server runs with its defaults except threads, a context fitting
the longest request, and interrupt_requests off (on, a new request cuts the running stream
short); its requests mask EOS with a logit bias and turn its 1.1 repeat penalty off. With the
defaults the whole run takes about 20-25 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import machine, prompt_texts
from benchmarks.peers.clients import RequestRecord, closed_loop, read_results, stream_completion
from benchmarks.peers.launch import free_port, repo_env, serve

SYSTEMS = ("attnserve", "inprocess", "llamacpp-server", "llamacpp-batched", "transformers")
SEQUENTIAL = ("llamacpp-server", "transformers")        # serve one request at a time
LLAMACPP = ("llamacpp-server", "llamacpp-batched")
COLUMNS = [("requests", "reqs", "{:d}"), ("output_tok_s", "out tok/s", "{:.1f}"), ("req_s", "req/s", "{:.2f}"),
           ("ttft_p50_ms", "TTFT p50", "{:.0f}"), ("ttft_p99_ms", "TTFT p99", "{:.0f}"),
           ("itl_p50_ms", "ITL p50", "{:.1f}"), ("itl_p99_ms", "ITL p99", "{:.1f}"),
           ("decode_tok_s", "tok/s/seq", "{:.1f}"), ("failed", "failed", "{:d}")]


# -- prompts -----------------------------------------------------------------------------

def prompt_sets(tokenizer, concurrencies: list[int], num_requests: dict[int, int], min_len: int,
                max_len: int, seed: int = 0) -> tuple[str, dict[int, list[str]]]:
    """A warm-up prompt and, per level, its prompts: text cut from the bundled prompts at
    distinct token offsets (so no two share a prefix block), lengths uniform in [min_len, max_len]."""
    corpus = tokenizer.encode(" ".join(prompt_texts()), add_special_tokens=False)
    total = 1 + sum(num_requests[c] for c in concurrencies)
    rng = random.Random(seed)
    starts = rng.sample(range(len(corpus)), total) if total <= len(corpus) else \
        [rng.randrange(len(corpus)) for _ in range(total)]
    texts = []
    for start in starts:
        length = rng.randint(min_len, max_len)
        ids = (corpus[start:] + corpus * (length // len(corpus) + 1))[:length]   # wrap around
        texts.append(tokenizer.decode(ids).strip())
    warmup, rest = texts[0], iter(texts[1:])
    return warmup, {c: [next(rest) for _ in range(num_requests[c])] for c in concurrencies}


# -- statistics --------------------------------------------------------------------------

def summarize(records: list[RequestRecord], output_len: int) -> dict:
    """Throughput over the level's wall time (first send to last end), latencies in ms."""
    ok = [r for r in records if r.error is None]
    summary = {"requests": len(records), "failed": len(records) - len(ok)}
    if not ok:
        return {**summary, "error": records[0].error if records else "no requests"}
    duration = max(r.end for r in ok) - min(r.start for r in records)
    num_tokens = sum(r.num_tokens for r in ok)
    ttfts = np.array([r.ttft for r in ok]) * 1e3
    itls = np.array([x for r in ok for x in r.itls] or [np.nan]) * 1e3
    tpots = [(r.end - r.chunk_times[0]) / (r.num_tokens - 1) for r in ok if r.num_tokens > 1]
    return {**summary, "duration_s": duration, "output_tokens": num_tokens,
            "output_tok_s": num_tokens / duration, "req_s": len(ok) / duration,
            "ttft_p50_ms": float(np.percentile(ttfts, 50)), "ttft_p99_ms": float(np.percentile(ttfts, 99)),
            "itl_p50_ms": float(np.percentile(itls, 50)), "itl_p99_ms": float(np.percentile(itls, 99)),
            "decode_tok_s": 1.0 / float(np.mean(tpots)) if tpots else float("nan"),
            "all_exact_length": all(r.num_tokens == output_len for r in ok)}


def format_table(results: dict[str, dict[int, dict]]) -> str:
    head = f"{'system':<18}{'C':>4}" + "".join(f"{title:>11}" for _, title, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for system, levels in results.items():
        for c, s in sorted(levels.items()):
            cells = "".join(f"{fmt.format(s[key]) if key in s else 'n/a':>11}" for key, _, fmt in COLUMNS)
            note = "" if s.get("all_exact_length", True) else "  (some requests generated fewer tokens)"
            lines.append(f"{system:<18}{c:>4}{cells}{note}" + (f"  {s['error']}" if "error" in s else ""))
    return "\n".join(lines) + "\n(latencies in ms; tok/s/seq = one stream's decode rate after its first token)"


# -- ratios and targets ------------------------------------------------------------------

def _tok_s(results: dict, system: str, c: int) -> float | None:
    return results.get(system, {}).get(c, {}).get("output_tok_s")


def best_llamacpp(results: dict, c: int) -> str | None:
    """The llama.cpp system with the higher output tokens/s at C: the one to beat."""
    found = [(_tok_s(results, s, c), s) for s in LLAMACPP if _tok_s(results, s, c)]
    return max(found)[1] if found else None


def fastest_decode(results: dict, c: int) -> str | None:
    """The llama.cpp system with the faster per-stream decode at C."""
    found = [(results[s][c]["decode_tok_s"], s) for s in LLAMACPP
             if results.get(s, {}).get(c, {}).get("decode_tok_s")]
    return max(found)[1] if found else None


def ratio_rows(results: dict, concurrencies: list[int], ours: str = "attnserve") -> list[dict]:
    rows = []
    for c in concurrencies:
        mine = _tok_s(results, ours, c)
        row = {"concurrency": c, f"{ours}_tok_s": mine}
        for peer in ("transformers", "llamacpp-server", "llamacpp-batched", "inprocess"):
            theirs = _tok_s(results, peer, c)
            row[f"x_{peer}"] = mine / theirs if mine and theirs else None
        best = best_llamacpp(results, c)
        if mine and best:
            row["ttft_p99_vs_llamacpp"] = results[ours][c]["ttft_p99_ms"] / results[best][c]["ttft_p99_ms"]
        rows.append(row)
    return rows


def format_ratios(rows: list[dict], ours: str = "attnserve") -> str:
    cols = [("x_transformers", "vs transformers"), ("x_llamacpp-server", "vs llama-cpp srv"),
            ("x_llamacpp-batched", "vs llama.cpp batch"), ("x_inprocess", "HTTP/in-process"),
            ("ttft_p99_vs_llamacpp", "TTFT p99 / llama.cpp")]
    head = f"{'C':>4}{'tok/s':>17}" + "".join(f"{title:>22}" for _, title in cols)
    lines = [f"{ours} (HTTP) output tokens/s over each system's, at the same concurrency:", head]
    for row in rows:
        tok_s = row.get(f"{ours}_tok_s")
        cells = "".join(f"{f'{row[k]:.2f}x' if row.get(k) else 'n/a':>22}" for k, _ in cols)
        lines.append(f"{row['concurrency']:>4}{f'{tok_s:.1f}' if tok_s else 'n/a':>17}{cells}")
    return "\n".join(lines)


def targets(results: dict, ours: str = "attnserve") -> list[tuple[str, float | None, float, bool]]:
    """(what, measured, goal, higher_is_better) for the performance issue's targets."""
    def ratio(a: str | None, b: str | None, c: int, key: str = "output_tok_s") -> float | None:
        x = results.get(a, {}).get(c, {}).get(key) if a else None
        y = results.get(b, {}).get(c, {}).get(key) if b else None
        return x / y if x and y else None
    return [
        ("tok/s vs transformers at C=16", ratio(ours, "transformers", 16), 10.0, True),
        ("tok/s vs llama.cpp at C=16", ratio(ours, best_llamacpp(results, 16), 16), 1.5, True),
        ("tok/s vs llama.cpp at C=64", ratio(ours, best_llamacpp(results, 64), 64), 2.0, True),
        ("TTFT p99 vs llama.cpp at C=16", ratio(ours, best_llamacpp(results, 16), 16, "ttft_p99_ms"),
         1.0, False),
        ("single-stream decode tok/s vs llama.cpp (C=1)",
         ratio(ours, fastest_decode(results, 1), 1, "decode_tok_s"), 0.8, True),
        ("ITL p99 / ITL p50 at C=16 (decodes never wait behind a prompt)", itl_spread(results, ours, 16),
         3.0, False),
    ] + ([("HTTP / in-process tok/s at C=16", ratio(ours, "inprocess", 16), 0.9, True)]
         if ours == "attnserve" else [])


def itl_spread(results: dict, system: str, c: int) -> float | None:
    """ITL p99 over ITL p50: how much longer the slowest gaps are than the usual one."""
    row = results.get(system, {}).get(c, {})
    return row["itl_p99_ms"] / row["itl_p50_ms"] if row.get("itl_p50_ms") else None


def format_targets(rows, ours: str = "attnserve") -> str:
    lines = [f"targets for {ours} (llama.cpp = whichever llama.cpp system has the higher tok/s at that C; "
             "for decode, the faster decode):"]
    for what, value, goal, higher in rows:
        verdict = "n/a" if value is None else ("met" if (value >= goal if higher else value <= goal) else "NOT met")
        shown = "n/a" if value is None else f"{value:.2f}x"
        lines.append(f"  {what:<48}{shown:>9}   goal {'>=' if higher else '<='} {goal:g}x   {verdict}")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, levels in results.items():
        cs = [c for c in sorted(levels) if "output_tok_s" in levels[c]]
        left.plot(cs, [levels[c]["output_tok_s"] for c in cs], marker="o", label=system)
        right.plot(cs, [levels[c]["ttft_p99_ms"] / 1e3 for c in cs], marker="o", label=system)
    concurrencies = sorted({c for levels in results.values() for c in levels})
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, ylabel in ((left, "output tokens/s"), (right, "TTFT p99 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    right.set_yscale("log")
    right.yaxis.set_major_formatter(plain)
    left.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- running the systems -----------------------------------------------------------------

def openai_body(system: str, prompt: str, output_len: int, eos_token_ids: list[int]) -> dict:
    """One greedy streaming completion of exactly output_len tokens, in each server's dialect."""
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True}
    if system == "llamacpp-server":
        # No ignore_eos there: EOS is masked by a logit bias; its default repeat penalty is off.
        return {**body, "logit_bias": {str(i): -1e4 for i in eos_token_ids}, "repeat_penalty": 1.0}
    body["ignore_eos"] = True
    if system.startswith("attnserve"):
        body["stream_options"] = {"include_usage": True}     # tokens counted by the server
    return body


async def drive_http(url: str, system: str, warmup: str, levels: dict[int, list[str]], output_len: int,
                     eos_token_ids: list[int]) -> dict[int, list[RequestRecord]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        async def send(prompt: str) -> RequestRecord:
            body = openai_body(system, prompt, output_len, eos_token_ids)
            return await stream_completion(client, url + "/v1/completions", body)
        first = await send(warmup)
        if first.error:
            raise RuntimeError(f"{system}: warm-up request failed: {first.error}")
        results = {}
        for c, prompts in levels.items():
            results[c] = await closed_loop(send, prompts, c)
            print(f"  {system} C={c}: {summarize(results[c], output_len).get('output_tok_s', 0):.1f} tok/s",
                  flush=True)
        return results


def server_command(system: str, args, port: int) -> tuple[list[str], str]:
    """(command, readiness path) for the systems that are HTTP servers."""
    py = sys.executable
    if system.startswith("attnserve"):
        variant = args.variants.get(system.removeprefix("attnserve-"), "") if system != "attnserve" else ""
        return [py, "-m", "service", "--model", args.model, "--port", str(port), "--embedding-model", "none",
                "--log-level", "warning", *shlex.split(args.server_args), *shlex.split(variant)], "/ready"
    if system == "llamacpp-server":
        n_ctx = args.max_len + args.output_len + 64
        return [py, "-m", "llama_cpp.server", "--model", str(args.gguf), "--port", str(port),
                "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                "--n_ctx", str(n_ctx), "--interrupt_requests", "False", "--verbose", "False"], "/v1/models"
    if system == "transformers":
        return [py, "-m", "benchmarks.peers.transformers_server", "--model", args.model, "--port", str(port),
                "--threads", str(args.threads)], "/health"
    raise ValueError(system)


def run_driver(system: str, args, warmup: str, levels: dict[int, list[str]]) -> dict[int, list[RequestRecord]]:
    """A driver in its own process (so each system starts alone and clean)."""
    module = {"inprocess": "benchmarks.peers.inprocess", "llamacpp-batched": "benchmarks.peers.llamacpp_batched"}
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec.write_text(json.dumps({
            "model": args.model, "gguf": str(args.gguf), "threads": args.threads, "output_len": args.output_len,
            "server_args": shlex.split(args.server_args), "warmup": warmup,
            "batch_tokens": args.llamacpp_batch_tokens,
            "levels": [{"concurrency": c, "prompts": p} for c, p in levels.items()]}))
        subprocess.run([sys.executable, "-m", module[system], str(spec), str(out)], check=True,
                       env=repo_env(), cwd=Path(__file__).resolve().parent.parent)
        return read_results(out)[0]


def run_system(system: str, args, warmup: str, levels: dict[int, list[str]], eos_token_ids: list[int]):
    if system in LLAMACPP and args.gguf.suffix != ".gguf":
        raise ValueError(f"llama.cpp needs a .gguf file; {args.model} is {args.gguf}")
    if system in ("inprocess", "llamacpp-batched"):
        return run_driver(system, args, warmup, levels)
    if system == "attnserve" and args.url:
        return asyncio.run(drive_http(args.url.rstrip("/"), system, warmup, levels, args.output_len, eos_token_ids))
    port = free_port()
    command, ready = server_command(system, args, port)
    with serve(command, port, ready) as url:
        return asyncio.run(drive_http(url, system, warmup, levels, args.output_len, eos_token_ids))


def levels_for(system: str, args, concurrencies: list[int], prompts: dict[int, list[str]]) -> dict[int, list[str]]:
    if system == "transformers":
        concurrencies = [c for c in concurrencies if c <= args.transformers_max_concurrency]
    if system in SEQUENTIAL and args.sequential_min > 0:
        return {c: prompts[c][: max(c, args.sequential_min)] for c in concurrencies}
    return {c: prompts[c] for c in concurrencies}


def versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "transformers", "llama-cpp-python", "httpx"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a default name or a .gguf file")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma list of client counts")
    parser.add_argument("--num-requests", type=int, default=None, help="per level (default max(2C, 16))")
    parser.add_argument("--sequential-min", type=int, default=8,
                        help="one-at-a-time servers run max(C, this) requests per level (0: all)")
    parser.add_argument("--transformers-max-concurrency", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--min-len", type=int, default=64, help="shortest prompt, tokens")
    parser.add_argument("--max-len", type=int, default=256, help="longest prompt, tokens")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for the peers (default: the cores this process may use)")
    parser.add_argument("--server-args", default="", help="extra flags for `python -m service` (and inprocess)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="also run attnserve-NAME: the server with these extra flags, e.g. "
                             "'int8=--quantization int8' (repeatable)")
    parser.add_argument("--llamacpp-batch-tokens", type=int, default=512,
                        help="tokens per llama_decode in llamacpp-batched (like --max-num-batched-tokens)")
    parser.add_argument("--url", help="drive this running attnserve instead of launching one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write settings, machine and every result here")
    parser.add_argument("--plot", type=Path, help="PNG of tok/s and TTFT p99 against concurrency (matplotlib)")
    args = parser.parse_args(argv)
    args.variants = dict(v.split("=", 1) for v in args.variant)      # name -> flags
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from engine.loader import load_tokenizer, open_checkpoint, resolve_model_path
    systems = list(dict.fromkeys(s.strip() for s in args.systems.split(",") if s.strip()))
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems: {', '.join(sorted(unknown))} (known: {', '.join(SYSTEMS)})")
    variants = [f"attnserve-{name}" for name in args.variants]
    at = systems.index("attnserve") + 1 if "attnserve" in systems else 0      # right after the plain server
    systems[at:at] = variants
    ours = [s for s in systems if s.startswith("attnserve")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.gguf = resolve_model_path(args.model)
    checkpoint = open_checkpoint(args.model)
    tokenizer = load_tokenizer(checkpoint)
    eos_token_ids = sorted(set(checkpoint.config.eos_token_ids) | set(tokenizer.eos_token_ids))
    num_requests = {c: args.num_requests or max(2 * c, 16) for c in concurrencies}
    warmup, prompts = prompt_sets(tokenizer, concurrencies, num_requests, args.min_len, args.max_len, args.seed)
    print(f"machine: {machine()}\nmodel: {args.model} ({args.gguf.name})  output {args.output_len} tokens, "
          f"prompts {args.min_len}-{args.max_len} tokens, requests per level {num_requests}", flush=True)

    results: dict[str, dict[int, dict]] = {}
    for system in systems:
        levels = levels_for(system, args, concurrencies, prompts)
        print(f"{system}: levels {list(levels)}", flush=True)
        try:
            records = run_system(system, args, warmup, levels, eos_token_ids)
        except Exception as exc:                       # noqa: BLE001 - one broken peer spoils no run
            print(f"  {system} failed: {type(exc).__name__}: {str(exc)[-2000:]}", flush=True)
            continue
        results[system] = {c: summarize(r, args.output_len) for c, r in records.items()}
        if system in ("inprocess", "llamacpp-batched"):
            for c, s in results[system].items():
                print(f"  {system} C={c}: {s.get('output_tok_s', 0):.1f} tok/s", flush=True)

    print(f"\n{format_table(results)}")
    rows, goals = {}, {}
    for mine in ours:
        rows[mine], goals[mine] = ratio_rows(results, concurrencies, mine), targets(results, mine)
        print(f"\n{format_ratios(rows[mine], mine)}\n\n{format_targets(goals[mine], mine)}")
    command = "python -m benchmarks.serving " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps({
            "command": command, "machine": machine(), "versions": versions(), "model": args.model,
            "gguf": args.gguf.name, "settings": {k: str(v) for k, v in vars(args).items()},
            "requests_per_level": num_requests, "results": results, "ratios": rows,
            "targets": {mine: [{"what": w, "value": v, "goal": g, "higher_is_better": h} for w, v, g, h in found]
                        for mine, found in goals.items()},
        }, indent=2) + "\n")
    if args.plot:
        try:
            plot(results, args.plot, f"{args.model}, {args.output_len} output tokens; {machine()}")
        except ImportError:
            print("--plot needs matplotlib: pip install -e '.[bench]'")


if __name__ == "__main__":
    main()
