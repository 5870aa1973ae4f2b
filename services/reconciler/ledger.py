"""PostgreSQL is the source of truth, Kafka the transport (invariant 1).

- the outbox relay publishes the detection events the API (or the reconciler) enqueued;
- the reconciler re-enqueues detections stuck in a non-terminal state, and fails
  those that made no progress after `max_attempts`, so every detection ends terminal;
- the dead-letter recorder marks detections failed with the reason a service gave.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Sequence

import asyncpg
from aiokafka import AIOKafkaProducer

from shared.broker import TRANSIENT, Handled, produce_retry_delay, producer_for
from shared.db import OUTBOX_CHANNEL, create_pool
from shared.observability import DETECTIONS_BY_STATE
from shared.pipeline import expected_components
from shared.schemas import Box, DeadLetter, DetectionEvent, JoinDeadline, PipelineConfig
from shared.states import PENDING, STATES
from shared.topics import DEAD_LETTERS, DETECTIONS, JOIN_DEADLINES, ensure_topics

log = logging.getLogger(__name__)

_PENDING = sorted(PENDING)


async def pipeline_config(conn: asyncpg.Connection) -> PipelineConfig:
    value = await conn.fetchval("SELECT value FROM runtime_config WHERE key = 'pipeline'")
    return PipelineConfig(**(value or {}))


def event_from_row(row: asyncpg.Record, config: PipelineConfig | None = None) -> DetectionEvent:
    """The detection event of a row: under the pipeline stamped at its first publication, if it had one."""
    x0, y0, x1, y1 = row["box"]
    stamped = row.get("pipeline")
    config = PipelineConfig(**stamped) if stamped else (config or PipelineConfig())
    expected = list(row.get("expected") or [])
    return DetectionEvent(
        detection_id=row["id"], site=row["site"], camera=row["camera"], captured_at=row["captured_at"],
        cls=row["cls"], box=Box(x0=x0, y0=y0, x1=x1, y1=y1), image_sha256=row["image_sha256"],
        crop_jpeg=bytes(row["crop"]), attempt=row["attempts"], mode=config.mode, property=row["property"],
        switches=config.switches(), expected=expected or expected_components(config, row["cls"]),
    )


async def relay_once(pool: asyncpg.Pool, producer: AIOKafkaProducer, limit: int) -> int:
    """Publish up to `limit` enqueued detections; the rows leave the outbox only once the broker has them."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """WITH batch AS (SELECT id, detection_id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
               SELECT b.id AS outbox_id, d.* FROM batch b JOIN detections d ON d.id = b.detection_id""",
            limit,
        )
        if not rows:
            return 0
        live = [r for r in rows if r["state"] in PENDING]
        config = await pipeline_config(conn)  # the run-time switches travel with each event
        events = [event_from_row(r, config) for r in live]
        # A detection keeps the pipeline of its first publication: a republished one runs the same
        # components as before, so the join never waits for what was never asked for.
        await conn.executemany(
            "UPDATE detections SET pipeline = $2, expected = $3 WHERE id = $1 AND pipeline IS NULL",
            [(e.detection_id, {"mode": e.mode, **e.switches}, e.expected) for e in events])
        futures = [await producer.send(DETECTIONS.name, e.to_bytes(), key=str(e.detection_id).encode())
                   for e in events]
        await asyncio.gather(*futures)
        await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r["outbox_id"] for r in rows])
        await conn.execute(
            "UPDATE detections SET state = 'extracting', updated_at = now() WHERE id = ANY($1::uuid[]) "
            "AND state = 'received'", [r["id"] for r in live])
        return len(rows)


async def reconcile_once(pool: asyncpg.Pool, stuck_after_s: float, max_attempts: int) -> tuple[int, int]:
    """Re-enqueue detections with no progress; fail those out of attempts.

    The patience doubles with every attempt up to 8x (stuck_after_s, 2x, 4x, 8x, 8x, ...):
    a service that is down for a while is not flooded with copies of the same work, and
    failing a detection is a last resort, over an hour away with the defaults. Returns (re-enqueued,
    failed). Detections still waiting in the outbox are not stuck.
    """
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """WITH stuck AS (
                   SELECT id FROM detections d
                   WHERE state = ANY($1::text[])
                     AND updated_at < now() - make_interval(secs => $2 * power(2, least(attempts, 3)))
                     AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.detection_id = d.id)
                   ORDER BY updated_at LIMIT 2000 FOR UPDATE SKIP LOCKED)
               UPDATE detections d SET
                   attempts = d.attempts + 1, updated_at = now(),
                   state = CASE WHEN d.attempts + 1 >= $3 THEN 'failed' ELSE d.state END,
                   state_reason = CASE WHEN d.attempts + 1 >= $3
                       THEN format('no progress after %s attempts', d.attempts + 1) ELSE d.state_reason END
               FROM stuck WHERE d.id = stuck.id
               RETURNING d.id, d.state""",
            _PENDING, stuck_after_s, max_attempts,
        )
        retry = [r["id"] for r in rows if r["state"] != "failed"]
        if retry:
            await conn.execute("INSERT INTO outbox (detection_id) SELECT unnest($1::uuid[])", retry)
            await conn.execute(f"NOTIFY {OUTBOX_CHANNEL}")
        if rows:
            log.warning("reconciler: re-enqueued %d stuck detections, failed %d", len(retry), len(rows) - len(retry))
        return len(retry), len(rows) - len(retry)


async def announce_due_joins(pool: asyncpg.Pool, producer: AIOKafkaProducer, join_timeout_s: float,
                             limit: int = 1000) -> int:
    """Tell fusion about joins past their deadline; each is announced again one timeout later if still open
    (the announcement may be lost, and deciding is idempotent)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """UPDATE detections SET join_deadline = now() + make_interval(secs => $1::float8)
               WHERE id IN (SELECT id FROM detections WHERE state = 'fusing' AND join_deadline < now()
                            ORDER BY join_deadline LIMIT $2 FOR UPDATE SKIP LOCKED)
               RETURNING id, property""", join_timeout_s, limit)
    if rows:
        futures = [await producer.send(JOIN_DEADLINES.name, JoinDeadline(detection_id=r["id"], property=r["property"])
                                       .to_bytes(), key=r["property"].encode()) for r in rows]
        await asyncio.gather(*futures)
    return len(rows)


async def count_states(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT state, count(*) AS n FROM detections GROUP BY state")
    counts = {state: 0 for state in STATES}
    counts.update({r["state"]: r["n"] for r in rows})
    for state, n in counts.items():
        DETECTIONS_BY_STATE.labels(state).set(n)
    return counts


class DeadLetterRecorder:
    """Marks the detection of every dead letter failed, with the reason."""

    name = "dead-letters"
    input_topics = DEAD_LETTERS
    input_schema = DeadLetter
    dead_letters = False

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def handle(self, letters: Sequence[DeadLetter]) -> list[Handled]:
        marks = [(l.detection_id, f"{l.service}: {l.reason}") for l in letters
                 if l.detection_id is not None and l.fails_detection]
        if marks:
            await self.pool.executemany(
                """UPDATE detections SET state = 'failed', state_reason = $2, updated_at = now()
                   WHERE id = $1 AND state = ANY($3::text[])""",
                [(d, reason, _PENDING) for d, reason in marks],
            )
        for letter in letters:
            log.warning("dead letter from %s (%s): %s", letter.service, letter.detection_id, letter.reason)
        return [Handled() for _ in letters]


class Reconciler(DeadLetterRecorder):
    """The reconciler process: dead-letter recorder, plus the outbox relay and the stuck-work loop."""

    def __init__(self, pool: asyncpg.Pool, settings):
        super().__init__(pool)
        self.settings = settings
        self.producer = producer_for(settings.kafka_bootstrap, "reconciler")
        self._tasks: list[asyncio.Task] = []
        self.states: dict[str, int] = {}

    def health(self) -> dict:
        return {"detections": self.states}

    async def start(self) -> None:
        await self.producer.start()
        self._wake = asyncio.Event()
        self._listener = await self.pool.acquire()
        # Wake the relay the moment something is enqueued; polling stays as the fallback.
        await self._listener.add_listener(OUTBOX_CHANNEL, lambda *_: self._wake.set())
        self._tasks = [asyncio.create_task(self._relay_loop(), name="relay"),
                       asyncio.create_task(self._reconcile_loop(), name="reconcile"),
                       asyncio.create_task(self._join_deadline_loop(), name="join-deadlines")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.release(self._listener)
        await self.producer.stop()
        await self.pool.close()

    async def _relay_loop(self) -> None:
        failures = 0
        while True:
            try:
                sent = await relay_once(self.pool, self.producer, self.settings.relay_batch)
                failures = 0
            except TRANSIENT as exc:
                log.warning("relay: %r; retrying", exc)
                sent = 0
                await asyncio.sleep(produce_retry_delay(exc, failures, 0.5))
                failures += 1
            if sent < self.settings.relay_batch:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()

    async def _join_deadline_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.join_sweep_every_s)
            try:
                await announce_due_joins(self.pool, self.producer, self.settings.join_timeout_s)
            except TRANSIENT as exc:
                log.warning("join deadlines: %r; retrying", exc)

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reconcile_every_s)
            try:
                # A broker restarted empty has lost its topics: put them back before anything auto-creates them.
                await ensure_topics(self.settings.kafka_bootstrap)
                await reconcile_once(self.pool, self.settings.stuck_after_s, self.settings.max_attempts)
                self.states = await count_states(self.pool)
            except TRANSIENT as exc:
                log.warning("reconciler: %r; retrying", exc)


async def make_handler(settings) -> Reconciler:
    reconciler = Reconciler(await create_pool(settings.database_url), settings)
    await reconciler.start()
    return reconciler
