"""Microbenchmark of the quantized-linear kernels against a dense fp32 F.linear, on SmolLM2's
shapes, for this CPU's build and the AVX2 build.

    python -m benchmarks.linear_kernels [--rows 1,4,16,64,512] [--threads 2] [--reps 15]

Per shape and row count: µs per call (median of --reps, the variants interleaved so a busy
neighbour slows them alike) of fp32 F.linear and of the kernels on Q4_1 and Q8_0 blocks
(SmolLM2's GGUF: Q4_1 layers, Q8_0 head), and fp32's time over each. Weights repeat call after
call, so they sit in cache. The decode-step section then runs 30 layers' worth of distinct
matrices plus the LM head (~105 MB quantized, 540 MB fp32: read from memory, as a real step
reads them) and reports one step's matmul time at 1 and 16 rows.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.common import machine
from engine import kernels
from engine.device import cpu_features
from engine.layers.quant_blocks import BlockRows
from engine.layers.quantized_linear import QuantizedLinear

# (name, out_features, in_features) of SmolLM2-135M's matmuls; 30 layers of the first four.
SHAPES = [("qkv", 1728, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
          ("lm_head", 49152, 576)]
NUM_LAYERS = 30


def time_us(fns: dict, reps: int) -> dict[str, float]:
    """Median µs per call of each function, calls interleaved round-robin."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def variants(weight: torch.Tensor, builds: dict) -> dict[str, QuantizedLinear]:
    """'<build> <format>' -> the layer, for Q4_1 and Q8_0 blocks of `weight`."""
    rows = {"Q4_1": BlockRows.quantize(weight, 4), "Q8_0": BlockRows.quantize(weight, 8)}
    return {f"{kind} {fmt}": QuantizedLinear.from_rows(r, None, module)
            for kind, module in builds.items() for fmt, r in rows.items()}


def shape_table(builds: dict, row_counts: list[int], reps: int) -> None:
    names = [f"{kind} {fmt}" for kind in builds for fmt in ("Q4_1", "Q8_0")]
    print(f"{'shape':>16} {'rows':>5} {'fp32':>9} " + " ".join(f"{n:>12}" for n in names)
          + "   fp32 / each")
    for label, out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features) * 0.05
        layers = variants(weight, builds)
        for num_rows in row_counts:
            x = torch.randn(num_rows, in_features)
            fns = {"fp32": lambda: F.linear(x, weight)}
            fns |= {name: (lambda layer=layer: layer(x)) for name, layer in layers.items()}
            us = time_us(fns, reps if out_features * num_rows < 2**22 else max(3, reps // 3))
            ratios = " ".join(f"{us['fp32'] / us[n]:5.2f}" for n in names)
            print(f"{label + f' {out_features}x{in_features}':>16} {num_rows:>5} {us['fp32']:9.0f} "
                  + " ".join(f"{us[n]:12.0f}" for n in names) + f"   {ratios}", flush=True)


def step_layers(fmt: str | None, module) -> list:
    """One decode step's matmuls as callables on x of the right width: 30 layers + head."""
    layers = []
    for _ in range(NUM_LAYERS):
        for _, out_features, in_features in SHAPES[:4]:
            layers.append(torch.randn(out_features, in_features) * 0.05)
    layers.append(torch.randn(49152, 576) * 0.05)
    if fmt is None:
        return [(w.shape[1], lambda x, w=w: F.linear(x, w)) for w in layers]
    bits = {"Q4_1": 4, "Q8_0": 8}
    formats = [fmt] * (len(layers) - 1) + ["Q8_0"]            # the head stays Q8_0
    return [(w.shape[1], QuantizedLinear.from_rows(BlockRows.quantize(w, bits[f]), None, module))
            for w, f in zip(layers, formats)]


def run_step(layers, inputs) -> list:
    return [f(inputs[in_features]) for in_features, f in layers]


def decode_step(builds: dict, reps: int) -> None:
    print(f"\none decode step's matmuls ({NUM_LAYERS} layers x qkv/o/gate_up/down + Q8_0 head),"
          " distinct weights, µs (median):")
    configs = {"fp32": (None, None)} | {f"{kind} Q4_1": ("Q4_1", m) for kind, m in builds.items()}
    for num_rows in (1, 16):
        inputs = {576: torch.randn(num_rows, 576), 1536: torch.randn(num_rows, 1536)}
        results = {}
        for name, (fmt, module) in configs.items():          # one at a time: 0.5 GB for fp32
            results |= time_us({name: partial(run_step, step_layers(fmt, module), inputs)}, reps)
        print(f"  rows {num_rows:>2}: " + ", ".join(
            f"{name} {us:8.0f} ({results['fp32'] / us:4.2f}x)" for name, us in results.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16,64,512")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = [kernels.kernel_kind()] + (["avx2"] if cpu_features().has_avx2 else [])
    builds = {kind: kernels.load(kind) for kind in dict.fromkeys(kinds)}
    if None in builds.values():
        raise SystemExit("the C++ kernels did not build or load (see the log)")
    print(f"machine: {machine()}; {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"CPU flags: {' '.join(sorted(cpu_features().flags))} (kind {cpu_features().kind}); "
          f"builds: {', '.join(builds)}")
    shape_table(builds, [int(r) for r in args.rows.split(",")], args.reps)
    decode_step(builds, args.reps)


if __name__ == "__main__":
    main()
