"""The broker loop every service runs: consume a batch, process, produce, then commit.

Guarantees (ARCHITECTURE.md, invariants 2, 3 and 7):
- offsets are committed only after every output of the batch is acknowledged by
  the broker (acks=all), so a crash redelivers rather than loses;
- a message that cannot be decoded, or whose processing fails for a reason that
  retrying cannot fix, goes to the input's dead-letter topic with the reason and
  the partition moves on;
- infrastructure failures (broker or database unreachable) are retried with
  capped backoff for as long as they last, never dead-lettered: they say nothing
  about the event;
- one batch is produced and committed while the next is fetched and handled (the
  handler never waits on the broker's round trips); commits keep batch order;
- a batch is sized to the handler's pace so that it ends well within the reconciler's
  patience (`BatchPace`): the committed offset is how the reconciler sees a queue flow;
- SIGTERM finishes the batch in hand, commits, and leaves the group.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol, Sequence

import aiokafka.client
import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, UnknownError
from aiokafka.protocol.metadata import MetadataRequest

from shared.log_end import past_recreated_end, true_end_offsets
from shared.observability import BATCH_SIZE, CONSUMER_LAG, ERRORS, EVENTS, STAGE_SECONDS
from shared.schemas import DEAD_LETTER_PAYLOAD_MAX, DeadLetter, MalformedEvent
from shared.topics import Topic, dead_letter_of

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
STALL_AFTER_S = 20.0  # no records for this long while the partitions have some: check the consumer
STALL_CHECK_S = 10.0
PRODUCE_TIMEOUT_S = 45.0  # acks=all for one batch; past this the producer is presumed wedged
# Tansu answers a produce whose offset clashes with a batch it already stored with UnknownError,
# and moves that partition's next offset on by one per clash. Clashes come in runs right after a
# topic is (re)created while producers are retrying, so they are retried at once, not backed off.
CLASH_RETRIES = 50
CLASH_RETRY_S = 0.05


def backoff_s(base: float, attempt: int, cap: float = 10.0) -> float:
    """Seconds to wait before try `attempt + 1`: doubling from `base` (attempt 0), at most `cap`."""
    return min(base * 2 ** min(attempt, 6), cap)


def produce_retry_delay(exc: BaseException, attempt: int, backoff: float) -> float:
    """Seconds to wait before re-sending after a failed produce."""
    if isinstance(exc, UnknownError) and attempt < CLASH_RETRIES:
        return CLASH_RETRY_S
    return backoff_s(backoff, attempt)


_ABANDONED: set = set()  # tasks given up on, kept referenced until their clean-up ends


async def abandon_after(coro, timeout_s: float):
    """`await coro`, but for at most `timeout_s`: then asyncio.TimeoutError, and the task is cancelled and
    left to finish its clean-up in the background. Right after a broker restarted empty, aiokafka's
    clients were seen to hang for minutes in start, in their requests and in close alike; asyncio.wait_for
    would wait for the cancelled clean-up too, and the caller's loop with it."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        _ABANDONED.add(task)
        task.add_done_callback(_ABANDONED.discard)
        raise asyncio.TimeoutError(f"no answer within {timeout_s:.0f} s")
    return task.result()


class PermanentError(Exception):
    """Processing this event can never succeed (bad image, impossible data): dead-letter it."""


# Failures that say the infrastructure is down, not that the event is bad: retried for as long as it takes.
TRANSIENT = (KafkaError, ConnectionError, TimeoutError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
             asyncpg.InterfaceError, asyncpg.CannotConnectNowError)
# errnos of a network or server that is away (not of a file that is missing or an image that is broken)
NETWORK_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
                            errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EAGAIN})


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says the broker or the database is away. Not every OSError does: a missing file, a
    permission refused or an image PIL cannot read (UnidentifiedImageError is an OSError) is a bug or a
    bad event, and retrying it forever would stop its partition for good with nothing dead-lettered. A
    connection to a unix socket that is not there (the embedded PostgreSQL restarting) raises
    FileNotFoundError with no file name: that one is the database away."""
    if isinstance(exc, TRANSIENT):
        return True
    if isinstance(exc, OSError):
        return exc.errno in NETWORK_ERRNOS or (exc.errno == errno.ENOENT and exc.filename is None
                                                and type(exc) is FileNotFoundError)
    return False


@dataclass(frozen=True)
class Output:
    topic: Topic
    key: bytes | None
    value: bytes


@dataclass
class Handled:
    """What a handler made of one event: outputs to produce, or a permanent error."""

    outputs: list[Output] = field(default_factory=list)
    error: str | None = None


class Handler(Protocol):
    """A service's domain logic, plugged into the runner."""

    name: str
    input_topics: tuple[Topic, ...]
    input_schema: Any  # a shared.schemas event class
    dead_letters: bool  # False only for the dead-letter recorder itself: a bad letter is logged, not re-lettered
    # False where a bad event says nothing about its detection: a feature event fusion refuses makes that
    # component "missing" for the join, and must not let a hostile sender fail someone else's detection.
    dead_letter_fails_detection: bool

    async def handle(self, events: Sequence[Any]) -> list[Handled]:
        """Process decoded events; one `Handled` per event, same order."""


def refuse_topic_auto_creation() -> None:
    """Make aiokafka's producers and consumers ask the broker not to auto-create the topics they name in
    their metadata requests. Tansu would create them with 4 partitions each, and after a broker restarted
    empty every client asks for its topics before the reconciler has re-created them (see shared.topics).

    Called where our clients are built, before each is. aiokafka (0.14) has no setting for it, per client
    or at all: a client builds its metadata requests, for as long as it lives, from the module global
    `aiokafka.client.MetadataRequest`, which asks for auto-creation unless told otherwise. Replacing that
    global is the only way in, so it holds for the whole process once done; admin clients, which ask for
    all topics or none, never trigger a creation anyway. Kafka's own clients have a setting for it
    (allow.auto.create.topics, KIP-361); no aiokafka issue asking for one was found."""
    aiokafka.client.MetadataRequest = _METADATA_REQUEST_WITHOUT_AUTO_CREATION


_METADATA_REQUEST_WITHOUT_AUTO_CREATION = functools.partial(MetadataRequest, allow_auto_topic_creation=False)


def producer_for(bootstrap: str, client_id: str) -> AIOKafkaProducer:
    refuse_topic_auto_creation()
    # Tansu has no InitProducerId, so no idempotent producer; idempotence comes from the consumers.
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=False,
        max_request_size=MAX_MESSAGE_BYTES,
        linger_ms=2,
        request_timeout_ms=30_000,
    )


async def read_true_ends(bootstrap: str, partitions: list[TopicPartition], timeout_s: float
                         ) -> dict[TopicPartition, int]:
    """The partitions' true ends (`true_end_offsets`), read by a consumer of its own, in no group, whose
    start and reading are each abandoned after `timeout_s` (asyncio.TimeoutError)."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=5_000,
                              max_partition_fetch_bytes=MAX_MESSAGE_BYTES)
    try:
        await abandon_after(reader.start(), timeout_s)
        return await abandon_after(true_end_offsets(reader, partitions), timeout_s)
    finally:
        try:
            await abandon_after(reader.stop(), 2.0)
        except Exception as exc:  # noqa: BLE001 - a failed clean-up must not hide the answer or its error
            log.warning("an end-offsets reader did not stop cleanly: %r", exc)


class _PositionFromCommitted(ConsumerRebalanceListener):
    """On every assignment, start from the committed offset, or from the beginning when there is none
    or when it lies past the end of the log.

    A broker that restarted empty has lost its topics; their new partitions start again at 0,
    while the consumer still holds positions past their end, and a batch fetched before the
    restart may even commit its old offset into the new broker's group. Tansu answers fetches
    past the end with nothing rather than OFFSET_OUT_OF_RANGE, so without this the consumer
    would wait until the new log grew past its old position. Reading a re-created partition from
    its beginning is safe: every handler is idempotent.

    Against the ends Tansu reports, short by up to a batch (shared.log_end), an offset is surely past
    only beyond RECREATED_SLACK; one within the slack is checked against the true end, read by a
    consumer of its own (`true_end_offsets`). Going by the slack alone, a group that had committed 1 to
    16 on a partition before the restart skipped the first events of its new log (likely why a restart
    test once left 3 detections re-published again and again, never read).
    """

    def __init__(self, consumer: AIOKafkaConsumer, bootstrap: str):
        self.consumer = consumer
        self.bootstrap = bootstrap

    async def on_partitions_revoked(self, revoked) -> None:
        pass

    async def _true_ends(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The partitions' true ends; none where they cannot be read soon (this runs inside the group's
        rebalance, and right after a restart the broker may hang)."""
        try:
            return await read_true_ends(self.bootstrap, partitions, 5.0)
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            log.warning("cannot read the true end offsets of %s: %r", sorted(partitions), exc)
            return {}

    async def on_partitions_assigned(self, assigned) -> None:
        if not assigned:
            return
        try:
            ends = await self.consumer.end_offsets(list(assigned))
        except KafkaError as exc:
            log.warning("cannot read the end offsets of %s: %r", sorted(assigned), exc)
            ends = {}
        committed = {tp: await self.consumer.committed(tp) for tp in assigned}
        unsure = [tp for tp, offset in committed.items() if offset is not None and tp in ends
                  and ends[tp] < offset and not past_recreated_end(offset, ends[tp])]
        true_ends = await self._true_ends(unsure) if unsure else {}
        for tp, offset in committed.items():
            end = true_ends.get(tp, ends.get(tp))
            if offset is None:
                await self.consumer.seek_to_beginning(tp)
            elif end is not None and (offset > end if tp in true_ends else past_recreated_end(offset, end)):
                log.warning("%s: committed offset %d is past the end of the log (%d): the partition was "
                            "re-created; reading it from the beginning", tp, offset, end)
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)


def consumer_for(bootstrap: str, group: str, topics: tuple[Topic, ...], client_id: str) -> AIOKafkaConsumer:
    refuse_topic_auto_creation()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
        fetch_max_bytes=4 * MAX_MESSAGE_BYTES,
        # A member killed with -9 holds its partitions until its session expires: keep that short.
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
        max_poll_interval_ms=300_000,
        metadata_max_age_ms=5_000,  # see re-created topics quickly after a broker restart
    )
    consumer.subscribe([t.name for t in topics], listener=_PositionFromCommitted(consumer, bootstrap))
    return consumer


def dead_letter(service: str, record: ConsumerRecord, reason: str, detection_id=None,
                fails_detection: bool = True) -> Output:
    payload = record.value or b""
    letter = DeadLetter(
        service=service,
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key.decode("utf-8", "replace") if record.key else None,
        detection_id=detection_id,
        fails_detection=fails_detection,
        reason=reason[:2000],
        payload=payload[:DEAD_LETTER_PAYLOAD_MAX],
        payload_truncated=len(payload) > DEAD_LETTER_PAYLOAD_MAX,
        at=datetime.now(timezone.utc),
    )
    return Output(dead_letter_of(record.topic), record.key, letter.to_bytes())


def _detection_id_of(record: ConsumerRecord):
    """Best effort: the detection id of an undecodable event, so it can still be marked failed."""
    import json
    from uuid import UUID

    try:
        return UUID(str(json.loads(record.value)["detection_id"]))
    except Exception:  # noqa: BLE001 - the event is malformed; there may be no id at all
        return None


class BatchPace:
    """How many records the runner's next batch may take: `batch_max`, fewer where the handler's recent pace
    says a full batch would outlast `budget_s`, and after an idle fetch one record, then at most twice the
    last batch, because the pace learnt before the pause says nothing of the work after it (a mode switched
    on, another kind of event).

    Why: the reconciler tells a queue that flows from one that is stuck by its group's committed offset,
    which moves once a batch. A batch that outlasts the reconciler's patience makes a working service look
    stuck: its queued detections are re-published (work done twice) and joins waiting on it are decided
    without it. Seen on a loaded 2-core CI runner with the test stack's 8 s patience: coat batches of 16 in
    enhanced mode, 5 of 40 detections decided without coat and 21 re-published. Pure: the runner reports
    each batch's size and handling time."""

    def __init__(self, batch_max: int, budget_s: float | None = None):
        self.batch_max = batch_max
        self.budget_s = budget_s
        self.per_record_s: float | None = None
        self._last = 0  # the last batch's size; 0 after an idle fetch

    def _paced(self) -> int:
        """The most records the pace fits in the budget (batch_max when either is not known)."""
        if not (self.budget_s and self.per_record_s):
            return self.batch_max
        return min(self.batch_max, max(1, int(self.budget_s / self.per_record_s)))

    def size(self) -> int:
        return min(self._paced(), max(1, 2 * self._last))

    def handled(self, records: int, seconds: float) -> None:
        """A batch of `records` took `seconds` to handle (0 records: an idle fetch). A slower pace from a
        batch as large as the pace allowed is taken at once; a faster one, or one from a smaller batch
        (slow start, or nothing more waiting: a batch's fixed cost weighs on few records), is trusted
        half-way, so one such batch does not size the next on its own."""
        if records > 0:
            pace = seconds / records
            if self.per_record_s is None or (pace >= self.per_record_s and records >= self._paced()):
                self.per_record_s = pace
            else:
                self.per_record_s = (self.per_record_s + pace) / 2
        self._last = records


class BrokerRunner:
    """Runs one handler against its input topic until stopped."""

    def __init__(self, handler: Handler, bootstrap: str, *, batch_max: int = 16, batch_wait_ms: int = 25,
                 max_retries: int = 3, retry_backoff_ms: int = 200, group: str | None = None,
                 batch_budget_s: float | None = None):
        self.handler = handler
        self._fails = getattr(handler, "dead_letter_fails_detection", True)
        self.bootstrap = bootstrap
        self.pace = BatchPace(batch_max, batch_budget_s)
        self.batch_wait = batch_wait_ms / 1000
        self.max_retries = max_retries
        self.backoff = retry_backoff_ms / 1000
        self.group = group or f"deer-{handler.name}"
        self._stop = asyncio.Event()
        self.ready = False
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        name = self.handler.name
        self.producer = producer_for(self.bootstrap, name)
        self.consumer = consumer_for(self.bootstrap, self.group, self.handler.input_topics, name)
        await self.producer.start()
        await self.consumer.start()
        self.ready = True
        log.info("%s consuming %s as group %s", name, [t.name for t in self.handler.input_topics], self.group)
        last_progress = last_check = time.monotonic()
        suspected = False  # the last check found work waiting unfetched
        finishing: asyncio.Task | None = None  # the previous batch's produce + commit
        try:
            while not self._stop.is_set():
                records = await self._next_batch()
                now = time.monotonic()
                if records:
                    outputs = await self._handle_batch(records)
                    self.pace.handled(len(records), time.monotonic() - now)
                    # Batch N is produced and committed while batch N+1 is fetched and handled, so the
                    # handler (the body's inference) never waits on the broker's round trips. Commits
                    # stay in order: a batch is committed only after the one before it.
                    if finishing is not None:
                        await finishing
                    finishing = asyncio.create_task(self._finish(records, outputs))
                    last_progress = now
                    suspected = False
                else:
                    self.pace.handled(0, 0.0)  # an idle fetch
                    if now - last_progress > STALL_AFTER_S and now - last_check > STALL_CHECK_S:
                        last_check = now
                        if finishing is not None:
                            await finishing
                            finishing = None
                        # Two checks in a row, with fetches between them: an idle consumer checked just as a
                        # message lands sees it waiting too, and a fresh consumer costs seconds of rejoining
                        # (a pose request missed its join deadline so).
                        stalled = await self._stalled()
                        if stalled and suspected:
                            await self._recreate_consumer()
                            last_progress = time.monotonic()
                        suspected = stalled and not suspected
            if finishing is not None:
                await finishing  # SIGTERM: the batch in hand is produced and committed before leaving
        finally:
            if finishing is not None and not finishing.done():
                finishing.cancel()
            self.ready = False
            await self.consumer.stop()
            await self.producer.stop()
            log.info("%s stopped", name)

    async def _stalled(self) -> bool:
        """Whether work waits on the input topics that this consumer should be fetching, yet it fetches nothing.

        These cases were seen after the broker restarted empty; nothing about the events is
        wrong, so the cure is a fresh consumer (whose assignment starts each partition afresh,
        see `_PositionFromCommitted`), not a dead letter:
        - partitions assigned, but the fetcher stays wedged on the old broker's state;
        - a position past the end of its partition's log: the partition was re-created, and the
          consumer would wait for the new log to grow past the old offset;
        - nothing assigned at all: the group was rejoined while the topics were gone, and
          their re-creation never triggered a rebalance. Work is then waiting when the group's
          committed offset of some partition is behind its end. (A replica beyond the partition
          count also holds nothing; it is only recreated while the group lags, which hands it
          partitions.)
        The ends are those Tansu reports, short of the records it serves (see shared.log_end).
        """
        assert self.consumer is not None
        try:
            assignment = list(self.consumer.assignment())
            held = bool(assignment)
            if not held:
                # The consumer refreshes its subscribed topics' metadata every metadata_max_age_ms.
                assignment = [TopicPartition(t.name, p) for t in self.handler.input_topics
                              for p in sorted(self.consumer.partitions_for_topic(t.name) or ())]
                if not assignment:
                    return False  # the topics are not back yet: the reconciler re-creates them
            ends = await asyncio.wait_for(self.consumer.end_offsets(assignment), 10)
            for tp in assignment:
                if tp not in ends:
                    continue
                # Where this consumer stands in a partition it holds; where the group stands otherwise.
                standing = self.consumer.position(tp) if held else self.consumer.committed(tp)
                offset = await asyncio.wait_for(standing, 10) or 0
                if ends[tp] > offset or past_recreated_end(offset, ends[tp]):
                    log.warning("%s: %s ends at %d while %s is %d", self.handler.name, tp, ends[tp],
                                "this consumer's position" if held else "the group's committed offset (none held)",
                                offset)
                    return True
        except (KafkaError, asyncio.TimeoutError) as exc:
            log.warning("%s: cannot tell whether the consumer is stalled: %r", self.handler.name, exc)
            return True
        return False

    async def _recreate_consumer(self) -> None:
        ERRORS.labels(self.handler.name, "consumer_stalled").inc()
        log.warning("%s: consumer stalled with messages waiting; starting a fresh one", self.handler.name)
        old, self.consumer = self.consumer, consumer_for(self.bootstrap, self.group, self.handler.input_topics,
                                                         self.handler.name)
        try:
            await asyncio.wait_for(old.stop(), 10)
        except (KafkaError, asyncio.TimeoutError) as exc:
            log.warning("%s: old consumer did not stop cleanly: %r", self.handler.name, exc)
        await self.consumer.start()

    async def _next_batch(self) -> list[ConsumerRecord]:
        """Up to the pace's size of records: block for the first, then wait at most batch_wait for company."""
        assert self.consumer is not None
        size = self.pace.size()
        records: list[ConsumerRecord] = []
        first = await self.consumer.getmany(timeout_ms=500, max_records=size)
        for part in first.values():
            records.extend(part)
        if not records:
            return records
        deadline = time.monotonic() + self.batch_wait
        while len(records) < size and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            more = await self.consumer.getmany(timeout_ms=int(left * 1000), max_records=size - len(records))
            for part in more.values():
                records.extend(part)
        return records

    async def _handle_batch(self, records: list[ConsumerRecord]) -> list[Output]:
        """Decode and handle a batch: its outputs, dead letters included."""
        name = self.handler.name
        BATCH_SIZE.labels(name).observe(len(records))
        outputs: list[Output] = []
        decoded: list[tuple[ConsumerRecord, Any]] = []
        for record in records:
            try:
                decoded.append((record, self.handler.input_schema.from_bytes(record.value)))
            except MalformedEvent as exc:
                EVENTS.labels(name, "dead_letter").inc()
                if getattr(self.handler, "dead_letters", True):
                    outputs.append(dead_letter(name, record, str(exc), _detection_id_of(record), self._fails))
                else:
                    log.error("%s: dropped malformed message at %s[%d]@%d: %s", name, record.topic,
                              record.partition, record.offset, exc)
        if decoded:
            with STAGE_SECONDS.labels(name, "handle").time():
                results = await self._handle_with_retries(decoded)
            for (record, event), result in zip(decoded, results):
                if result.error is not None:
                    EVENTS.labels(name, "dead_letter").inc()
                    outputs.append(dead_letter(name, record, result.error, getattr(event, "detection_id", None),
                                               self._fails))
                else:
                    EVENTS.labels(name, "ok").inc()
                    outputs.extend(result.outputs)
        return outputs

    async def _finish(self, records: list[ConsumerRecord], outputs: list[Output]) -> None:
        """Produce a batch's outputs until the broker has them all, then commit its offsets."""
        with STAGE_SECONDS.labels(self.handler.name, "produce").time():
            await self._produce_durably(outputs)
        await self._commit(records)

    async def _handle_with_retries(self, decoded: list[tuple[ConsumerRecord, Any]]) -> list[Handled]:
        events = [event for _, event in decoded]
        attempt = waited = 0  # the handler's own failures; rounds waited for the infrastructure
        while True:
            try:
                results = await self.handler.handle(events)
                if len(results) != len(events):
                    raise RuntimeError(f"handler returned {len(results)} results for {len(events)} events")
                return results
            except Exception as exc:  # noqa: BLE001 - transient: wait; anything else may be one poisonous event
                if is_transient(exc):
                    # The infrastructure is down: wait for it, however long, and lose nothing.
                    ERRORS.labels(self.handler.name, "transient").inc()
                    log.warning("%s: transient failure, retrying: %r", self.handler.name, exc)
                    await asyncio.sleep(backoff_s(self.backoff, waited))
                    waited += 1
                    continue
                ERRORS.labels(self.handler.name, "handler").inc()
                attempt += 1
                if attempt <= self.max_retries:
                    log.warning("%s: batch failed (attempt %d): %r", self.handler.name, attempt, exc)
                    await asyncio.sleep(self.backoff * 2 ** (attempt - 1))  # bounded by max_retries
                    continue
                if len(events) == 1:
                    log.error("%s: giving up on event: %r", self.handler.name, exc)
                    return [Handled(error=f"{type(exc).__name__}: {exc}")]
                # Isolate the poison: retry each event on its own.
                out: list[Handled] = []
                for item in decoded:
                    out.extend(await self._handle_with_retries([item]))
                return out

    async def _produce_durably(self, outputs: list[Output]) -> None:
        if not outputs:
            return
        assert self.producer is not None
        attempt = 0
        while True:
            try:
                await asyncio.wait_for(self._send_all(outputs), PRODUCE_TIMEOUT_S)
                return
            except (KafkaError, asyncio.TimeoutError) as exc:
                # Re-sending everything may duplicate some outputs; consumers are idempotent.
                ERRORS.labels(self.handler.name, "produce").inc()
                log.warning("%s: produce failed, retrying: %r", self.handler.name, exc)
                if attempt >= 2 and not isinstance(exc, UnknownError):
                    # A producer that keeps failing may hold the old broker's state: start afresh.
                    await self._recreate_producer()
                await asyncio.sleep(produce_retry_delay(exc, attempt, self.backoff))
                attempt += 1

    async def _send_all(self, outputs: list[Output]) -> None:
        futures = [await self.producer.send(o.topic.name, o.value, key=o.key) for o in outputs]
        await asyncio.gather(*futures)

    async def _recreate_producer(self) -> None:
        old, self.producer = self.producer, producer_for(self.bootstrap, self.handler.name)
        try:
            await asyncio.wait_for(old.stop(), 10)
        except (KafkaError, asyncio.TimeoutError) as exc:
            log.warning("%s: old producer did not stop cleanly: %r", self.handler.name, exc)
        await self.producer.start()

    async def _commit(self, records: list[ConsumerRecord]) -> None:
        assert self.consumer is not None
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # A rebalance took the partitions away; their new owner redelivers, and handlers are idempotent.
            ERRORS.labels(self.handler.name, "commit").inc()
            log.warning("%s: commit failed: %r", self.handler.name, exc)
        for tp in offsets:
            high = self.consumer.highwater(tp)
            if high is not None:
                CONSUMER_LAG.labels(self.handler.name, tp.topic, str(tp.partition)).set(max(0, high - offsets[tp]))
