"""Process entry point shared by the broker-driven services.

`run(name, make_handler)` sets up logging, the /metrics + /healthz endpoint, the
topics, SIGTERM/SIGINT handling and the broker loop; the service brings only its
handler.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable

from shared.broker import BrokerRunner, Handler
from shared.config import Settings, get_settings
from shared.observability import serve_ops, setup_logging
from shared.topics import ensure_topics

log = logging.getLogger(__name__)


async def run_handler(name: str, make_handler: Callable[[Settings], Awaitable[Handler]],
                      settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    await ensure_topics(settings.kafka_bootstrap)
    handler = await make_handler(settings)
    runner = BrokerRunner(
        handler,
        settings.kafka_bootstrap,
        batch_max=settings.batch_max,
        batch_wait_ms=settings.batch_wait_ms,
        max_retries=settings.max_retries,
        retry_backoff_ms=settings.retry_backoff_ms,
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
