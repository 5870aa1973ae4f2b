"""PostgreSQL is the source of truth, Kafka the transport (invariant 1).

- the outbox relay publishes the detection events the API (or the reconciler) enqueued;
- the reconciler re-enqueues detections stuck in a non-terminal state, and fails
  those that made no progress after `max_attempts`, so every detection ends terminal;
- the dead-letter recorder marks detections failed with the reason a service gave.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable, Sequence

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import InvalidTopicError, MessageSizeTooLargeError

from shared.broker import Handled, abandon_after, backoff_s, is_transient, produce_retry_delay, producer_for, \
    refuse_topic_auto_creation
from shared.db import OUTBOX_CHANNEL, create_pool
from shared.log_end import true_end_offsets
from shared.observability import DETECTIONS_BY_STATE, ERRORS, GROUP_LAG
from shared.pipeline import detection_event, expected_components
from shared.schemas import DeadLetter, DetectionEvent, JoinDeadline, PipelineConfig
from shared.states import PENDING, STATES
from shared.topics import DEAD_LETTERS, DETECTIONS, FEATURES_ANTLER, FEATURES_BODY, FEATURES_COAT, FEATURES_POSE, \
    JOIN_DEADLINES, POSE_REQUESTS, Topic, ensure_topics

log = logging.getLogger(__name__)

_PENDING = sorted(PENDING)
RECONCILE_PAGE = 2000  # overdue detections read and judged in one transaction
RECONCILE_MAX_PAGES = 100  # a round looks at up to 200,000 of them: a season's backlog and more


async def pipeline_config(conn: asyncpg.Connection) -> PipelineConfig:
    value = await conn.fetchval("SELECT value FROM runtime_config WHERE key = 'pipeline'")
    return PipelineConfig(**(value or {}))


def event_from_row(row: asyncpg.Record, config: PipelineConfig | None = None) -> DetectionEvent:
    """The detection event of a row: under the pipeline stamped at its first publication, if it had one."""
    stamped = row.get("pipeline")
    config = PipelineConfig(**stamped) if stamped else (config or PipelineConfig())
    expected = list(row.get("expected") or []) or expected_components(config, row["cls"])
    return detection_event(row, config, expected, bytes(row["crop"]), attempt=row["attempts"])


# A row the broker will never take (too large, malformed): retrying it would block every row behind it.
POISON = (MessageSizeTooLargeError, InvalidTopicError, ValueError, TypeError)
RELAY_LEASE_S = 60.0


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
        await conn.executemany("UPDATE detections SET published_partition = $2, published_offset = $3 WHERE id = $1",
                               landed)
        if poisoned:
            await conn.executemany(
                """UPDATE detections SET state = 'failed', state_reason = $2, updated_at = now()
                   WHERE id = $1 AND state = ANY($3::text[])""",
                [(d, f"relay: the broker refuses this detection's event: {exc!r}"[:2000], _PENDING)
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


@dataclass(frozen=True)
class Position:
    """Where a consumer group stands on a topic: per partition its committed offset and the log's end."""

    committed: dict[int, int]
    end: dict[int, int]

    def waiting(self, partition: int) -> bool:
        return self.committed.get(partition, 0) < self.end.get(partition, 0)


@dataclass(frozen=True)
class Backlog:
    """The two queues a detection can wait in before its decision: its event in the body group's queue
    (where it landed is known), then its body features in the fusion group's. `flowing` names the
    (topic, partition) whose group offset moved lately."""

    body: Position
    fusion: Position | None = None
    flowing: frozenset[tuple[str, int]] = frozenset()

    def in_body_queue(self, partition: int | None, offset: int | None) -> bool:
        """Its event waits in a body partition that flows: not consumed yet, and still in the log (a broker
        restarted empty has lost it). A partition that does not move (a consumer wedged, hung or gone)
        holds stuck work, not queued work: re-publishing is then the cure, as it was seen to be after a
        broker restarted empty."""
        if partition is None or offset is None or partition not in self.body.end \
                or (DETECTIONS.name, partition) not in self.flowing:
            return False
        return self.body.committed.get(partition, 0) <= offset < self.body.end[partition]

    def fusion_busy(self) -> bool:
        """Fusion works through a queue of body features (some partition waits and moves): a detection the
        body has answered may be in it (where is not known, so any flowing fusion queue counts)."""
        if self.fusion is None:
            return False
        return any(self.fusion.waiting(p) and (FEATURES_BODY.name, p) in self.flowing for p in self.fusion.end)

    def queued(self, state: str, partition: int | None, offset: int | None) -> bool:
        if state == "extracting" and self.in_body_queue(partition, offset):
            return True
        return state in ("extracting", "fusing") and self.fusion_busy()


class QueueWatch:
    """Remembers when a group's committed offset of each (topic, partition) last moved, across rounds."""

    def __init__(self):
        self._last: dict[tuple[str, int], tuple[int, float]] = {}  # -> (committed offset, when it last changed)

    def flowing(self, positions: dict[str, Position], within_s: float, now: float | None = None) -> frozenset:
        """(topic, partition) whose group offset moved within `within_s` (a first sighting counts as a move)."""
        import time

        now = time.monotonic() if now is None else now
        out = set()
        for topic, position in positions.items():
            for p in position.end:
                offset = position.committed.get(p, 0)
                last = self._last.get((topic, p))
                if last is None or last[0] != offset:
                    self._last[(topic, p)] = (offset, now)
                if now - self._last[(topic, p)][1] <= within_s:
                    out.add((topic, p))
        return frozenset(out)


async def reconcile_once(pool: asyncpg.Pool, stuck_after_s: float, max_attempts: int,
                         backlog: Backlog | None = None, queued_max_s: float = 1800.0,
                         suspects: set | None = None) -> tuple[int, int, int]:
    """Re-enqueue detections with no progress; fail those out of attempts.

    The patience doubles with every attempt up to 8x (stuck_after_s, 2x, 4x, 8x, 8x, ...):
    a service that is down for a while is not flooded with copies of the same work, and
    failing a detection is a last resort, over an hour away with the defaults. Detections still
    waiting in the outbox are not stuck, and neither is one whose event is queued in the log behind
    others (`backlog`): in a season's backlog nearly every detection waits longer than the patience,
    and re-publishing it would only queue a copy behind itself. No detection counts as queued for more
    than `queued_max_s` without progress: the consumer groups' offsets were seen to move oddly after a
    broker restarted empty (a fresh consumer committing its old offset into the new broker's group), and
    a misjudged detection must cost time, never its decision. With `suspects` (kept by the caller across
    rounds), a detection is re-published only when two rounds in a row find it stuck: the offsets and the
    rows are read at two moments, and a detection passing from one queue to the next between them looked
    stuck for one round. Returns (re-enqueued, failed, queued).
    """
    totals = [0, 0, 0]
    seen_stuck: set = set()
    after: tuple = (datetime.min.replace(tzinfo=timezone.utc), uuid.UUID(int=0))
    # Page through every overdue detection, oldest first: rows judged queued are left as they are, and a
    # single page would bring the same oldest queued rows back every round, starving stuck work behind them.
    for _ in range(RECONCILE_MAX_PAGES):
        async with pool.acquire() as conn, conn.transaction():
            overdue = await conn.fetch(
                """SELECT id, state, attempts, published_partition, published_offset, updated_at,
                          extract(epoch FROM now() - updated_at) AS waited FROM detections d
                   WHERE state = ANY($1::text[])
                     AND updated_at < now() - make_interval(secs => $2 * power(2, least(attempts, 3)))
                     AND (updated_at, id) > ($3, $4)
                     AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.detection_id = d.id)
                   ORDER BY updated_at, id LIMIT $5 FOR UPDATE SKIP LOCKED""",
                _PENDING, stuck_after_s, after[0], after[1], RECONCILE_PAGE)
            if not overdue:
                break
            after = (overdue[-1]["updated_at"], overdue[-1]["id"])
            retried, failed, queued = await _reconcile_page(conn, overdue, max_attempts, backlog, queued_max_s,
                                                            suspects, seen_stuck)
            totals = [totals[0] + retried, totals[1] + failed, totals[2] + queued]
        if len(overdue) < RECONCILE_PAGE:
            break
    if suspects is not None:
        suspects.clear()
        suspects.update(seen_stuck)
    retried, failed, queued = totals
    if queued:
        log.info("reconciler: %d overdue detections are queued behind others, not stuck", queued)
    if retried or failed:
        log.warning("reconciler: re-enqueued %d stuck detections, failed %d (%d queued, not stuck)",
                    retried, failed, queued)
    return retried, failed, queued


async def _reconcile_page(conn: asyncpg.Connection, overdue: list, max_attempts: int, backlog: Backlog | None,
                          queued_max_s: float, suspects: set | None, seen_stuck: set) -> tuple[int, int, int]:
    """One page of overdue detections, in the page's transaction: queued ones left be, stuck ones
    re-published (confirmed by a second round when `suspects` is kept) or failed out of attempts."""
    queued = [r["id"] for r in overdue if backlog is not None and r["waited"] < queued_max_s
              and backlog.queued(r["state"], r["published_partition"], r["published_offset"])]
    waiting = set(queued)
    stuck = [r for r in overdue if r["id"] not in waiting]
    if suspects is not None:
        confirmed = [r for r in stuck if r["id"] in suspects]
        seen_stuck.update({r["id"] for r in stuck} - {r["id"] for r in confirmed})
        stuck = confirmed
    fail = [r["id"] for r in stuck if r["attempts"] + 1 >= max_attempts]
    retry = [r["id"] for r in stuck if r["attempts"] + 1 < max_attempts]
    await conn.execute(
        """UPDATE detections SET attempts = attempts + 1, updated_at = now(), state = 'failed',
               state_reason = format('no progress after %s attempts', attempts + 1)
           WHERE id = ANY($1::uuid[])""", fail)
    await conn.execute("UPDATE detections SET attempts = attempts + 1, updated_at = now() "
                       "WHERE id = ANY($1::uuid[])", retry)
    if retry:
        await conn.execute("INSERT INTO outbox (detection_id) SELECT unnest($1::uuid[])", retry)
        await conn.execute(f"NOTIFY {OUTBOX_CHANNEL}")
    return len(retry), len(fail), len(queued)


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
        self.queued = 0  # overdue detections whose events still wait in the log (last round)
        self.watch = QueueWatch()
        self.suspects: set = set()  # found stuck by the last round: re-published if this one agrees
        self.down: dict[str, str] = {}  # loop name -> the error that took it down

    def health(self) -> dict:
        # not ready while any background loop is down: an operator sees it, an orchestrator stops routing
        return {"detections": self.states, "queued_not_stuck": self.queued, "loops_down": dict(self.down),
                "ready": not self.down}

    async def start(self) -> None:
        await self.producer.start()
        self._wake = asyncio.Event()
        self._listener = await self.pool.acquire()
        # Wake the relay the moment something is enqueued; polling stays as the fallback.
        await self._listener.add_listener(OUTBOX_CHANNEL, self._on_notify)
        self._tasks = [asyncio.create_task(self.supervised("relay", self._relay_round), name="relay"),
                       asyncio.create_task(self.supervised("reconcile", self._reconcile_round), name="reconcile"),
                       asyncio.create_task(self.supervised("join-deadlines", self._join_deadline_round),
                                           name="join-deadlines")]

    def _on_notify(self, *_) -> None:
        self._wake.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._listener.remove_listener(OUTBOX_CHANNEL, self._on_notify)
        await self.pool.release(self._listener)
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

    async def _relay_round(self) -> None:
        sent = await relay_once(self.pool, self.producer, self.settings.relay_batch)
        if sent < self.settings.relay_batch:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _join_deadline_round(self) -> None:
        await asyncio.sleep(self.settings.join_sweep_every_s)
        await announce_due_joins(self.pool, self.producer, self.settings.join_timeout_s)

    async def _reconcile_round(self) -> None:
        await asyncio.sleep(self.settings.reconcile_every_s)
        # A broker restarted empty has lost its topics: put them back before anything auto-creates them.
        # Bounded: a round hung here (seen for minutes after a broker restarted empty) re-publishes nothing,
        # and the work the broker lost waits with it.
        try:
            await abandon_after(ensure_topics(self.settings.kafka_bootstrap), BROKER_CALL_S)
        except asyncio.TimeoutError:
            log.warning("reconciler: the broker did not list its topics within %.0f s: trying again next round",
                        BROKER_CALL_S)
        positions = await read_positions(self.settings.kafka_bootstrap, timeout_s=BROKER_CALL_S)
        backlog = None
        if positions is not None:
            for (group, topic), position in positions.items():
                GROUP_LAG.labels(group, topic).set(lag(position))
            backlog = backlog_of(positions)
            queues = {DETECTIONS.name: backlog.body, FEATURES_BODY.name: backlog.fusion}
            backlog = Backlog(backlog.body, backlog.fusion, self.watch.flowing(queues, self.settings.stuck_after_s))
        _, _, self.queued = await reconcile_once(self.pool, self.settings.stuck_after_s, self.settings.max_attempts,
                                                 backlog, self.settings.queued_max_s, self.suspects)
        self.states = await count_states(self.pool)


BODY_GROUP, FUSION_GROUP = "deer-body", "deer-fusion"  # shared.broker.BrokerRunner's groups of the services
# Every consumer group's queue, read from the broker each round: the lag an operator (and KEDA) scales on
# is measured here, outside the consumers, so it stays true while a consumer is idle, hung or gone.
WATCHED = ((BODY_GROUP, DETECTIONS), ("deer-coat", DETECTIONS), ("deer-antler", DETECTIONS),
           ("deer-pose", POSE_REQUESTS), (FUSION_GROUP, FEATURES_BODY), (FUSION_GROUP, FEATURES_COAT),
           (FUSION_GROUP, FEATURES_ANTLER), (FUSION_GROUP, FEATURES_POSE), (FUSION_GROUP, JOIN_DEADLINES))


BROKER_CALL_S = 10.0  # the longest a reconcile round waits on one of the broker's admin answers


def lag(position: Position) -> int:
    """Messages the group has yet to consume, all partitions together."""
    return sum(max(0, end - position.committed.get(p, 0)) for p, end in position.end.items())


async def read_positions(bootstrap: str, pairs: Sequence[tuple[str, Topic]] = WATCHED, timeout_s: float = BROKER_CALL_S
                         ) -> dict[tuple[str, str], Position] | None:
    """(group, topic name) -> where the group stands on the topic; None when the broker cannot say within
    `timeout_s`. Right after a broker restarted empty these requests were seen to hang for minutes: the
    round must not wait on them."""
    try:
        return await abandon_after(_read_positions(bootstrap, pairs), timeout_s)
    except asyncio.TimeoutError:
        log.warning("reconciler: the consumer groups' offsets did not come within %.0f s: going by time alone",
                    timeout_s)
        return None


async def read_backlog(bootstrap: str, body_group: str = BODY_GROUP, fusion_group: str = FUSION_GROUP,
                       timeout_s: float = BROKER_CALL_S) -> Backlog | None:
    """Where the body group stands on the detections topic and the fusion group on the body features
    (`flowing` left for the caller, who remembers earlier rounds); None when the broker cannot say."""
    positions = await read_positions(bootstrap, ((body_group, DETECTIONS), (fusion_group, FEATURES_BODY)), timeout_s)
    return None if positions is None else backlog_of(positions, body_group, fusion_group)


def backlog_of(positions: dict[tuple[str, str], Position], body_group: str = BODY_GROUP,
               fusion_group: str = FUSION_GROUP) -> Backlog:
    return Backlog(positions[(body_group, DETECTIONS.name)], positions.get((fusion_group, FEATURES_BODY.name)))


async def _read_positions(bootstrap: str, pairs: Sequence[tuple[str, Topic]]) -> dict[tuple[str, str], Position] | None:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    refuse_topic_auto_creation()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5_000)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=5_000)
    try:
        await admin.start()
        await consumer.start()
        ends = await _ends(consumer, list({t.name: t for _, t in pairs}.values()))
        positions = {}
        for group in dict.fromkeys(g for g, _ in pairs):
            mine = [t for g, t in pairs if g == group]
            committed = await _committed(admin, group, mine)
            for topic in mine:
                positions[(group, topic.name)] = Position(committed=committed.get(topic.name, {}),
                                                          end=ends[topic.name])
    except Exception as exc:  # noqa: BLE001 - an unreadable backlog only costs the distinction
        log.warning("reconciler: cannot read the consumer groups' offsets (%r): going by time alone", exc)
        return None
    finally:
        for closing in (consumer.stop, admin.close):
            try:
                await closing()
            except Exception as exc:  # noqa: BLE001 - a failed clean-up must not fail the round
                log.warning("reconciler: closing an offsets client: %r", exc)
    return positions


async def _committed(admin, group: str, topics: list[Topic]) -> dict[str, dict[int, int]]:
    from aiokafka import TopicPartition

    partitions = [TopicPartition(t.name, p) for t in topics for p in range(t.partitions)]
    out: dict[str, dict[int, int]] = {}
    for tp, meta in (await admin.list_consumer_group_offsets(group, partitions=partitions)).items():
        if meta.offset >= 0:
            out.setdefault(tp.topic, {})[tp.partition] = meta.offset
    return out


async def _ends(consumer, topics: list[Topic]) -> dict[str, dict[int, int]]:
    """topic name -> partition -> the log's true end, for all the topics in one round trip of each kind."""
    from aiokafka import TopicPartition

    partitions = [TopicPartition(t.name, p) for t in topics for p in range(t.partitions)]
    out: dict[str, dict[int, int]] = {t.name: {} for t in topics}
    for tp, end in (await true_end_offsets(consumer, partitions)).items():
        out[tp.topic][tp.partition] = end
    return out


async def make_handler(settings) -> Reconciler:
    reconciler = Reconciler(await create_pool(settings.database_url), settings)
    await reconciler.start()
    return reconciler
