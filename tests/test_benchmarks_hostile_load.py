"""benchmarks/hostile_load.py against a real server on the tiny model, with short counts: every
figure it prints is measured (no empty lists, no errors swallowed)."""
from __future__ import annotations

import argparse

from service_helpers import edges_server

from benchmarks import hostile_load


def test_percentile_picks_the_value_at_the_rank():
    values = list(range(1, 101))
    assert hostile_load.percentile(values, 0.5) == 51
    assert hostile_load.percentile(values, 0.99) == 100


def test_a_short_run_prints_every_figure(request, capsys):
    args = argparse.Namespace(flood_s=1.0, flood_clients=2, max_tokens=4)
    hostile_load.measure(edges_server(request).url, args)
    flood, starved = capsys.readouterr().out.strip().splitlines()
    assert flood.startswith("tokenizer flood (2 clients") and "/health p50" in flood, flood
    assert " 0 other" in flood, flood
    assert starved.startswith("starvation (") and "small requests, p50" in starved, starved
