"""Builds the C++ CPU kernels ahead of time (see engine/kernels.py)."""
from __future__ import annotations

import argparse
import logging
import os

from engine import kernels
from engine.device import cpu_features


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.build_kernels [--all-kinds]`: build this CPU's kernels now (and, with
    --all-kinds, every build this CPU can run: the tests compare them), so that the first
    server start or test does not wait for the compiler."""
    parser = argparse.ArgumentParser(prog="python -m engine.build_kernels", description=main.__doc__)
    parser.add_argument("--all-kinds", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kinds = [kernels.kernel_kind()]
    if args.all_kinds:
        kinds += [k for k in ("avx2", "baseline") if k not in kinds and _runs_here(k)]
    built = {kind: kernels.load(kind) is not None for kind in kinds}
    print("CPU kernels: " + ", ".join(f"{kind} {'built' if ok else 'UNAVAILABLE'}" for kind, ok in built.items()))
    return 0 if all(built.values()) or os.environ.get(kernels.DISABLE_ENV, "") not in ("", "0") else 1


def _runs_here(kind: str) -> bool:
    return kind == "baseline" or cpu_features().has_avx2


if __name__ == "__main__":
    raise SystemExit(main())
