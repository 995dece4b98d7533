"""The Grafana dashboard against a real Prometheus scraping a real server under load: every
query of every panel returns data, and no panel names a metric the server does not export."""
from __future__ import annotations

import json
import math
import re

import pytest
from observability import DASHBOARD, DESIGN_METRICS, observed_load

# Panels that may truthfully stay at zero through a healthy load.
MAY_BE_ZERO = {"Error rate (5xx)", "Error rate", "Aborted requests/s by reason", "Preemptions/s"}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])            # collapsed rows hold their panels
    return out


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in panels(dashboard) if p["type"] != "row"
            for t in p["targets"]]


def as_grafana_would(expr: str) -> str:
    """Grafana's variables, as it would expand them for this 1 s scrape: every instance."""
    return (expr.replace("$__rate_interval", "10s").replace("$__interval", "1s")
            .replace('"$instance"', '".*"'))


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\battnserve_[a-z_]+", expr))


@pytest.fixture(scope="module")
def run(request):
    return observed_load(request)


@pytest.fixture(scope="module")
def prometheus(run):
    return run.require_prometheus()


def test_the_dashboard_has_every_panel_an_operator_expects():
    titles = {title for title, _ in panel_queries()}
    for wanted in ("Throughput (tokens/s)", "Requests/s by status", "Time to first token",
                   "Inter-token latency", "Running and waiting requests", "KV cache usage",
                   "Prefix cache hit rate", "Preemptions/s", "Engine step time",
                   "Batch size (sequences per step)", "Embed batch size", "Error rate"):
        assert wanted in titles, wanted
    exprs = " ".join(expr for _, expr in panel_queries())
    for q in ("0.5", "0.9", "0.99"):                # TTFT and ITL p50 / p90 / p99
        assert f"histogram_quantile({q}, sum by (le) (rate(attnserve_time_to_first_token_seconds_bucket" in exprs
        assert f"histogram_quantile({q}, sum by (le) (rate(attnserve_inter_token_latency_seconds_bucket" in exprs


def test_the_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "attnserve" and dashboard["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    boxes = [p["gridPos"] for p in panels(dashboard)]
    for i, a in enumerate(boxes):                  # no two panels overlap; all within 24 columns
        assert a["x"] + a["w"] <= 24
        for b in boxes[i + 1:]:
            assert (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                    or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"]), (a, b)
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert names == {"datasource", "instance"}


def test_the_dashboard_uses_only_metrics_the_server_exports(run):
    exported = {line.split("{")[0].split(" ")[0] for line in run.server.metrics().splitlines()
                if line and not line.startswith("#")}
    allowed = {name + suffix for name, (kind, _) in DESIGN_METRICS.items()
               for suffix in (_HISTOGRAM_SUFFIXES if kind == "histogram" else ("",))}
    used = set().union(*(metric_names(expr) for _, expr in panel_queries()))
    assert used, "no metric found in the dashboard"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    assert used <= allowed, f"not in DESIGN.md's metrics: {sorted(used - allowed)}"
    families = {re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(_HISTOGRAM_SUFFIXES) else n
                for n in used}
    assert families == set(DESIGN_METRICS), f"never shown: {sorted(set(DESIGN_METRICS) - families)}"


def test_prometheus_scraped_every_metric(run, prometheus):
    scraped = set(prometheus.api("label/__name__/values"))
    used = set().union(*(metric_names(expr) for _, expr in panel_queries()))
    assert used <= scraped, f"Prometheus never saw: {sorted(used - scraped)}"
    instances = prometheus.api("label/instance/values", **{"match[]": "attnserve_build_info"})
    assert instances == [f"127.0.0.1:{run.server.port}"]      # the $instance variable's values


@pytest.mark.parametrize("title, expr", panel_queries(), ids=[f"{t}:{e[:60]}" for t, e in panel_queries()])
def test_every_panel_query_returns_data(run, prometheus, title, expr):
    """As Grafana asks it: a range query over the load, every 1 s."""
    series = prometheus.query_range(as_grafana_would(expr), run.started, run.ended + 2)
    values = [float(v) for s in series for _, v in s["values"]]
    finite = [v for v in values if math.isfinite(v)]
    assert finite, f"{title}: no data for {expr}"
    assert min(finite) >= 0, f"{title}: negative values"
    now = prometheus.query(as_grafana_would(expr))                  # and as a stat shows it
    assert now, f"{title}: empty now for {expr}"


@pytest.mark.parametrize("title", sorted({t for t, _ in panel_queries()} - MAY_BE_ZERO))
def test_every_panel_moved_under_load(run, prometheus, title):
    values = []
    for panel_title, expr in panel_queries():
        if panel_title == title:
            series = prometheus.query_range(as_grafana_would(expr), run.started, run.ended + 2)
            values += [float(v) for s in series for _, v in s["values"]]
    assert max((v for v in values if math.isfinite(v)), default=0) > 0, f"{title} stayed at zero"


def test_the_load_preempted_and_prometheus_saw_it(run, prometheus):
    total = run.server.metric("attnserve_preemptions_total")
    assert total > 0, "the small KV cache should preempt under this load"
    assert prometheus.value("attnserve_preemptions_total") == total
