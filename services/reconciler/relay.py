"""The outbox relay: publishes the detection events the API (or the stuck-work rounds) enqueued.

PostgreSQL is the source of truth and Kafka the transport (invariant 1): a detection's event is
enqueued in the outbox in the transaction that stores it, and leaves the outbox only once the broker
has it.
"""
from __future__ import annotations

import asyncio
import logging

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import InvalidTopicError, MessageSizeTooLargeError

from services.reconciler.dead_letters import fail_pending
from shared.db import OUTBOX_CHANNEL
from shared.observability import ERRORS
from shared.pipeline import detection_event, expected_components
from shared.schemas import DetectionEvent, PipelineConfig
from shared.states import PENDING
from shared.topics import DETECTIONS

log = logging.getLogger(__name__)

# A row the broker will never take (too large, malformed): retrying it would block every row behind it.
POISON = (MessageSizeTooLargeError, InvalidTopicError, ValueError, TypeError)
RELAY_LEASE_S = 60.0
IDLE_POLL_S = 0.5  # with less than a batch enqueued, look again after this unless a NOTIFY comes first


async def record_landing(conn: asyncpg.Connection, landed: list[tuple]) -> None:
    """Where each detection's event landed ((detection id, partition, offset)): the reconciler tells queued
    work from lost work by it, and the join deadline waits on a component whose queue holds the event."""
    await conn.executemany("UPDATE detections SET published_partition = $2, published_offset = $3 WHERE id = $1",
                           landed)


async def pipeline_config(conn: asyncpg.Connection) -> PipelineConfig:
    value = await conn.fetchval("SELECT value FROM runtime_config WHERE key = 'pipeline'")
    return PipelineConfig(**(value or {}))


def event_from_row(row: asyncpg.Record, config: PipelineConfig | None = None) -> DetectionEvent:
    """The detection event of a row: under the pipeline stamped at its first publication, if it had one."""
    stamped = row.get("pipeline")
    config = PipelineConfig(**stamped) if stamped else (config or PipelineConfig())
    expected = list(row.get("expected") or []) or expected_components(config, row["cls"])
    return detection_event(row, config, expected, bytes(row["crop"]), attempt=row["attempts"])


async def relay_once(pool: asyncpg.Pool, producer: AIOKafkaProducer, limit: int, lease_s: float = RELAY_LEASE_S) -> int:
    """Publish up to `limit` enqueued detections; a row leaves the outbox only once the broker has its event.

    Three steps, none holding a transaction across a broker round trip: claim the rows for a lease (and
    stamp each detection's pipeline at its first publication), publish, then delete what the broker
    acknowledged. A row the broker refuses for good is dead-lettered: its detection fails with the
    reason and the rows behind it flow. A transient failure releases the claims and is raised.
    """
    async with pool.acquire() as conn, conn.transaction():
        claimed = await conn.fetch(
            """WITH batch AS (SELECT id FROM outbox WHERE claimed_until IS NULL OR claimed_until < now()
                              ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
               UPDATE outbox o SET claimed_until = now() + make_interval(secs => $2::float8)
               FROM batch WHERE o.id = batch.id RETURNING o.id AS outbox_id, o.detection_id""", limit, lease_s)
        if not claimed:
            return 0
        rows = await conn.fetch("SELECT * FROM detections WHERE id = ANY($1::uuid[])",
                                [r["detection_id"] for r in claimed])
        live = [r for r in rows if r["state"] in PENDING]
        config = await pipeline_config(conn)  # the run-time switches travel with each event
        events, poisoned = {}, {}
        for r in live:
            try:
                events[r["id"]] = event_from_row(r, config)
            except ValueError as exc:  # a row no event can be made of (a validation error is a ValueError)
                poisoned[r["id"]] = exc
        # A detection keeps the pipeline of its first publication: a republished one runs the same
        # components as before, so the join never waits for what was never asked for.
        await conn.executemany(
            "UPDATE detections SET pipeline = $2, expected = $3 WHERE id = $1 AND pipeline IS NULL",
            [(e.detection_id, {"mode": e.mode, **e.switches}, e.expected) for e in events.values()])
    pending = []
    for det_id, event in events.items():
        try:
            pending.append((det_id, await producer.send(DETECTIONS.name, event.to_bytes(),
                                                        key=str(det_id).encode())))
        except POISON as exc:
            poisoned[det_id] = exc
        except BaseException:
            await _release(pool, claimed)
            raise
    results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
    transient = next((r for r in results if isinstance(r, BaseException) and not isinstance(r, POISON)), None)
    poisoned.update({det_id: r for (det_id, _), r in zip(pending, results) if isinstance(r, POISON)})
    sent = [det_id for (det_id, _), r in zip(pending, results) if not isinstance(r, BaseException)]
    landed = [(det_id, r.partition, r.offset) for (det_id, _), r in zip(pending, results)
              if not isinstance(r, BaseException)]
    done = set(sent) | set(poisoned) | {r["id"] for r in rows if r["state"] not in PENDING}
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])",
                           [r["outbox_id"] for r in claimed if r["detection_id"] in done])
        await conn.execute("UPDATE outbox SET claimed_until = NULL WHERE id = ANY($1::bigint[])",
                           [r["outbox_id"] for r in claimed if r["detection_id"] not in done])
        await conn.execute(
            "UPDATE detections SET state = 'extracting', updated_at = now() WHERE id = ANY($1::uuid[]) "
            "AND state = 'received'", sent)
        await record_landing(conn, landed)
        if poisoned:
            await fail_pending(conn, [(d, f"relay: the broker refuses this detection's event: {exc!r}"[:2000])
                                      for d, exc in poisoned.items()])
    for det_id, exc in poisoned.items():
        ERRORS.labels("reconciler", "relay-refused").inc()
        log.error("relay: dead-lettered detection %s: the broker refuses its event: %r", det_id, exc)
    if transient is not None:
        raise transient
    return len(claimed)


async def _release(pool: asyncpg.Pool, claimed) -> None:
    await pool.execute("UPDATE outbox SET claimed_until = NULL WHERE id = ANY($1::bigint[])",
                       [r["outbox_id"] for r in claimed])


class OutboxRelay:
    """The relay loop's round: publish a batch, and when the outbox holds less than a batch, wait for the
    next NOTIFY of an enqueued detection (polling stays as the fallback)."""

    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, batch: int):
        self.pool = pool
        self.producer = producer
        self.batch = batch
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None

    async def listen(self) -> None:
        self._listener = await self.pool.acquire()
        await self._listener.add_listener(OUTBOX_CHANNEL, self._on_notify)

    def _on_notify(self, *_) -> None:
        self._wake.set()

    async def round(self) -> None:
        if await relay_once(self.pool, self.producer, self.batch) < self.batch:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=IDLE_POLL_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def close(self) -> None:
        await self._listener.remove_listener(OUTBOX_CHANNEL, self._on_notify)
        await self.pool.release(self._listener)
