"""Shared by the benchmarks: deterministic prompts of chosen token lengths, machine facts."""
from __future__ import annotations

import os
import platform
import random
from pathlib import Path

PROMPT_FILE = Path(__file__).resolve().parent.parent / "loadtests" / "prompts.txt"


def prompt_texts() -> list[str]:
    """The bundled prompts (separated by blank lines, varied lengths), shared with the load tests."""
    blocks = PROMPT_FILE.read_text().split("\n\n")
    return [b.strip() for b in blocks if b.strip() and not b.startswith("#")]


def prompts_of_lengths(tokenizer, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Token-id prompts of exactly the given lengths, cut from the bundled text."""
    corpus_ids = tokenizer.encode(" ".join(prompt_texts()), add_special_tokens=False)
    rng = random.Random(seed)
    prompts = []
    for length in lengths:
        start = rng.randrange(0, max(1, len(corpus_ids) - length))
        ids = corpus_ids[start: start + length]
        while len(ids) < length:                       # corpus shorter than asked: wrap around
            ids += corpus_ids[: length - len(ids)]
        prompts.append(ids)
    return prompts


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from engine.device import cpu_features
    features = cpu_features()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {cores} cores, CPU kind {features.kind} ({' '.join(sorted(features.flags))}), "
            f"Python {platform.python_version()}")
