"""The cost of constrained decoding: output tok/s of JSON-schema requests against the same
requests unconstrained, at 1 and 16 concurrent clients, on one server in one run.

    python -m benchmarks.guided --json benchmarks/results/guided.json

Both kinds are streaming /v1/chat/completions requests on the bundled prompts, greedy, EOS
ignored, at most --output-len tokens. Each request's prompt starts with its own id, so no
answer is served from another's cached prefix (the chat template's system turn aside, the same
for both kinds). The constrained ones carry response_format json_schema with a schema long
enough that every answer runs to --output-len (a list of 10 items): both kinds generate the
same number of tokens, and the ratio is the mask's cost per token (llguidance's masks for the
step, their unpacking and the masked logits), not a difference in work. The kinds alternate
level by level (plain C=1, json C=1, plain C=16, json C=16, then again with --repeats), so a
machine that gets busier hurts both alike; each figure is the best of the repeats. Then, in
process, the CPU time of a decode step plain and constrained, and the masks' part of it (figures
a busy machine does not move: the HTTP ones it does).
Target: json >= 0.8x plain at 16 clients.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

import httpx

from benchmarks.common import machine, prompt_texts
from benchmarks.peers.clients import RequestRecord, closed_loop, stream_completion
from benchmarks.peers.launch import free_port, serve

SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "minItems": 10, "maxItems": 10, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 24}, "price": {"type": "number"},
                       "in_stock": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"},
                                                                 "maxItems": 3}},
        "required": ["name", "price", "in_stock", "tags"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False,
}
KINDS = ("plain", "json")


def body(kind: str, prompt: str, output_len: int) -> dict:
    out = {"messages": [{"role": "user", "content": prompt}],
           "max_tokens": output_len, "temperature": 0.0, "stream": True, "ignore_eos": True,
           "stream_options": {"include_usage": True}}
    if kind == "json":
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "products", "schema": SCHEMA}}
    return out


def summarize(records: list[RequestRecord]) -> dict:
    ok = [r for r in records if r.error is None]
    wall = max(r.end for r in records) - min(r.start for r in records)
    tokens = sum(r.num_tokens for r in ok)
    return {"requests": len(records), "errors": len(records) - len(ok), "output_tokens": tokens,
            "mean_tokens": tokens / max(len(ok), 1), "wall_s": wall, "output_tok_s": tokens / wall}


async def drive(url: str, prompts: list[str], concurrencies: list[int], requests_at: dict[int, int],
                output_len: int, repeats: int) -> dict:
    results: dict = {kind: {c: [] for c in concurrencies} for kind in KINDS}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        async def sender(kind: str):
            async def send(prompt: str) -> RequestRecord:
                return await stream_completion(client, url + "/v1/chat/completions", body(kind, prompt, output_len))
            return send
        for kind in KINDS:                              # warm-up: the schema compiled, the code paths run
            first = await (await sender(kind))(prompts[0])
            if first.error:
                raise RuntimeError(f"warm-up ({kind}) failed: {first.error}")
        for repeat in range(repeats):
            for c in concurrencies:
                for kind in KINDS:
                    # Each request its own prompt: no answer is served from another's cached prefix.
                    batch = [f"Request {kind}-{repeat}-{c}-{i}. List ten products from this text as JSON:\n"
                             + prompts[i % len(prompts)] for i in range(requests_at[c])]
                    summary = summarize(await closed_loop(await sender(kind), batch, c))
                    results[kind][c].append(summary)
                    print(f"  repeat {repeat + 1} C={c:2d} {kind:5s}: {summary['output_tok_s']:6.1f} tok/s "
                          f"({summary['mean_tokens']:.0f} tokens/request, {summary['errors']} errors)", flush=True)
    return results


def in_process(model: str, output_len: int, concurrencies: list[int], threads: int, repeats: int) -> dict:
    """The same C sequences decoding in process, plain and constrained in turn: CPU time per
    decode step of each (every thread's, llguidance's pool too) and the part of the constrained
    step spent on the masks (llguidance filling them, the sampler applying them). CPU time is
    the work itself, which a machine shared with other jobs does not inflate; one thread by
    default, because two threads on a busy 2-core machine wait on each other's preemption (decode
    steps ran 4-8x slower than one thread's in a probe)."""
    from engine import LLMEngine, SamplingParams, guided, sampling
    from engine.config import EngineConfig
    engine = LLMEngine(model, EngineConfig(num_threads=threads))
    masks = {"cpu_s": 0.0}

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                masks["cpu_s"] += time.process_time() - start
        return wrapper
    engine._token_masks = timed(engine._token_masks)
    sampling.apply_bitmask = timed(guided.apply_bitmask)
    spec = guided.GuidedDecoding("json", SCHEMA)
    out = {c: {kind: [] for kind in KINDS} for c in concurrencies}
    try:
        for repeat, c, kind in itertools.product(range(repeats), concurrencies, KINDS):
            for i in range(c):
                engine.add_request(f"{kind}-{repeat}-{c}-{i}", f"Request {kind}-{repeat}-{c}-{i}. List ten "
                                   "products as JSON.", SamplingParams(max_tokens=output_len, temperature=0,
                                   ignore_eos=True, guided_decoding=spec if kind == "json" else None))
            engine.step()                                   # the prefill: not a decode step
            masks["cpu_s"], steps, start = 0.0, 0, time.process_time()
            while engine.has_unfinished_requests():
                engine.step()
                steps += 1
            out[c][kind].append({"step_cpu_ms": (time.process_time() - start) / steps * 1e3,
                                 "mask_cpu_ms": masks["cpu_s"] / steps * 1e3})
            print(f"  in process, repeat {repeat + 1} C={c:2d} {kind:5s}: {out[c][kind][-1]['step_cpu_ms']:.1f} "
                  f"CPU ms/step, masks {out[c][kind][-1]['mask_cpu_ms']:.2f}", flush=True)
    finally:
        sampling.apply_bitmask = guided.apply_bitmask
    return out


def in_process_report(steps: dict, threads: int) -> str:
    lines = [f"In process ({threads} thread(s), CPU ms per decode step, the best of the repeats):", "",
             "| C | plain | json | of it masks | plain / json |", "|---:|---:|---:|---:|---:|"]
    for c, kinds in steps.items():
        plain = min(r["step_cpu_ms"] for r in kinds["plain"])
        constrained = min(kinds["json"], key=lambda r: r["step_cpu_ms"])
        lines.append(f"| {c} | {plain:.1f} | {constrained['step_cpu_ms']:.1f} | {constrained['mask_cpu_ms']:.2f} | "
                     f"{plain / constrained['step_cpu_ms']:.2f}x |")
    return "\n".join(lines)


def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["output_tok_s"])


def report(results: dict, concurrencies: list[int]) -> str:
    lines = ["| C | plain tok/s | json tok/s | json / plain | tokens/request (plain, json) |",
             "|---:|---:|---:|---:|---|"]
    for c in concurrencies:
        plain, constrained = best(results["plain"][c]), best(results["json"][c])
        lines.append(f"| {c} | {plain['output_tok_s']:.1f} | {constrained['output_tok_s']:.1f} | "
                     f"{constrained['output_tok_s'] / plain['output_tok_s']:.2f}x | "
                     f"{plain['mean_tokens']:.0f}, {constrained['mean_tokens']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--url", help="an attnserve server already running (else one is started)")
    parser.add_argument("--server-args", default="", help="more flags for the server this starts")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--requests", default="4,32", help="requests per level, one per concurrency")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process part")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    requests_at = dict(zip(concurrencies, (int(n) for n in args.requests.split(",")), strict=True))
    prompts = prompt_texts()
    print(f"machine: {machine()}", flush=True)
    if args.url:
        results = asyncio.run(drive(args.url.rstrip("/"), prompts, concurrencies, requests_at, args.output_len,
                                    args.repeats))
    else:
        port = free_port()
        command = [sys.executable, "-m", "service", "--model", args.model, "--port", str(port),
                   "--embedding-model", "none", "--log-level", "warning", *shlex.split(args.server_args)]
        with serve(command, port, "/ready") as url:
            results = asyncio.run(drive(url, prompts, concurrencies, requests_at, args.output_len, args.repeats))
    steps = in_process(args.model, args.output_len, concurrencies, args.threads, args.repeats)
    table = report(results, concurrencies) + "\n\n" + in_process_report(steps, args.threads)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv), "model": args.model,
                                         "output_len": args.output_len, "results": results, "in_process": steps,
                                         "table": table}, indent=1))


if __name__ == "__main__":
    main()
