"""Prometheus metrics, logging set-up and the /metrics + /healthz endpoint of a service."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

EVENTS = Counter("deer_events_total", "Events handled, by outcome", ["service", "outcome"])
STAGE_SECONDS = Histogram(
    "deer_stage_seconds", "Time spent per stage", ["service", "stage"], buckets=_LATENCY_BUCKETS
)
BATCH_SIZE = Histogram(
    "deer_batch_size", "Events per processed batch", ["service"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
ERRORS = Counter("deer_errors_total", "Errors, by kind", ["service", "kind"])
CONSUMER_LAG = Gauge("deer_consumer_lag", "Messages behind the end of the partition", ["service", "topic", "partition"])
# measured by the reconciler from the broker's offsets each round, whatever the consumers are doing
GROUP_LAG = Gauge("deer_group_lag", "Messages a consumer group has yet to consume (broker offsets)", ["group", "topic"])
DETECTIONS_BY_STATE = Gauge("deer_detections", "Detections by state (reconciler's view)", ["state"])
CENSUS_RUNS = Counter("deer_census_runs_total", "Census re-clusterings, by outcome", ["outcome"])
CENSUS_MOVES = Counter("deer_census_moves_total", "Detections the census job moved", [])
CENSUS_QUESTIONS = Gauge("deer_census_questions_open", "Open census questions", ["property"])


def setup_logging(service: str) -> None:
    level = os.environ.get("DEER_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


async def metrics_endpoint(_: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def ops_app(health: Callable[[], dict]) -> Starlette:
    """A minimal app with /metrics and /healthz (503 until `health()` says ready)."""

    async def healthz(_: Request) -> Response:
        state = health()
        return JSONResponse(state, status_code=200 if state.get("ready") else 503)

    return Starlette(routes=[Route("/metrics", metrics_endpoint), Route("/healthz", healthz)])


async def serve_ops(port: int, health: Callable[[], dict], host: str = "127.0.0.1") -> asyncio.Task | None:
    """Serve /metrics and /healthz on `port` in this event loop; no-op when port is 0."""
    if not port:
        return None
    config = uvicorn.Config(ops_app(health), host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # the service owns SIGTERM
    return asyncio.create_task(server.serve(), name="ops-http")


def metric_samples(exposition: str, family: str) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of one metric family in a `/metrics` text: how the bench and the soak
    read the services' own counters and histograms (a counter's family drops its `_total`)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(exposition) if f.name == family
            for s in f.samples]
