"""`make loadtest` (locust --headless -u 8 -r 4 -t 15s) against a real server: every user class
runs, nothing fails, TTFT is reported, and the server counted what locust sent."""
from __future__ import annotations

import re

import pytest
from observability import LOAD, observed_load

ROUTES = ("/generate", "/generate_stream", "/v1/chat/completions", "/embed")


@pytest.fixture(scope="module")
def run(request):
    return observed_load(request)


def test_locust_ran_without_failures(run):
    assert run.locust_rc == 0, run.locust_output[-4000:]
    assert run.stats, f"no stats CSV:\n{run.locust_output[-4000:]}"
    total = run.stats[("", "Aggregated")]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    failures = (run.reports / "loadtest_failures.csv").read_text().splitlines()
    assert len(failures) == 1, failures          # the header only
    assert (run.reports / "loadtest.html").stat().st_size > 10_000


def test_every_user_class_ran(run):
    spawned = re.search(r"All users spawned: (\{.*?\})", run.locust_output)
    assert spawned, run.locust_output[-2000:]
    for user in ("GenerateUser", "StreamUser", "ChatStreamUser", "EmbedUser"):
        assert f'"{user}": ' in spawned.group(1) and f'"{user}": 0' not in spawned.group(1), spawned.group(1)
    for route in ROUTES:
        row = run.stats[("POST", route)]
        assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0, row


def test_streams_report_ttft_below_their_duration(run):
    for route in ("/generate_stream", "/v1/chat/completions"):
        ttft, whole = run.stats[("TTFT", route)], run.stats[("POST", route)]
        assert int(ttft["Request Count"]) > 0 and int(ttft["Failure Count"]) == 0
        assert float(ttft["Average Response Time"]) < float(whole["Average Response Time"])


def test_the_server_counted_at_least_what_locust_saw(run):
    # Locust drops what was in flight when its time ran out; the server still counts it.
    for route in ROUTES:
        served = run.server.metric("attnserve_requests_total", route=route, status="200")
        assert served >= int(run.stats[("POST", route)]["Request Count"]), route
    assert run.server.metric("attnserve_requests_total", status="500") == 0
    assert LOAD["seconds"] <= run.ended - run.started < LOAD["seconds"] + 45
