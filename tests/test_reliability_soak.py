"""CI's soak: loadtests/soak.py for 60 s on the tiny LLaMA (and the real MiniLM for /embed),
saturated. Slow: `make test` runs it; `make soak` runs the 10-minute one on the default models."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from service_helpers import REPO

pytestmark = pytest.mark.slow


def test_a_minute_of_saturating_load_loses_nothing_and_leaks_nothing(tiny_llama, tmp_path):
    out = tmp_path / "soak.json"
    # A small KV pool: its pages are all touched in the warm-up (first use grows RSS, not a leak).
    # On the tiny model (~55 requests/s) RSS still grows 5-11% between this minute's windows
    # and ~0.7 MiB/s after it (measured 2026-12-01, cause not yet found; the 10-minute soak on
    # the real models holds its 5%): this bound catches a leak that grows faster than that.
    done = subprocess.run([sys.executable, str(REPO / "loadtests" / "soak.py"), "--duration", "60",
                           "--model", str(tiny_llama), "--kv-cache-memory", "16MiB", "--max-rss-growth", "0.2",
                           "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=280)
    print("\n" + done.stdout[-2000:])
    report = json.loads(out.read_text())
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert report["failed"] == 0 and report["ok"] > 500 and report["after"]["idle"]
    assert report["refused_429"] > 0            # saturated: the queue was at its bound
