"""benchmarks/embed.py on a small scale: the sentence generator, the statistics, and one real
run (20 sentences, 4 clients) against an embeddings-only server (--model none) on the real
all-MiniLM model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import embed
from benchmarks.sentences import is_long, mixed_sentences, short_sentences


def test_sentences_are_deterministic_mixed_and_in_range():
    texts = mixed_sentences(2000)
    assert texts == mixed_sentences(2000) and texts != mixed_sentences(2000, seed=1)
    assert len(set(texts)) > 1990
    lengths = [len(text.split()) for text in texts]
    assert sum(n >= 40 for n in lengths) == 600
    assert all(3 <= n <= 12 or 40 <= n <= 120 for n in lengths)
    assert not any(is_long(text) for text in short_sentences(50))
    assert all(text[0].isupper() and text.endswith(".") and ",." not in text for text in texts)


def test_statistics():
    lat = embed.latency_ms([0.001 * i for i in range(1, 101)])
    assert lat["n"] == 100 and lat["p50"] == pytest.approx(50.5) and lat["p99"] == pytest.approx(99.0)
    assert embed.latency_ms([]) == {"n": 0}
    a = np.array([[1.0, 0.0], [0.6, 0.8]])
    assert embed.cosines(a, a * 3) == pytest.approx([1.0, 1.0])
    assert embed.cosines(a, a[::-1]) == pytest.approx([0.6, 0.6])
    assert embed.median_run([3.0, 1.0, 2.0, 5.0], float) == (2, 2.0)


def test_sweep_grid_and_url_refuses_knobs():
    args = embed.parse_args(["--clients", "4,8", "--batch-wait-ms", "0,default", "--max-batch-tokens", "512"])
    first, second = embed.configs_of(args)                   # one server per batching setting
    assert [c.clients for c in first] == [4, 8] and second[0] == embed.ServerConfig(4, "httpx", None, 512)
    assert first[0].encoder_knobs == {"batch_wait_ms": 0.0, "max_batch_tokens": 512}
    with pytest.raises(SystemExit):
        embed.parse_args(["--url", "http://127.0.0.1:1", "--batch-wait-ms", "1"])
    with pytest.raises(SystemExit):
        embed.parse_args(["--client", "httpx,curl"])
    policies = embed.configs_of(embed.parse_args(["--omp-wait-policy", "default,PASSIVE"]))
    assert [group[0].omp_wait_policy for group in policies] == [None, "passive"]
    assert policies[1][0].label == "attnserve /embed, 32 httpx clients (OMP_WAIT_POLICY=passive)"


def test_small_run_against_the_real_server(tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    out = tmp_path / "embed.json"
    embed.main(["--num-sentences", "20", "--clients", "4", "--client", "httpx,raw", "--st-batch1-sentences", "3",
                "--warmup", "4",
                "--batch-wait-ms", "2", "--omp-wait-policy", "passive", "--probe-pause-ms", "5", "--json", str(out)])
    results = json.loads(out.read_text())
    assert results["num_sentences"] == 20 and results["num_tokens"] > 20
    assert results["st_batch32_sent_s"] > 0 and results["st_batch1_sent_s"] > 0
    assert results["st_batch1_vs_batch32_min_cosine"] > 0.99999
    assert results["st_batch32_cpu_ms_per_sentence"] > 0 and results["st_batch1_short_ms"] > 0
    assert set(results["st_by_length_sent_s"]) <= {"batch32_short", "batch32_long", "batch1_short", "batch1_long"}
    assert [row["config"]["client"] for row in results["servers"]] == ["httpx", "raw"]
    for row in results["servers"]:
        assert row["config"]["batch_wait_ms"] == 2.0 and row["config"]["clients"] == 4
        assert row["min_cosine"] > 0.99999                   # every HTTP vector matches ST's
        assert row["sent_s"] > 0 and row["vs_st_batch32"] > 0
        assert row["latency_ms"]["n"] == 20 and row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
        assert row["probe_latency_ms"]["n"] >= 1
        assert row["lone_latency_ms"]["n"] == 50 and row["lone_vs_st_batch1"] > 0
        assert row["mean_batch_size"] >= 1 and row["server_cores_busy"] > 0
        assert 0 < row["event_loop_cpu_ms_per_request"] < row["server_cpu_ms_per_request"]
    printed = capsys.readouterr().out
    assert "attnserve /embed, 4 raw clients (batch_wait_ms=2.0, OMP_WAIT_POLICY=passive)" in printed and "min cosine" in printed
    assert "a lone short sentence (n=50)" in printed
