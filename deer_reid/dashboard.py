"""The Grafana dashboard, generated: `deer-reid dashboard --out deploy/grafana/dashboards/deer-reid.json`.

An overview row (throughput, detections by state, every consumer group's lag), then one row per service
with its throughput by outcome, its per-stage latency (p50 and p99), its errors and, for the services
that consume, its consumer group's lag and micro-batch size. Every metric named here is one that
tests/test_prometheus.py found by scraping the running stack with a real Prometheus.
"""
from __future__ import annotations

import json
from pathlib import Path

# service (as the row says) -> the `service` label values its metrics carry (the reconciler's broker loop
# is its dead-letter recorder), and the consumer group it reads as, if any
SERVICES = {
    "api": (("api",), None),
    "reconciler": (("reconciler", "dead-letters"), None),
    "fusion": (("fusion",), "deer-fusion"),
    "census": (("census",), None),
    "body": (("body",), "deer-body"),
    "coat": (("coat",), "deer-coat"),
    "antler": (("antler",), "deer-antler"),
    "pose": (("pose",), "deer-pose"),
}
WIDTH = 24


def _panel(title: str, exprs: list[tuple[str, str]], x: int, y: int, w: int = 8, unit: str = "short") -> dict:
    return {"type": "timeseries", "title": title, "datasource": {"type": "prometheus", "uid": "prometheus"},
            "gridPos": {"h": 7, "w": w, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"expr": e, "legendFormat": legend, "refId": chr(ord("A") + i)}
                        for i, (e, legend) in enumerate(exprs)]}


def _row(title: str, y: int) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y},
            "panels": []}


def dashboard() -> dict:
    panels = [_row("overview", 0),
              _panel("Throughput (events/s)", [("sum by (service) (rate(deer_events_total[1m]))", "{{service}}")],
                     0, 1),
              _panel("Detections by state", [("deer_detections", "{{state}}")], 8, 1),
              _panel("Consumer group lag (messages)",
                     [("sum by (group) (deer_group_lag)", "{{group}}")], 16, 1)]
    y = 8
    for name, (labels, group) in SERVICES.items():
        sel = f'service=~"{"|".join(labels)}"'
        panels.append(_row(name, y))
        y += 1
        row = [_panel(f"{name}: events by outcome (/s)",
                      [(f"sum by (outcome) (rate(deer_events_total{{{sel}}}[1m]))", "{{outcome}}")], 0, y),
               _panel(f"{name}: latency per stage",
                      [(f"histogram_quantile({q}, sum by (le, stage) (rate(deer_stage_seconds_bucket{{{sel}}}[1m])))",
                        f"{{{{stage}}}} p{int(q * 100)}") for q in (0.5, 0.99)], 8, y, unit="s"),
               _panel(f"{name}: errors (/s)",
                      [(f"sum by (kind) (rate(deer_errors_total{{{sel}}}[1m]))", "{{kind}}")], 16, y)]
        if group is not None:
            y += 7
            row += [_panel(f"{name}: lag of {group} (messages)",
                           [(f'sum by (topic) (deer_group_lag{{group="{group}"}})', "{{topic}}")], 0, y, w=12),
                    _panel(f"{name}: micro-batch size, mean",
                           [(f"sum(rate(deer_batch_size_sum{{{sel}}}[1m])) / sum(rate(deer_batch_size_count{{{sel}}}[1m]))",
                             "mean")], 12, y, w=12)]
        panels += row
        y += 7
    return {"uid": "deer-reid", "title": "deer-reid", "schemaVersion": 39, "version": 2, "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"}, "tags": ["deer-reid"], "panels": panels}


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def write(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render())
    return path
