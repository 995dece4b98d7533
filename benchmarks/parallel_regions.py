"""What a parallel region costs from the main thread and from another thread (the engine's
steps run on a thread of their own, AsyncLLMEngine's), with 2 threads per region:

    python -m benchmarks.parallel_regions [--calls 2000]

Our kernels (engine/csrc/parallel.h's worker pool) beside PyTorch's own ops (libgomp, OpenMP),
µs per call, best of 3 rounds. The process first runs a region on the main thread, as the
server's loading does, so libgomp holds a team there too.
"""
from __future__ import annotations

import argparse
import threading
import time

import torch
import torch.nn.functional as F

from benchmarks.common import machine
from engine import kernels
from engine.layers.quant_blocks import BlockRows


def cases(ops) -> dict:
    packed = BlockRows.quantize(torch.randn(1536, 576), 4).pack()
    matrix = ops.QuantMatrix(packed.codes, packed.scales, packed.mins, packed.format_code, 576, 1536, None)
    one_row, rows, weight = torch.randn(1, 576), torch.randn(64, 576), torch.ones(576)
    a, b = torch.randn(64, 512), torch.randn(512, 512)
    return {
        "ours: quant_linear 1 x 576 -> 1536": lambda: matrix(one_row),
        "ours: rms_norm 64 x 576": lambda: ops.rms_norm(rows, weight, 1e-5),
        "torch: F.rms_norm 64 x 576 (OpenMP)": lambda: F.rms_norm(rows, (576,), weight, 1e-5),
        "torch: 64 x 512 @ 512 x 512 (OpenMP)": lambda: a @ b,
    }


def time_all(calls: int, out: dict, label: str, ops) -> None:
    torch.set_num_threads(2)
    for name, fn in cases(ops).items():
        best = float("inf")
        for _ in range(3):
            for _ in range(calls // 10):
                fn()
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - started) / calls)
        out[(name, label)] = best * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    ops = kernels.load()
    print(f"machine: {machine()}")
    results: dict = {}
    time_all(args.calls, results, "main thread", ops)
    worker = threading.Thread(target=time_all, args=(args.calls, results, "another thread", ops))
    worker.start()
    worker.join()
    print(f"{'µs per call, 2 threads':<40} {'main thread':>12} {'another thread':>15} {'ratio':>7}")
    for name in cases(ops):
        main_us, other_us = results[(name, "main thread")], results[(name, "another thread")]
        print(f"{name:<40} {main_us:12.1f} {other_us:15.1f} {other_us / main_us:6.2f}x")


if __name__ == "__main__":
    main()
