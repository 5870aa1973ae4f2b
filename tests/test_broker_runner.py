"""The broker loop on the real broker: dead letters, progress past poison, commit after produce."""
from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.body.extractor import BodyExtractor
from services.body.service import BodyHandler
from shared.broker import BatchPace, BrokerRunner, Handled, consumer_for, producer_for
from shared.config import Settings
from shared.images import crop_jpeg, decode_upload
from shared.models import load_model
from shared.service import CropExtractorHandler
from shared.schemas import DeadLetter, DetectionClass, DetectionEvent, Features
from shared.topics import DETECTIONS, FEATURES_BODY, Topic, dead_letter_of, ensure_topics
from tests.stack_helpers import until




@pytest.fixture(scope="module")
def lite0():
    return load_model("efficientnet_lite0", Settings().model_cache)


def detection(crop: bytes, site: str = "s1") -> DetectionEvent:
    return DetectionEvent(detection_id=uuid.uuid4(), site=site, camera="c", captured_at=datetime.now(timezone.utc),
                          cls="doe", box={"x0": 0, "y0": 0, "x1": 10, "y1": 10}, image_sha256="b" * 64,
                          crop_jpeg=crop)


async def read_unique(bootstrap: str, topic: str, want: int, key, timeout: float = 30) -> dict:
    """Read `topic` until `want` distinct keys were seen: delivery is at least once, so copies may come."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"reader-{uuid.uuid4()}", max_partition_fetch_bytes=4 << 20)
    await consumer.start()
    got: dict = {}
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(got) < want and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    got.setdefault(key(r), r)
    finally:
        await consumer.stop()
    return got


@pytest.fixture
def own_broker():
    """A broker of this test's own: it reads the shared topics whole and counts the group's commits on them,
    which another test's events on the session's broker would change."""
    from shared.embedded import EmbeddedBroker, free_port

    b = EmbeddedBroker(free_port())
    b.start()
    yield b
    b.stop()


async def test_poison_goes_to_the_dead_letter_topic_and_the_partition_moves_on(own_broker, lite0, jpeg_bytes):
    broker = own_broker
    await ensure_topics(broker.bootstrap)
    good = crop_jpeg(decode_upload(jpeg_bytes, max_bytes=1 << 26, max_pixels=1 << 26).image, (0, 0, 200, 200), 512)
    key = b"same-partition"
    valid_before, valid_after = detection(good), detection(good)
    bad_crop = detection(b"\xff\xd8 this is not a jpeg")
    producer = producer_for(broker.bootstrap, "test")
    await producer.start()
    for value in (b"{not json", valid_before.to_bytes(), bad_crop.to_bytes(), b'{"schema_version": 1}',
                  valid_after.to_bytes()):
        await producer.send_and_wait(DETECTIONS.name, value, key=key)
    await producer.stop()

    runner = BrokerRunner(BodyHandler(BodyExtractor([lite0]), ["efficientnet_lite0"], []), broker.bootstrap,
                          batch_max=2, batch_wait_ms=10,
                          max_retries=0, group="test-body")
    task = asyncio.create_task(runner.run())
    try:
        features = [Features.from_bytes(r.value) for r in (await read_unique(
            broker.bootstrap, FEATURES_BODY.name, 2, lambda r: Features.from_bytes(r.value).detection_id)).values()]
        letters = [DeadLetter.from_bytes(r.value) for r in (await read_unique(
            broker.bootstrap, dead_letter_of(DETECTIONS).name, 3,
            lambda r: DeadLetter.from_bytes(r.value).offset)).values()]
    finally:
        runner.stop()
        await task

    assert {f.detection_id for f in features} == {valid_before.detection_id, valid_after.detection_id}
    assert all(f.embeddings[0].dim == 1280 and not f.embeddings[0].random_weights for f in features)
    reasons = sorted(letter.reason for letter in letters)
    assert len(letters) == 3
    assert any("undecodable crop" in r for r in reasons)
    assert sum("not a valid DetectionEvent" in r for r in reasons) == 2
    assert next(l for l in letters if "undecodable" in l.reason).detection_id == bad_crop.detection_id
    assert all(l.payload for l in letters)

    # everything was committed: a restarted consumer of the group starts past all five events
    check = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="test-body", enable_auto_commit=False)
    await check.start()
    try:
        partitions = check.partitions_for_topic(DETECTIONS.name) or set()
        committed = [await check.committed(TopicPartition(DETECTIONS.name, p)) for p in partitions]
    finally:
        await check.stop()
    assert sum(c or 0 for c in committed) == 5


class _CrashingExtractor(CropExtractorHandler):
    """An optional extractor with a bug: a lookup file it needs is missing for one kind of event."""

    name = "crash-test"
    dead_letters = True

    def __init__(self, topic: Topic):
        super().__init__(1)
        self.input_topics = (topic,)

    async def handle(self, events):
        if any(e.cls == DetectionClass.fawn for e in events):
            raise FileNotFoundError(2, "No such file or directory", "/opt/models/missing-lut.bin")
        return [Handled() for _ in events]


async def test_an_optional_extractors_bug_is_dead_lettered_as_missing_not_retried_forever(broker):
    """Every OSError was 'the infrastructure is down': a handler bug raising FileNotFoundError stopped
    its partition for good, dead-lettering nothing; and an optional extractor's crash failed the whole
    detection, where the design says the component is missing and the decision degraded."""
    topic = Topic(f"test.crash.{uuid.uuid4().hex[:8]}", 1)
    await ensure_topics(broker.bootstrap, (topic, dead_letter_of(topic)))
    buggy, fine = detection(b"x"), detection(b"y")
    buggy = buggy.model_copy(update={"cls": DetectionClass.fawn})
    producer = producer_for(broker.bootstrap, "test")
    await producer.start()
    for event in (buggy, fine):
        await producer.send_and_wait(topic.name, event.to_bytes(), key=b"k")
    await producer.stop()
    runner = BrokerRunner(_CrashingExtractor(topic), broker.bootstrap, batch_max=1, batch_wait_ms=10, max_retries=1,
                          retry_backoff_ms=10, group=f"crash-{uuid.uuid4().hex[:8]}")
    task = asyncio.create_task(runner.run())
    try:
        letters = [DeadLetter.from_bytes(r.value) for r in (await read_unique(
            broker.bootstrap, dead_letter_of(topic).name, 1, lambda r: r.offset, timeout=30)).values()]
        check = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=runner.group, enable_auto_commit=False)
        await check.start()
        try:
            await until(lambda: check.committed(TopicPartition(topic.name, 0)), lambda offset: (offset or 0) >= 2,
                        timeout=30, what="the partition to move past the bug")
        finally:
            await check.stop()
    finally:
        runner.stop()
        await asyncio.wait_for(task, 60)  # a runner stuck retrying would never stop: fail, do not hang
    assert len(letters) == 1 and letters[0].detection_id == buggy.detection_id
    assert "missing-lut.bin" in letters[0].reason
    assert letters[0].fails_detection is False  # coat, antler and pose are optional: missing, not failed


def test_a_batch_is_sized_to_end_within_its_budget_and_grows_back_from_one_after_an_idle_fetch():
    """The reconciler sees a queue flow by its committed offset, which moves once a batch: a batch must end
    well within its patience. The pace (seconds a record) is taken at once when a batch as large as it
    allowed was slower, half-way otherwise; after an idle fetch the size starts from one and at most
    doubles."""
    pace = BatchPace(16, budget_s=2.0)
    assert [pace.size()] == [1]  # nothing known: one record, then twice the last
    sizes = []
    for _ in range(6):
        sizes.append(pace.size())
        pace.handled(sizes[-1], 0.01 * sizes[-1])
    assert sizes == [1, 2, 4, 8, 16, 16]
    pace.handled(16, 16 * 0.5)  # the work slowed to 0.5 s a record: 4 fit in 2 s, from the next batch on
    assert pace.per_record_s == 0.5 and pace.size() == 4
    pace.handled(4, 4 * 0.1)  # one quick batch: trusted half-way (0.3 s a record)
    assert pace.per_record_s == pytest.approx(0.3) and pace.size() == 6
    pace.handled(6, 60.0)  # slower than the whole budget: one record at a time, never none
    assert pace.size() == 1
    pace.handled(0, 0.0)  # idle: one record first whatever the pace
    assert pace.size() == 1
    # after a pause, one record that carries a batch's fixed cost (or a model's warm-up) is averaged in
    warm = BatchPace(16, budget_s=2.0)
    warm.handled(16, 16 * 0.01)
    warm.handled(0, 0.0)
    warm.handled(1, 1.0)
    assert warm.per_record_s == pytest.approx(0.505) and warm.size() == 2
    unbounded = BatchPace(16)  # no budget (a runner outside a stack): the doubling alone
    for n in (1, 2, 4, 8, 16):
        unbounded.handled(n, 100.0 * n)
    assert unbounded.size() == 16


class _Slow:
    """A handler that takes `seconds` a record and remembers its batches' sizes."""

    name = "slow-test"
    input_schema = DetectionEvent

    def __init__(self, topic: Topic, seconds: float):
        self.input_topics = (topic,)
        self.seconds = seconds
        self.sizes: list[int] = []

    async def handle(self, events):
        self.sizes.append(len(events))
        await asyncio.sleep(self.seconds * len(events))
        return [Handled([]) for _ in events]


async def test_a_slow_handlers_batches_end_within_the_budget_on_the_broker(broker):
    """Twenty events waiting, 0.2 s a record at least and a 0.7 s budget: the runner starts from one and
    never takes more than 3 at a time (not the 16 it may), so its committed offset moves about every 0.7 s."""
    topic = Topic(f"test.pace.{uuid.uuid4().hex[:8]}", 1)
    await ensure_topics(broker.bootstrap, (topic, dead_letter_of(topic)))
    producer = producer_for(broker.bootstrap, "test")
    await producer.start()
    for _ in range(20):
        await producer.send_and_wait(topic.name, detection(b"x").to_bytes(), key=b"k")
    await producer.stop()
    handler = _Slow(topic, 0.2)
    runner = BrokerRunner(handler, broker.bootstrap, batch_max=16, batch_wait_ms=100, batch_budget_s=0.7,
                          group=f"pace-{uuid.uuid4().hex[:8]}")
    task = asyncio.create_task(runner.run())
    try:
        await until(lambda: sum(handler.sizes), lambda n: n >= 20, timeout=60,
                    what="the twenty events to be handled")
    finally:
        runner.stop()
        await asyncio.wait_for(task, 60)
    assert sum(handler.sizes) == 20 and handler.sizes[0] == 1, handler.sizes
    assert 2 <= max(handler.sizes) <= 3, handler.sizes  # grown from one, and within the budget


class _Idle:
    """A handler that is never called: the test drives the runner's watchdog directly."""

    name = "stall-test"
    input_schema = DetectionEvent

    def __init__(self, topic: Topic):
        self.input_topics = (topic,)

    async def handle(self, events):
        raise AssertionError("not called")


async def test_a_consumer_holding_no_partition_counts_as_stalled_only_while_its_group_lags(broker):
    # After an empty broker restart, consumers were seen rejoining with no partitions and never
    # rebalancing once the topics came back; the watchdog must tell that from an idle spare replica.
    topic = Topic(f"test.stall.{uuid.uuid4().hex[:8]}", 1)
    await ensure_topics(broker.bootstrap, (topic,))
    group = f"stall-{uuid.uuid4().hex[:8]}"
    consumers = [consumer_for(broker.bootstrap, group, (topic,), f"member-{i}") for i in range(2)]
    for c in consumers:
        await c.start()
    try:
        settled_since, deadline = None, asyncio.get_running_loop().time() + 60
        while asyncio.get_running_loop().time() < deadline:
            for c in consumers:
                await c.getmany(timeout_ms=100)
            held = [bool(c.assignment()) for c in consumers]
            if sorted(held) == [False, True]:
                settled_since = settled_since or asyncio.get_running_loop().time()
                if asyncio.get_running_loop().time() - settled_since > 2:
                    break
            else:
                settled_since = None
        assert sorted(held) == [False, True], "the group never settled with one member holding the partition"
        owner, spare = (consumers[0], consumers[1]) if held[0] else (consumers[1], consumers[0])
        runner = BrokerRunner(_Idle(topic), broker.bootstrap, group=group)
        runner.consumer = spare

        assert await runner._stalled() is False  # nothing waiting: a spare replica is just idle
        producer = producer_for(broker.bootstrap, "test")
        await producer.start()
        await producer.send_and_wait(topic.name, b"work")
        await producer.stop()
        assert await runner._stalled() is True  # work waits that the group has not committed past
        tp = TopicPartition(topic.name, 0)
        await owner.commit({tp: 1})
        assert await runner._stalled() is False
    finally:
        for c in consumers:
            await c.stop()


@pytest.mark.parametrize("old_offset", [57, 10])
async def test_a_committed_offset_past_the_end_of_a_recreated_partition_is_read_from_the_beginning(broker, old_offset):
    # After an empty broker restart, a batch fetched from the old broker committed its old offset
    # into the new broker's group; the consumer then waited for the new log to grow past it. At 10,
    # within the slack the reported end needs (shared.log_end), the first events of the new log were
    # skipped until the true end was read.
    topic = Topic(f"test.recreated.{uuid.uuid4().hex[:8]}", 1)
    await ensure_topics(broker.bootstrap, (topic,))
    tp = TopicPartition(topic.name, 0)
    producer = producer_for(broker.bootstrap, "test")
    await producer.start()
    for n in range(3):
        await producer.send_and_wait(topic.name, str(n).encode())
    await producer.stop()
    group = f"recreated-{uuid.uuid4().hex[:8]}"
    old = consumer_for(broker.bootstrap, group, (topic,), "old")
    await old.start()
    try:
        while not old.assignment():
            await old.getmany(timeout_ms=200)
        await old.commit({tp: old_offset})
    finally:
        await old.stop()

    fresh = consumer_for(broker.bootstrap, group, (topic,), "fresh")
    await fresh.start()
    got: list[bytes] = []
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while len(got) < 3 and asyncio.get_running_loop().time() < deadline:
            for records in (await fresh.getmany(timeout_ms=200)).values():
                got.extend(r.value for r in records)
    finally:
        await fresh.stop()
    assert got == [b"0", b"1", b"2"]


async def test_a_client_of_ours_never_asks_the_broker_to_auto_create_a_topic(broker, monkeypatch):
    """Tansu creates a topic that a metadata request names, with 4 partitions: after a broker restarted
    empty, producers asking for their topics raced the reconciler re-creating them with their own counts."""
    import aiokafka.client
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.protocol.metadata import MetadataRequest

    monkeypatch.setattr(aiokafka.client, "MetadataRequest", MetadataRequest)  # as aiokafka comes
    missing = f"test.missing.{uuid.uuid4().hex[:8]}"
    producer = producer_for(broker.bootstrap, "test")
    await producer.start()
    try:
        with pytest.raises(asyncio.TimeoutError):  # it waits for the topic to be made
            await asyncio.wait_for(producer.send_and_wait(missing, b"x"), 3)
    finally:
        await producer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        assert missing not in await admin.list_topics()
    finally:
        await admin.close()


async def test_an_event_seen_again_is_answered_from_recent_embeddings_not_the_models(lite0, jpeg_bytes):
    from shared.observability import EVENTS

    good = crop_jpeg(decode_upload(jpeg_bytes, max_bytes=1 << 26, max_pixels=1 << 26).image, (0, 0, 200, 200), 512)
    handler = BodyHandler(BodyExtractor([lite0]), ["efficientnet_lite0"], [], cache_entries=2)
    embedded, cached = EVENTS.labels("body", "embedded"), EVENTS.labels("body", "cached")
    events = [detection(good) for _ in range(3)]
    before = embedded._value.get(), cached._value.get()
    first = await handler.handle(events[:2])
    again = await handler.handle([events[1].model_copy(update={"attempt": 2}), events[2]])  # a re-publication
    assert (embedded._value.get() - before[0], cached._value.get() - before[1]) == (3, 1)
    f1, f2 = (Features.from_bytes(h.outputs[0].value) for h in (first[1], again[0]))
    assert f2.detection_id == f1.detection_id and f2.attempt == 2
    assert f2.embeddings[0].vector == f1.embeddings[0].vector
    assert f2.timings_ms == {"body_cached": 0.0} and "body" in f1.timings_ms
    assert len(handler.recent) == 2 and (events[0].detection_id, ("efficientnet_lite0",)) not in handler.recent
    await handler.close()
