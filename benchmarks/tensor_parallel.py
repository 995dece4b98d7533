"""Tensor parallelism on this machine: decode tok/s and what the collectives cost per step.

    python -m benchmarks.tensor_parallel [--sizes 1,3] [--batches 1,8] [--steps 24] [--repeats 3]
                                         [--quantization auto] [--threads N] [--json out.json]

The default model (SmolLM2-135M: 9 heads, 3 KV heads, so N = 1 or 3) is loaded once per size N
as an engine over N ranks (the workers it starts itself; gloo on a CPU). For each batch B, B
requests decode together (greedy, EOS ignored) and --steps decode steps are timed after a
warm-up; the sizes take turns, --repeats times, and each figure is the median of the repeats.
Per decode step, on rank 0:
  all-reduce   the time inside the 2 * layers + 1 all-reduces (attention, MLP, embedding); rank
               0's clock, so it includes waiting for the slowest rank to arrive
  alone        the same all-reduces, N processes doing nothing else: a (B, hidden) fp32 tensor,
               2 * layers + 1 times: the wire's share of the above
  broadcast    the step's inputs to the other ranks (one broadcast)
  LM head      rank 0's head matmul (its 1/N of the vocabulary), then the gather of the logits
               on rank 0: against the whole head at N = 1, what splitting the vocabulary buys
               over replicating it
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import machine, prompts_of_lengths
from engine import LLM, SamplingParams

PROMPT_LEN = 32


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sizes", default="1,3", help="tensor-parallel sizes, comma list")
    parser.add_argument("--batches", default="1,8", help="sequences decoding together, comma list")
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each rank (default: the cores divided between the ranks)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    engines = {n: LLM(args.model, tensor_parallel_size=n, quantization=args.quantization,
                      kv_cache_memory="256MiB", max_num_seqs=max(batches), num_threads=args.threads).engine
               for n in sizes}
    engine, config = engines[sizes[0]], engines[sizes[0]].model_config
    try:
        results = {b: measure(engines, b, args.steps, args.repeats) for b in batches}
        if 1 in sizes:                            # a replicated head: the whole head on a rank's threads
            for b in batches:
                for n in sizes:
                    results[b][n]["whole_head_ms"] = 1e3 * whole_head(engines[1], b, engines[n].num_threads)
    finally:
        for each in engines.values():
            each.shutdown()
    calls = 2 * config.num_layers + 1             # after shutdown: nothing else on the cores
    for b in batches:
        for n in sizes:
            results[b][n]["all_reduce_alone_ms"] = 1e3 * calls * all_reduce_alone(n, (b, config.hidden_size))
    print(f"machine: {machine()}")
    print(f"{args.model} {str(engine.dtype).removeprefix('torch.')} ({engine.quantization_summary}); "
          f"{args.steps} decode steps x {args.repeats} repeats, medians; per-step figures in ms; torch threads "
          f"per rank: {', '.join(f'{engines[n].num_threads} at N={n}' for n in sizes)}")
    print_table(results, sizes)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2))


ROWS = [("decode tok/s", "tok_s", "{:.1f}"), ("ms / step", "step_ms", "{:.2f}"),
        ("all-reduce (rank 0)", "all_reduce_ms", "{:.2f}"), ("  all-reduces / step", "all_reduces", "{:.0f}"),
        ("  alone (wire)", "all_reduce_alone_ms", "{:.2f}"), ("broadcast", "broadcast_ms", "{:.2f}"),
        ("LM head matmul", "lm_head_ms", "{:.2f}"), ("logits gather", "gather_ms", "{:.2f}"),
        ("  whole head, same threads", "whole_head_ms", "{:.2f}")]


def print_table(results: dict, sizes: list[int]) -> None:
    for batch, by_size in results.items():
        print(f"\nbatch {batch:<22}" + "".join(f"{'N=' + str(n):>12}" for n in sizes))
        for label, key, fmt in ROWS:
            if key in by_size[sizes[0]]:
                print(f"  {label:<26}" + "".join(f"{fmt.format(by_size[n][key]):>12}" for n in sizes))


def measure(engines: dict, batch: int, steps: int, repeats: int) -> dict[int, dict[str, float]]:
    """Per size: the medians over repeats of each figure; the sizes take turns."""
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in engines}
    for repeat in range(repeats):
        for n, engine in engines.items():
            runs[n].append(decode_run(engine, batch, steps, seed=repeat))
    return {n: {key: statistics.median(run[key] for run in by_run) for key in by_run[0]}
            for n, by_run in runs.items()}


def decode_run(engine, batch: int, steps: int, seed: int) -> dict[str, float]:
    """B fresh requests: prefill and warm up, then `steps` decode steps timed."""
    torch.set_num_threads(engine.num_threads)     # the engines share this process's threads setting
    prompts = prompts_of_lengths(engine.tokenizer, [PROMPT_LEN] * batch, seed=seed)
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"s{seed}-{i}", prompt, params)
    while engine.num_waiting or any(seq.num_computed_tokens < len(seq.token_ids) - 1
                                    for seq in engine.scheduler.running):
        engine.step()                             # prefill (chunked or not) until all decode
    for _ in range(3):
        engine.step()
    head = time_calls(engine.runner.model, "compute_logits")
    collectives = engine.tensor_parallel.collectives if engine.tensor_parallel else None
    if collectives:
        collectives.reset_stats()
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - started
    stats = {name: (each.count, each.seconds) for name, each in collectives.stats.items()} if collectives else {}
    del engine.runner.model.compute_logits        # back to the class's method
    while engine.has_unfinished_requests():
        engine.step()

    def per_step_ms(name: str) -> float:
        return 1e3 * stats[name][1] / steps if name in stats else 0.0
    return {"tok_s": batch * steps / elapsed, "step_ms": 1e3 * elapsed / steps,
            "all_reduce_ms": per_step_ms("all_reduce"), "broadcast_ms": per_step_ms("broadcast"),
            "gather_ms": per_step_ms("gather"), "lm_head_ms": 1e3 * head[0] / steps,
            "all_reduces": stats["all_reduce"][0] / steps if stats else 0.0}


def time_calls(owner, attribute: str) -> list[float]:
    """Wraps owner.attribute (on the instance) with a timer; returns the running total (seconds)."""
    total = [0.0]
    inner = getattr(owner, attribute)

    @functools.wraps(inner)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - started
    setattr(owner, attribute, timed)
    return total


@torch.inference_mode()
def whole_head(engine, batch: int, threads: int, calls: int = 50) -> float:
    """Median seconds of the whole LM head on `batch` rows with `threads` torch threads."""
    torch.set_num_threads(threads)
    model = engine.runner.model
    hidden = torch.randn(batch, engine.model_config.hidden_size, dtype=engine.dtype)
    times = []
    for _ in range(calls + 5):
        started = time.perf_counter()
        model.compute_logits(hidden)
        times.append(time.perf_counter() - started)
    return statistics.median(times[5:])


# -- the all-reduce alone ----------------------------------------------------------------

def all_reduce_alone(size: int, shape: tuple[int, int], calls: int = 400) -> float:
    """Median seconds of one gloo all-reduce of a float32 `shape` among `size` processes doing
    nothing else (0 for one process)."""
    if size == 1:
        return 0.0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    context = torch.multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    procs = [context.Process(target=_all_reduce_rank, args=(rank, size, init_method, shape, calls, results))
             for rank in range(size)]
    for proc in procs:
        proc.start()
    median = results.get()
    for proc in procs:
        proc.join(60)
    return median


def _all_reduce_rank(rank: int, size: int, init_method: str, shape, calls: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=size)
    tensor = torch.randn(shape)
    times = []
    for _ in range(calls + 20):
        started = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - started)
        tensor.div_(size)                          # keep the values finite
    if rank == 0:
        results.put(statistics.median(times[20:]))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
