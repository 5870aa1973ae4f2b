"""Process entry point shared by the broker-driven services.

`run(name, make_handler)` sets up logging, the /metrics + /healthz endpoint, the
topics, SIGTERM/SIGINT handling and the broker loop; the service brings only its
handler.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Sequence

from shared.broker import BrokerRunner, Handler, abandon_after
from shared.config import Settings, get_settings
from shared.observability import serve_ops, setup_logging
from shared.schemas import DetectionEvent
from shared.topics import DETECTIONS, ensure_topics

log = logging.getLogger(__name__)


def one_blas_thread():
    """Numpy's BLAS on one thread in this process, from now on (the returned limiter can restore it).

    A service's matrix work shares the cores with the other services, which keep them busy; a second BLAS
    thread then only waits for a core and spins. Measured on a 2-core AMD EPYC with the other core busy,
    fusion's coat matching of one detection against 60 photos took 390 ms of CPU and 285 ms of wall time on
    two BLAS threads, 190 ms and 194 ms on one (with float pattern products; they now run in ONNX Runtime on
    one thread of their own, `shared.coat`). Concurrency comes from the processes, not from BLAS."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


async def run_handler(name: str, make_handler: Callable[[Settings], Awaitable[Handler]],
                      settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    # a hang here (seen right after a broker restarted empty) ends the process for its supervisor to restart
    await abandon_after(ensure_topics(settings.kafka_bootstrap), 60.0)
    handler = await make_handler(settings)
    runner = BrokerRunner(
        handler,
        settings.kafka_bootstrap,
        batch_max=settings.batch_max,
        batch_wait_ms=settings.batch_wait_ms,
        max_retries=settings.max_retries,
        retry_backoff_ms=settings.retry_backoff_ms,
        # the reconciler counts a queue whose committed offset stood still for stuck_after_s as stuck: a
        # batch sized to end within a quarter of that leaves room for one that runs four times slower
        # (every service must read the reconciler's DEER_STUCK_AFTER_S: compose, Stack and k8s share it)
        batch_budget_s=settings.stuck_after_s / 4,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stop)

    def health() -> dict:
        extra = getattr(handler, "health", lambda: {})()
        # ready only when the broker loop is and the handler does not say otherwise (e.g. a loop down)
        return {"service": name, **extra, "ready": runner.ready and extra.get("ready", True)}

    ops = await serve_ops(settings.metrics_port, health, settings.metrics_host)
    try:
        await runner.run()
    finally:
        close = getattr(handler, "close", None)
        if close is not None:
            await close()
        if ops is not None:
            ops.cancel()


def main(name: str, make_handler: Callable[[Settings], Awaitable[Handler]]) -> None:
    setup_logging(name)
    asyncio.run(run_handler(name, make_handler))


class CropExtractorHandler:
    """The shape every crop extractor service shares (coat, antler): it consumes detection events, answers
    only those whose expected components name it (the rest are acknowledged and skipped, so a switched-off
    extractor costs nothing), and runs its per-crop work on a thread per worker."""

    name: str  # the component, as the pipeline names it in `expected`
    input_topics = (DETECTIONS,)
    input_schema = DetectionEvent
    # An optional component: an event it gives up on (a bug, a crop it cannot handle) is dead-lettered
    # without failing the detection; fusion decides without it at the join deadline, flagged degraded.
    dead_letter_fails_detection = False

    def __init__(self, workers: int):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=self.name)

    async def close(self) -> None:
        self._pool.shutdown(wait=True)

    def expecting(self, events: Sequence[DetectionEvent]) -> list[int]:
        """Indexes of the events that expect this component."""
        return [i for i, e in enumerate(events) if self.name in e.expected]

    async def on_threads(self, fn: Callable, *args_per_call: tuple) -> list:
        """`fn(*args)` for each argument tuple, side by side on the worker threads, in order."""
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self._pool, fn, *args) for args in args_per_call)))


async def run_loop(name: str, make_worker: Callable[[Settings], Awaitable], settings: Settings | None = None) -> None:
    """The entry point of a service that is a supervised loop instead of a broker consumer (the census job):
    logging, /metrics + /healthz, SIGTERM/SIGINT, then `await worker.step()` every `worker.every_s` seconds.
    A step that raises is logged and counted, and the loop goes on: one bad property never stops the rest.
    On a signal the loop finishes the step in progress (its work is one transaction per property) and exits."""
    from shared.observability import ERRORS

    settings = settings or get_settings()
    worker = await make_worker(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    state = {"ready": True, "last_error": None}

    def health() -> dict:
        return {"service": name, **getattr(worker, "health", lambda: {})(), **state}

    ops = await serve_ops(settings.metrics_port, health, settings.metrics_host)
    try:
        while not stopping.is_set():
            try:
                await worker.step()
                state["last_error"] = None
            except Exception as exc:  # noqa: BLE001 - logged, counted, retried next round
                log.exception("%s: step failed", name)
                ERRORS.labels(name, type(exc).__name__).inc()
                state["last_error"] = f"{type(exc).__name__}: {exc}"[:500]
            try:
                await asyncio.wait_for(stopping.wait(), timeout=worker.every_s)
            except asyncio.TimeoutError:
                pass
    finally:
        await worker.close()
        if ops is not None:
            ops.cancel()


def main_loop(name: str, make_worker: Callable[[Settings], Awaitable]) -> None:
    setup_logging(name)
    asyncio.run(run_loop(name, make_worker))
