"""A real Prometheus (Debian's) scrapes the running stack: throughput, per-stage latency histograms,
consumer-group lag that moves while a consumer is stuck, and errors come back from its HTTP API; the
Grafana dashboard queries only metrics it found, a row per service."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from deer_reid import dashboard
from deer_reid.ingest import wait_terminal
from shared.embedded import free_port
from tests.stack_helpers import WAIT_S, ingest, paused, until

pytestmark = pytest.mark.stack
PROMETHEUS = "/usr/bin/prometheus"  # Debian's package; scripts/setup.sh installs it
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory):
    assert shutil.which(PROMETHEUS), f"{PROMETHEUS} missing: run scripts/setup.sh (apt-get install prometheus)"
    home = tmp_path_factory.mktemp("prometheus")
    targets = [{"targets": [f"127.0.0.1:{child.port}"], "labels": {"job_service": name}}
               for name, child in stack.children.items()]
    (home / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "deer-reid", "static_configs": targets}]}))
    port = free_port()
    log = open(home / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={home / 'prometheus.yml'}",
                             f"--storage.tsdb.path={home / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (home / "prometheus.log").read_text()[-2000:]
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


async def query(url: str, expr: str) -> list[dict]:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{url}/api/v1/query", params={"query": expr})
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


async def eventually(url: str, expr: str, accept, timeout: float = 60.0) -> list[dict]:
    """The result of `expr` once `accept(result)`; AssertionError with the last result at the timeout."""
    return await until(lambda: query(url, expr), accept, timeout=timeout, every=1.0,
                       what=f"Prometheus to answer {expr!r} as expected")


def value(series: list[dict], **labels) -> float | None:
    for s in series:
        if all(s["metric"].get(k) == v for k, v in labels.items()):
            return float(s["value"][1])
    return None


async def test_prometheus_scrapes_every_service_and_sees_throughput_latency_lag_and_errors(
        prometheus, stack, nyala_paths):
    async with httpx.AsyncClient(timeout=10) as client:
        async def targets() -> list[dict]:
            return (await client.get(f"{prometheus}/api/v1/targets")).json()["data"]["activeTargets"]

        await until(targets, lambda active: {t["labels"]["job_service"] for t in active if t["health"] == "up"}
                    == set(stack.children), timeout=30, every=0.5, what="every service's target to be up")

    # two rounds: in a fresh stack the first creates the series (a rate needs two samples of each)
    for part in (nyala_paths[1000:1002], nyala_paths[1002:1006]):
        ids = await ingest(stack, part, "prom-cam")
        await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False, headers=stack.auth)
        await asyncio.sleep(3)  # scraped every second
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth) as client:  # an error a client makes
        r = await client.post("/v1/uploads", data={"site": "prom-cam", "captured_at": "2025-11-01T06:00:00Z"},
                              files=[("files", ("bad.jpg", b"not an image", "image/jpeg"))])
        assert r.status_code == 422

    # counters, not increase(): in a fresh stack a series is born with its first event, which increase() misses
    await eventually(prometheus, "sum by (service) (deer_events_total)",
                     lambda r: all((value(r, service=s) or 0) >= 4 for s in ("body", "fusion", "api")))
    assert await query(prometheus, "sum by (service) (rate(deer_events_total[1m]))")  # the dashboard's throughput
    p99 = await eventually(
        prometheus, "histogram_quantile(0.99, sum by (le, service, stage) (rate(deer_stage_seconds_bucket[5m])))",
        lambda r: {"body", "fusion", "api"} <= {s["metric"]["service"] for s in r})
    stages = {(s["metric"]["service"], s["metric"]["stage"]) for s in p99 if s["value"][1] != "NaN"}
    assert ("api", "upload") in stages and any(svc == "body" for svc, _ in stages) \
        and any(svc == "fusion" for svc, _ in stages), stages
    # the counter itself: a series born with this rejection has no earlier sample for increase() to use
    await eventually(prometheus, 'deer_events_total{service="api", outcome="rejected"}',
                     lambda r: bool(r) and float(r[0]["value"][1]) > 0)
    async with httpx.AsyncClient(timeout=10) as client:
        meta = (await client.get(f"{prometheus}/api/v1/metadata", params={"metric": "deer_errors_total"})).json()
    assert meta["data"]["deer_errors_total"][0]["type"] == "counter"  # errors are exported (none happened yet)

    # the body group's lag climbs while the body service is stuck (it cannot report anything itself), and
    # falls back to nothing once it runs again: the reconciler measures it from the broker's offsets
    with paused(stack, "body"):
        stuck = await ingest(stack, nyala_paths[1006:1009], "prom-stuck-cam")
        await eventually(prometheus, 'sum(deer_group_lag{group="deer-body"})',
                         lambda r: bool(r) and float(r[0]["value"][1]) >= 3, timeout=40)
    await wait_terminal(stack.api_url, stuck, timeout=WAIT_S, progress=False, headers=stack.auth)
    await eventually(prometheus, 'sum(deer_group_lag{group="deer-body"})',
                     lambda r: bool(r) and float(r[0]["value"][1]) == 0, timeout=40)
    every_group = await query(prometheus, "deer_group_lag")
    assert {s["metric"]["group"] for s in every_group} >= {"deer-body", "deer-coat", "deer-antler", "deer-pose",
                                                          "deer-fusion"}

    # the dashboard: what it asks for, Prometheus has; one row per service
    async with httpx.AsyncClient(timeout=10) as client:
        names = set((await client.get(f"{prometheus}/api/v1/label/__name__/values")).json()["data"])
        families = (await client.get(f"{prometheus}/api/v1/metadata")).json()["data"]
    # a family scraped without samples yet (errors, before any) is found too: its HELP and TYPE came
    names |= {f + suffix for f in families for suffix in ("", "_bucket", "_sum", "_count")}
    board = json.loads((REPO / "deploy/grafana/dashboards/deer-reid.json").read_text())
    assert board == dashboard.dashboard(), "run `deer-reid dashboard`"
    used = {m for p in board["panels"] for t in p.get("targets", []) for m in re.findall(r"\bdeer_[a-z_]+\b", t["expr"])}
    assert used and used <= names, used - names
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows[0] == "overview" and sorted(rows[1:]) == sorted(stack.children), rows
