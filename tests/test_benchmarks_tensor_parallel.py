"""benchmarks/tensor_parallel.py on a small scale: the tiny LLaMA at N = 1 and 2, two steps."""
from __future__ import annotations

import json

from benchmarks import tensor_parallel


def test_one_small_run_counts_each_collective(tiny_llama, tmp_path, capsys):
    out = tmp_path / "tp.json"
    tensor_parallel.main(["--model", str(tiny_llama), "--sizes", "1,2", "--batches", "2", "--steps", "2",
                          "--repeats", "1", "--threads", "1", "--json", str(out)])
    results = json.loads(out.read_text())["results"]["2"]
    one, two = results["1"], results["2"]
    assert one["all_reduces"] == 0 and one["all_reduce_ms"] == one["all_reduce_alone_ms"] == 0
    assert two["all_reduces"] == 2 * 2 + 1                 # 2 layers: attention and MLP each, and the embedding
    assert two["all_reduce_alone_ms"] > 0 and two["all_reduce_ms"] > 0 and two["broadcast_ms"] > 0
    assert two["gather_ms"] > 0 and one["gather_ms"] == 0
    assert all(r["tok_s"] > 0 and r["lm_head_ms"] > 0 and r["whole_head_ms"] > 0 for r in (one, two))
    printed = capsys.readouterr().out
    assert "batch 2" in printed and "N=2" in printed and "alone (wire)" in printed
