"""Our C++ CPU kernels (engine/csrc/*.cpp), compiled on first use for this CPU's kind.

The sources use `#ifdef __AVX512F__` / `__AVX2__` fast paths over a portable loop, so one
source tree builds one extension per CPU kind: `avx512` (AVX-512 F/BW/VL + VNNI), `avx2`
(AVX2 + FMA) and `baseline`. Each kind is its own module (`attnserve_kernels_<kind>`), so a
test can load the AVX2 build beside the AVX-512 one in the same process and compare them.

The build goes to `build/kernels/<kind>` under the repository (or `$ATTNSERVE_KERNEL_DIR`)
and is reused until a source or flag changes. Without a C++ compiler, or when the build
fails, `load()` returns None and every caller keeps its PyTorch reference path.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

from engine.device import cpu_features

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"
KERNEL_DIR_ENV = "ATTNSERVE_KERNEL_DIR"
DISABLE_ENV = "ATTNSERVE_DISABLE_KERNELS"     # "1": never build or load (the reference paths run)

_KIND_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx2",
               "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "baseline": [],
}


def kernel_kind() -> str:
    """Which build this CPU runs: avx512 (with VNNI), avx2 or baseline."""
    features = cpu_features()
    if features.has_avx512 and "avx512_vnni" in features.flags:
        return "avx512"
    return "avx2" if features.has_avx2 else "baseline"


def load(kind: str | None = None) -> ModuleType | None:
    """The compiled kernels for `kind` (default: this CPU's), or None when unavailable."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    return _build(kind or kernel_kind())


@functools.cache
def _build(kind: str) -> ModuleType | None:
    sources = sorted(str(p) for p in SOURCE_DIR.glob("*.cpp"))
    if not sources:
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        logger.warning("no C++ compiler found: the CPU kernels are off (PyTorch reference paths run)")
        return None
    from torch.utils import cpp_extension
    build_dir = _writable(_build_dir() / kind)
    flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast", *_KIND_FLAGS[kind]]
    try:
        module = cpp_extension.load(
            name=f"attnserve_kernels_{kind}", sources=sources, extra_cflags=flags,
            extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
    except Exception:                       # a broken toolchain must not take the server down
        logger.exception("building the %s CPU kernels failed: the PyTorch reference paths run", kind)
        return None
    logger.info("CPU kernels: %s build loaded", kind)
    return module


def _build_dir() -> Path:
    configured = os.environ.get(KERNEL_DIR_ENV)
    if configured:
        return Path(configured)
    repo_build = Path(__file__).resolve().parents[1] / "build" / "kernels"
    try:
        repo_build.mkdir(parents=True, exist_ok=True)
        return repo_build
    except OSError:                         # an installed, read-only tree
        return _CACHE_DIR


_CACHE_DIR = Path.home() / ".cache" / "attnserve" / "kernels"


def _writable(build_dir: Path) -> Path:
    """A build directory torch may write to (it takes a lock and rewrites its ninja file even
    to load a build that is up to date): a prebuilt, read-only one (an image's) is copied to
    the user's cache first, so loading it compiles nothing."""
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        if os.access(build_dir, os.W_OK):
            return build_dir
    except OSError:
        pass
    copy = _CACHE_DIR / build_dir.name
    if not copy.exists():
        shutil.copytree(build_dir, copy)
    return copy

