"""The C++ kernels build for this CPU's kind and for the AVX2 fallback, side by side."""
from __future__ import annotations

import pytest

from engine import kernels
from engine.device import CPU_FEATURES_ENV, cpu_features


def test_this_cpu_builds_its_kind():
    module = kernels.load()
    assert module is not None, "a C++ compiler is on every machine we target"
    assert module.isa == kernels.kernel_kind()


def test_the_avx2_build_loads_beside_it():
    if not cpu_features().has_avx2:
        pytest.skip("this CPU has no AVX2")
    assert kernels.load("avx2").isa == "avx2"


def test_forcing_features_picks_the_fallback(monkeypatch):
    monkeypatch.setenv(CPU_FEATURES_ENV, "avx2,fma")
    assert cpu_features().kind in ("avx2", "baseline")
    assert kernels.kernel_kind() in ("avx2", "baseline")
    monkeypatch.setenv(CPU_FEATURES_ENV, "")
    assert kernels.kernel_kind() == "baseline"


def test_disabled_kernels_leave_the_reference(monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert kernels.load() is None


def test_a_read_only_prebuilt_build_is_loaded_from_a_copy(tmp_path, monkeypatch):
    prebuilt = tmp_path / "image" / "avx2"
    prebuilt.mkdir(parents=True)
    (prebuilt / "attnserve_kernels_avx2.so").write_bytes(b"built")
    monkeypatch.setattr(kernels, "_CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(kernels.os, "access", lambda path, mode: str(path).startswith(str(tmp_path / "cache")))
    copy = kernels._writable(prebuilt)
    assert copy == tmp_path / "cache" / "avx2"
    assert (copy / "attnserve_kernels_avx2.so").read_bytes() == b"built"
    assert kernels._writable(prebuilt) == copy                        # copied once
