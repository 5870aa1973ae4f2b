"""The reconciler process: the dead-letter recorder as its broker runner's handler, and beside it three
loops under supervision (the outbox relay, the stuck-work rounds, the join deadlines)."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Sequence

import asyncpg

from services.reconciler.dead_letters import DeadLetterRecorder
from services.reconciler.reconcile import StuckWork, announce_due_joins
from services.reconciler.relay import OutboxRelay
from shared.broker import Handled, backoff_s, is_transient, produce_retry_delay, producer_for
from shared.db import create_pool
from shared.observability import ERRORS
from shared.schemas import DeadLetter

log = logging.getLogger(__name__)


class Reconciler:
    """The reconciler as the broker runner sees it: a handler of the dead letters, which its recorder
    answers (the consumer group, `deer-dead-letters`, keeps the recorder's name), and whose health and
    close cover the loops it runs beside."""

    name = DeadLetterRecorder.name
    input_topics = DeadLetterRecorder.input_topics
    input_schema = DeadLetterRecorder.input_schema
    dead_letters = DeadLetterRecorder.dead_letters

    def __init__(self, pool: asyncpg.Pool, settings):
        self.pool = pool
        self.settings = settings
        self.recorder = DeadLetterRecorder(pool)
        self.producer = producer_for(settings.kafka_bootstrap, "reconciler")
        self.relay = OutboxRelay(pool, self.producer, settings.relay_batch)
        self.stuck_work = StuckWork(pool, settings)
        self._tasks: list[asyncio.Task] = []
        self.down: dict[str, str] = {}  # loop name -> the error that took it down

    async def handle(self, letters: Sequence[DeadLetter]) -> list[Handled]:
        return await self.recorder.handle(letters)

    def health(self) -> dict:
        # not ready while any background loop is down: an operator sees it, an orchestrator stops routing
        return {"detections": self.stuck_work.states, "queued_not_stuck": self.stuck_work.queued,
                "loops_down": dict(self.down), "ready": not self.down}

    async def start(self) -> None:
        await self.producer.start()
        await self.relay.listen()
        loops = {"relay": self.relay.round, "reconcile": self._reconcile_round,
                 "join-deadlines": self._join_deadline_round}
        self._tasks = [asyncio.create_task(self.supervised(name, round_), name=name) for name, round_ in loops.items()]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.relay.close()
        await self.producer.stop()
        await self.pool.close()

    async def supervised(self, name: str, round_: Callable[[], Awaitable[None]]) -> None:
        """Run one loop's rounds forever. Any error is logged with its traceback, counted, and the loop
        is down (health not ready) until a round succeeds again, after a pause that doubles up to 30 s."""
        failures = 0
        while True:
            delay = 0.0
            try:
                await round_()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a loop must outlive any bug in one round
                transient = is_transient(exc)
                self._failed(name, exc, failures, transient=transient)
                # the broker or database away: back soon; a bug: back off up to 30 s
                delay = produce_retry_delay(exc, failures, 0.5) if transient else backoff_s(0.5, failures, cap=30.0)
                failures += 1
            else:
                if name in self.down:
                    log.warning("%s loop recovered after %d failed rounds", name, failures)
                    del self.down[name]
                failures = 0
                continue
            await asyncio.sleep(delay)

    def _failed(self, name: str, exc: BaseException, failures: int, *, transient: bool) -> None:
        self.down[name] = repr(exc)[:500]
        ERRORS.labels("reconciler", f"loop-{name}").inc()
        if transient:
            log.warning("%s loop: %r; retrying", name, exc)
        else:
            log.error("%s loop failed (round %d); restarting it", name, failures + 1, exc_info=exc)

    async def _reconcile_round(self) -> None:
        await asyncio.sleep(self.settings.reconcile_every_s)
        await self.stuck_work.round()

    async def _join_deadline_round(self) -> None:
        await asyncio.sleep(self.settings.join_sweep_every_s)
        # The ceiling of a join's waiting on flowing queues is the reconciler's trust in a flowing queue
        # (queued_max_s): past it, a detection is no longer held by its join, as no longer counted queued.
        await announce_due_joins(self.pool, self.producer, self.settings.join_timeout_s, self.stuck_work.backlog,
                                 self.settings.queued_max_s)


async def make_handler(settings) -> Reconciler:
    reconciler = Reconciler(await create_pool(settings.database_url), settings)
    await reconciler.start()
    return reconciler
