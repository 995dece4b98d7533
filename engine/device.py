"""Device, dtype, CPU features and threads: chosen once, for every engine.

Both the generation engine and the encoder resolve "auto" here, so they agree on what a
machine is. CPU features are read from /proc/cpuinfo once; `ATTNSERVE_CPU_FEATURES`
(a comma list, e.g. "avx2") pretends the CPU has only those, so a test can force the
fallback code path on a machine that has more.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

CPU_FEATURES_ENV = "ATTNSERVE_CPU_FEATURES"
# The flags we choose code paths by, as /proc/cpuinfo spells them.
_KNOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16",
                "amx_int8", "avx_vnni")


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    flags: frozenset[str]

    @property
    def has_native_bf16(self) -> bool:
        """bf16 matmuls run at full rate (AVX-512 BF16 or AMX); elsewhere they are emulated."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    @property
    def has_avx512(self) -> bool:
        return {"avx512f", "avx512bw"} <= self.flags

    @property
    def has_avx2(self) -> bool:
        return {"avx2", "fma"} <= self.flags

    @property
    def kind(self) -> str:
        """One word for logs and /info: amx, avx512_bf16, avx512, avx2 or baseline."""
        if "amx_bf16" in self.flags:
            return "amx"
        if "avx512_bf16" in self.flags:
            return "avx512_bf16"
        if self.has_avx512:
            return "avx512"
        return "avx2" if self.has_avx2 else "baseline"


@functools.cache
def _cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_features() -> CpuFeatures:
    """What this CPU can do, limited to what ATTNSERVE_CPU_FEATURES allows when set."""
    flags = _cpuinfo_flags() & frozenset(_KNOWN_FLAGS)
    forced = os.environ.get(CPU_FEATURES_ENV)
    if forced is not None:
        flags &= frozenset(f.strip() for f in forced.split(",") if f.strip())
    return CpuFeatures(flags)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        # fp32: exact and batch-invariant, and the fast dtype without native bf16; quantized
        # weights' kernels take fp32 activations too (engine/quantization.py).
        return torch.float32
    return torch.float16 if checkpoint_dtype == "float16" else torch.bfloat16


def default_num_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_cpu_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads for the calling thread; returns the number used.

    Call it from the thread that will run the model: a worker thread that never set it ran
    decode steps ~6x slower than one that did (measured at batch 16 on a 2-core CPU).
    """
    num_threads = num_threads or default_num_threads()
    torch.set_num_threads(num_threads)
    return num_threads
