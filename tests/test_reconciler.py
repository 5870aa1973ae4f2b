"""The reconciler's background work on the real database and broker: a refused outbox row is
dead-lettered while the rows behind it flow, and a loop that fails is restarted and reported."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import uuid
from datetime import datetime, timezone

import asyncpg

from services.reconciler import offsets, reconcile
from services.reconciler.backlog import BODY_GROUP, Backlog, Position, QueueWatch, lag
from services.reconciler.offsets import read_backlog, read_positions
from services.reconciler.reconcile import reconcile_once
from services.reconciler.relay import relay_once
from services.reconciler.service import make_handler
from shared.broker import MAX_MESSAGE_BYTES, producer_for
from shared.config import Settings
from shared.db import _init_connection
from shared.topics import ensure_topics
from tests.conftest import make_jpeg
from tests.stack_helpers import until


async def enqueue(dsn: str, crops: list[bytes]) -> list[uuid.UUID]:
    conn = await asyncpg.connect(dsn)
    await _init_connection(conn)
    ids = []
    try:
        async with conn.transaction():
            for crop in crops:
                sha = hashlib.sha256(crop + os.urandom(8)).hexdigest()
                det = uuid.uuid4()
                now = datetime.now(timezone.utc)
                await conn.execute(
                    """INSERT INTO images (sha256, byte_size, width, height, format, original_name, site, camera,
                                           captured_at, time_source) VALUES ($1,$2,64,48,'JPEG','x.jpg','relay-site',
                                           'c',$3,'request')""", sha, len(crop), now)
                await conn.execute(
                    """INSERT INTO detections (id, image_sha256, ordinal, box, cls, site, camera, captured_at, crop,
                                               property) VALUES ($1,$2,0,'{0,0,64,48}','doe','relay-site','c',$3,$4,
                                               'default')""", det, sha, now, crop)
                await conn.execute("INSERT INTO outbox (detection_id) VALUES ($1)", det)
                ids.append(det)
    finally:
        await conn.close()
    return ids


async def test_a_row_the_broker_refuses_is_dead_lettered_and_the_rest_flow(pg_dsn, broker):
    await ensure_topics(broker.bootstrap)
    good_before = await enqueue(pg_dsn, [make_jpeg()])
    # a crop over the broker's message limit: no retry can ever send it
    [huge] = await enqueue(pg_dsn, [os.urandom(MAX_MESSAGE_BYTES + 1024)])
    good_after = await enqueue(pg_dsn, [make_jpeg(), make_jpeg()])
    pool = await asyncpg.create_pool(pg_dsn, init=_init_connection)
    producer = producer_for(broker.bootstrap, "test-relay")
    await producer.start()
    try:
        while await relay_once(pool, producer, 256):
            pass
        states = {r["id"]: (r["state"], r["state_reason"]) for r in await pool.fetch(
            "SELECT id, state, state_reason FROM detections WHERE id = ANY($1::uuid[])",
            [*good_before, huge, *good_after])}
        assert states[huge][0] == "failed" and "refuses" in states[huge][1] and "MessageSizeTooLarge" in states[huge][1]
        assert all(states[d][0] == "extracting" for d in good_before + good_after)
        assert not await pool.fetchval("SELECT count(*) FROM outbox WHERE detection_id = ANY($1::uuid[])",
                                       [*good_before, huge, *good_after])
        # no claim is left behind, and no transaction stayed open across the broker round trip
        assert not await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'")
    finally:
        await producer.stop()
        await pool.close()


async def test_a_failing_loop_is_restarted_counted_and_reported_not_ready(pg_dsn, broker, monkeypatch):
    from shared.observability import ERRORS

    await ensure_topics(broker.bootstrap)
    settings = Settings(database_url=pg_dsn, kafka_bootstrap=broker.bootstrap, reconcile_every_s=0.05)
    real = reconcile.reconcile_once
    calls = {"n": 0}

    async def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("a bug in one round")
        return await real(*args, **kwargs)

    monkeypatch.setattr(reconcile, "reconcile_once", flaky)
    errors = ERRORS.labels("reconciler", "loop-reconcile")
    before = errors._value.get()
    reconciler = await make_handler(settings)
    try:
        seen = []  # every health the loop below looked at

        def health() -> dict:
            seen.append(reconciler.health())
            return seen[-1]

        await until(health, lambda h: calls["n"] >= 3 and h["ready"], timeout=10, every=0.05,
                    what="the reconcile loop to fail twice, then run again")
        seen_down = next((h for h in seen if not h["ready"]), None)
        assert seen_down is not None and "a bug in one round" in seen_down["loops_down"]["reconcile"]
        assert reconciler.health()["loops_down"] == {}
        assert errors._value.get() - before == 2
        # the relay went on meanwhile: an enqueued detection is published
        [det] = await enqueue(pg_dsn, [make_jpeg()])
        await until(lambda: reconciler.pool.fetchval("SELECT count(*) FROM outbox WHERE detection_id = $1", det),
                    lambda n: n == 0, timeout=5, every=0.05, what="the relay to publish the enqueued detection")
        assert await reconciler.pool.fetchval("SELECT state FROM detections WHERE id = $1", det) == "extracting"
    finally:
        await reconciler.close()


def test_a_detection_is_queued_while_its_event_waits_in_a_queue_that_flows():
    from services.reconciler.backlog import FUSION_GROUP
    from shared.topics import DETECTIONS, FEATURES_BODY

    d, f = (BODY_GROUP, DETECTIONS.name), (FUSION_GROUP, FEATURES_BODY.name)
    body = Position(committed={0: 10}, end={0: 50, 1: 5, 3: 9})
    assert lag(body) == 40 + 5 + 9 and lag(Position({0: 60}, {0: 50})) == 0  # a log re-created behind the group
    backlog = Backlog({d: body, f: Position({0: 4}, {0: 4})}, frozenset({(d, 0), (d, 1), (f, 0)}))
    assert backlog.queued("extracting", 0, 10) and backlog.queued("extracting", 0, 49)  # not consumed yet
    assert not backlog.queued("extracting", 0, 9)  # consumed, and fusion has nothing waiting: stuck
    assert not backlog.queued("extracting", 0, 50)  # beyond the log's end: a broker restarted empty lost it
    assert backlog.queued("extracting", 1, 3)  # a group that never committed starts at the beginning
    assert not backlog.queued("extracting", 3, 5)  # waiting, but the partition does not move: stuck
    assert not backlog.queued("extracting", 2, 0) and not backlog.queued("extracting", None, None)
    # consumed by the body, waiting in fusion's queue, which flows: queued; which stands still: stuck
    busy = Backlog({d: body, f: Position({0: 4}, {0: 90})}, frozenset({(f, 0)}))
    assert busy.queued("extracting", 0, 9) and busy.queued("fusing", None, None)
    still = Backlog({d: body, f: Position({0: 4}, {0: 90})}, frozenset())
    assert not still.queued("extracting", 0, 9) and not still.queued("fusing", None, None)

    watch = QueueWatch()
    pos = {d: Position({0: 5}, {0: 9, 1: 3})}
    assert watch.flowing(pos, 10, now=0.0) == {(d, 0), (d, 1)}  # first sight
    assert watch.flowing(pos, 10, now=8.0) == {(d, 0), (d, 1)}
    assert watch.flowing({d: Position({0: 7}, {0: 9, 1: 3})}, 10, now=15.0) == {(d, 0)}  # 1 stood still
    assert watch.flowing({d: Position({0: 7}, {0: 9, 1: 3})}, 10, now=30.0) == frozenset()
    # caught up, a partition is not stuck: work reaching it gets the whole window to be started on
    assert watch.flowing({d: Position({0: 9}, {0: 9})}, 10, now=100.0) == {(d, 0)}
    assert watch.flowing({d: Position({0: 9}, {0: 12})}, 10, now=109.0) == {(d, 0)}
    assert watch.flowing({d: Position({0: 9}, {0: 12})}, 10, now=111.0) == frozenset()
    # the same topic read by two groups: each group's queue flows or stands on its own
    coat = ("deer-coat", DETECTIONS.name)
    assert watch.flowing({d: Position({0: 9}, {0: 12}), coat: Position({0: 1}, {0: 9})}, 10, now=131.0) == {(coat, 0)}


def test_a_partition_waiting_its_turn_in_a_queue_that_moves_flows_until_the_queue_has_passed_it_by():
    """One consumer serves its partitions in turns: one that stands still past the window while the queue
    moves is waiting its turn, until the queue has committed more than ever waited in its other partitions
    at once since the partition last moved (then it is passed over: stuck), the queue itself stands still
    for the window, or the partition has stood still for `longest_s`."""
    from shared.topics import DETECTIONS

    coat = ("deer-coat", DETECTIONS.name)
    watch = QueueWatch()

    def flows(committed: dict, end: dict, now: float, slack: int = 0) -> set:
        return {p for _, p in watch.flowing({coat: Position(committed, end)}, 10, now=now, longest_s=60, slack=slack)}

    end = {0: 10, 1: 10, 2: 10}  # thirty wait at once, twenty of them in the other partitions of each
    assert flows({}, end, 0.0) == {0, 1, 2}
    assert flows({0: 4}, end, 8.0) == {0, 1, 2}
    # 2 stood still for 15 s, 1 for 12 s, yet the queue moves and has served 4 + 2: their turns come
    assert flows({0: 8, 1: 2}, end, 15.0) == {0, 1, 2}
    assert flows({0: 10, 1: 10}, end, 40.0) == {0, 1, 2}  # 20 served: no more than waited ahead of 2
    assert flows({0: 10, 1: 10, 2: 3}, end, 45.0) == {0, 1, 2}  # 2's turn came
    # passed over: the queue served more than ever waited in the others since 1 last moved
    watch = QueueWatch()
    assert flows({}, {0: 30, 1: 4}, 0.0) == {0, 1}
    assert flows({0: 20}, {0: 40, 1: 4}, 15.0) == {0, 1}  # 20 served, 30 waited in 0
    assert flows({0: 36}, {0: 40, 1: 4}, 20.0) == {0}  # 36 served while 1 stood still: it is being passed over
    # a partition's own pile is not ahead of it: one wedged on its 100 is stuck once the others' few are
    # served, not after longest_s (a hung replica's partitions beside one that works, or a wedged fetcher)
    watch = QueueWatch()
    assert flows({}, {0: 2, 1: 100}, 0.0) == {0, 1}
    assert flows({0: 2}, {0: 6, 1: 100}, 15.0) == {0, 1}  # 2 served, 4 waiting in 0
    assert flows({0: 6}, {0: 6, 1: 100}, 20.0) == {0}
    assert flows({0: 6}, {0: 6, 1: 100}, 20.5, slack=16) == {0, 1}  # a batch of 1's may be in flight
    # a queue that stood still for the window holds no one's turn
    watch = QueueWatch()
    assert flows({}, end, 0.0) == {0, 1, 2}
    assert flows({0: 5}, end, 5.0) == {0, 1, 2}
    assert flows({0: 5}, end, 16.0) == set()
    # nor does any partition stand still past longest_s, however long the queue
    watch = QueueWatch()
    big = {0: 10_000, 1: 10}
    assert flows({}, big, 0.0) == {0, 1}
    assert flows({0: 100}, big, 50.0) == {0, 1} and flows({0: 120}, big, 61.0) == {0}
    # a broker restarted empty: offsets and ends start again, and so does each partition's standing (the
    # fall is no work served); without that, 0 would count as still since 0 s and be stuck at 62 s
    watch = QueueWatch()
    assert flows({}, {0: 50, 1: 10}, 0.0) == {0, 1}
    assert flows({1: 5}, {0: 50, 1: 10}, 50.0) == {0, 1}
    assert flows({}, {0: 3, 1: 0}, 55.0) == {0, 1}
    assert flows({}, {0: 3, 1: 0}, 62.0) == {0, 1}
    assert flows({}, {0: 3, 1: 0}, 66.0) == {1}  # still since the restart, and the queue has not moved
    # without longest_s only the window counts, as before
    watch = QueueWatch()
    assert watch.flowing({coat: Position({}, end)}, 10, now=0.0) == {(coat, p) for p in end}
    assert watch.flowing({coat: Position({0: 8}, end)}, 10, now=15.0) == {(coat, 0)}


def test_a_join_waits_past_its_deadline_only_on_components_whose_queues_flow():
    """The adaptive join deadline: a missing component whose work is behind in a queue that moves is waited
    for one more deadline; one whose queue stands still (stuck, or its service down), or whose queue has
    passed the detection without an answer, is not; nothing is waited for past the ceiling."""
    from services.reconciler.backlog import COMPONENT_QUEUES, join_waits_on

    coat_in, coat_out = COMPONENT_QUEUES["coat"]
    antler_in, antler_out = COMPONENT_QUEUES["antler"]
    pose_in, pose_out = COMPONENT_QUEUES["pose"]
    positions = {coat_in: Position({0: 100}, {0: 400}), antler_in: Position({0: 390}, {0: 400}),
                 coat_out: Position({0: 7}, {0: 7}), antler_out: Position({0: 7}, {0: 7}),
                 pose_in: Position({0: 3}, {0: 5}), pose_out: Position({0: 2}, {0: 2})}
    flowing = frozenset({(coat_in, 0), (antler_in, 0), (pose_in, 0)})
    backlog = Backlog(positions, flowing)

    def waits(missing, offset, joined_s=5.0, ceiling_s=1800.0, on=backlog):
        return join_waits_on(on, missing, 0, offset, joined_s, ceiling_s)

    # the event at 250: behind in the coat queue, which moves; the antler group consumed it (390 > 250) and
    # answered nothing that is still coming: antler is not waited for
    assert waits(["coat", "antler"], 250) == ["coat"]
    assert waits(["antler"], 250) == []
    assert waits(["antler"], 395) == ["antler"]  # not consumed yet
    assert waits(["coat"], 250, joined_s=1800.0) == []  # the ceiling: decided with what arrived
    assert waits(["coat"], 250, on=None) == []  # no positions read: the deadline expires as it always did
    # a coat group that stopped moving (wedged, or its service down): stuck, not on its way
    assert waits(["coat"], 250, on=Backlog(positions, flowing - {(coat_in, 0)})) == []
    # an event whose place was never recorded (the relay died after publishing it): a coat queue that waits
    # and moves may hold it; one that has caught up does not
    assert join_waits_on(backlog, ["coat"], None, None, 5.0, 1800.0) == ["coat"]
    caught_up = Backlog({**positions, coat_in: Position({0: 400}, {0: 400})}, flowing)
    assert join_waits_on(caught_up, ["coat"], None, None, 5.0, 1800.0) == []
    # pose: where fusion's request landed is not known, so a pose queue that waits and moves counts
    assert waits(["pose"], 250) == ["pose"]
    assert waits(["pose"], 250, on=Backlog({**positions, pose_in: Position({0: 5}, {0: 5})}, flowing)) == []
    # answered, the features waiting in fusion's own queue of them, which moves
    features_waiting = Backlog({**positions, antler_out: Position({0: 7}, {0: 9})}, flowing | {(antler_out, 0)})
    assert waits(["antler"], 250, on=features_waiting) == ["antler"]
    # the stuck-work rounds agree: a joining detection with a component on its way is queued, not stuck
    assert backlog.queued("fusing", 0, 250, ["coat"]) and not backlog.queued("fusing", 0, 250, ["antler"])


async def test_overdue_detections_queued_behind_a_backlog_are_not_republished(pg_dsn, broker):
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from shared.topics import DETECTIONS

    await ensure_topics(broker.bootstrap)
    ids = await enqueue(pg_dsn, [make_jpeg() for _ in range(6)])
    pool = await asyncpg.create_pool(pg_dsn, init=_init_connection)
    producer = producer_for(broker.bootstrap, "test-backlog")
    await producer.start()
    group = f"test-body-{uuid.uuid4()}"
    try:
        while await relay_once(pool, producer, 256):
            pass
        landed = await pool.fetch("SELECT id, published_partition, published_offset FROM detections "
                                  "WHERE id = ANY($1::uuid[])", ids)
        assert all(r["published_partition"] is not None and r["published_offset"] is not None for r in landed)
        # all overdue; the (test's own) body group has consumed nothing: queued, none re-published
        await pool.execute("UPDATE detections SET updated_at = now() - interval '1 hour' WHERE id = ANY($1::uuid[])",
                           ids)
        found = await read_backlog(broker.bootstrap, group, f"{group}-fusion")
        # as if the body group moved lately on every partition
        backlog = dataclasses.replace(found, flowing=frozenset((found.body_queue, p) for p in found.body.end))
        retried, failed, queued = await reconcile_once(pool, 1.0, 10, backlog, queued_max_s=7200)
        assert queued >= len(ids) and not failed
        mine = await pool.fetch("SELECT attempts, state FROM detections WHERE id = ANY($1::uuid[])", ids)
        assert {(r["attempts"], r["state"]) for r in mine} == {(0, "extracting")}
        assert not await pool.fetchval("SELECT count(*) FROM outbox WHERE detection_id = ANY($1::uuid[])", ids)
        # the group consumes past them and nothing happens: now they are stuck, and re-published
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            past: dict = {}
            for r in landed:
                tp = TopicPartition(DETECTIONS.name, r["published_partition"])
                past[tp] = max(past.get(tp, 0), r["published_offset"] + 1)
            consumer.assign(list(past))
            await consumer.commit(past)
        finally:
            await consumer.stop()
        found = await read_backlog(broker.bootstrap, group, f"{group}-fusion")
        backlog = dataclasses.replace(found, flowing=frozenset((found.body_queue, p) for p in found.body.end))
        suspects: set = set()
        await reconcile_once(pool, 1.0, 10, backlog, queued_max_s=7200, suspects=suspects)
        assert set(ids) <= suspects  # one round finding them stuck is not enough
        assert not await pool.fetchval("SELECT max(attempts) FROM detections WHERE id = ANY($1::uuid[])", ids)
        await reconcile_once(pool, 1.0, 10, backlog, queued_max_s=7200, suspects=suspects)
        mine = await pool.fetch("SELECT attempts FROM detections WHERE id = ANY($1::uuid[])", ids)
        assert {r["attempts"] for r in mine} == {1}
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE detection_id = ANY($1::uuid[])", ids) == len(ids)
    finally:
        await producer.stop()
        await pool.close()


async def test_offsets_are_read_from_a_fresh_broker_round_after_round(broker):
    """Topics still empty, as when a stack starts: every group's position reads (lag 0), again and again,
    and nothing is left failing the next round."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from shared.topics import Topic

    topics = [Topic(f"fresh-{uuid.uuid4().hex[:8]}", 2) for _ in range(2)]
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t.name, t.partitions, 1) for t in topics])
    finally:
        await admin.close()
    group = f"fresh-{uuid.uuid4()}"
    pairs = [(group, t) for t in topics]
    for _ in range(3):
        positions = await read_positions(broker.bootstrap, pairs)
        assert positions is not None and set(positions) == {(group, t.name) for t in topics}
        assert all(lag(p) == 0 for p in positions.values())


async def test_a_broker_that_hangs_its_admin_answers_does_not_hold_back_stuck_work(pg_dsn, broker, monkeypatch):
    """Seen after a broker restarted empty: listing its topics hung for minutes, and with it the reconcile
    round, so the work the broker had lost was never re-published. The round gives up on the broker's
    answers after BROKER_CALL_S (even when their clean-up hangs too) and reconciles by time alone."""
    await ensure_topics(broker.bootstrap)
    release = asyncio.Event()

    async def hangs(*_args, **_kwargs):
        try:
            await asyncio.sleep(3600)
        finally:  # a clean-up that hangs as well, as aiokafka's close did
            await release.wait()

    monkeypatch.setattr(reconcile, "ensure_topics", hangs)
    monkeypatch.setattr(offsets, "_read_positions", hangs)
    monkeypatch.setattr(reconcile, "BROKER_CALL_S", 0.2)
    [det] = await enqueue(pg_dsn, [make_jpeg()])
    pool = await asyncpg.create_pool(pg_dsn, init=_init_connection, min_size=1, max_size=2)
    # its event went to a broker that has since lost it: published long ago, never consumed
    await pool.execute("DELETE FROM outbox WHERE detection_id = $1", det)
    await pool.execute("UPDATE detections SET state = 'extracting', updated_at = now() - interval '1 hour', "
                       "published_partition = 0, published_offset = 0 WHERE id = $1", det)
    settings = Settings(database_url=pg_dsn, kafka_bootstrap=broker.bootstrap, reconcile_every_s=0.05,
                        stuck_after_s=1.0)
    reconciler = await make_handler(settings)
    try:
        await until(lambda: pool.fetchval("SELECT attempts FROM detections WHERE id = $1", det), timeout=10,
                    every=0.1, what="the stuck detection to be re-published while the broker's answers hang")
    finally:
        release.set()
        await reconciler.close()
        await pool.execute("DELETE FROM outbox WHERE detection_id = $1", det)
        await pool.close()


async def test_stuck_work_behind_a_large_queued_backlog_is_found_in_the_same_round(pg_dsn):
    """The reconciler read the 2,000 oldest overdue rows: with more queued than that, the same queued rows
    came back every round and a stuck detection behind them waited for DEER_QUEUED_MAX_S."""
    from shared.topics import DETECTIONS

    queued_n = 2_100
    conn = await asyncpg.connect(pg_dsn)
    tag = uuid.uuid4().hex[:8]
    try:
        await conn.execute(
            """INSERT INTO images (sha256, byte_size, width, height, format, original_name, site, camera, captured_at,
                                   time_source)
               SELECT encode(sha256(($1 || n)::bytea), 'hex'), 1, 64, 48, 'JPEG', 'q.jpg', 'starve-site', 'c', now(),
                      'request' FROM generate_series(0, $2) n""", tag, queued_n)
        await conn.execute(
            """INSERT INTO detections (id, image_sha256, ordinal, box, cls, site, camera, captured_at, crop, property,
                                       state, published_partition, published_offset, updated_at)
               SELECT gen_random_uuid(), encode(sha256(($1 || n)::bytea), 'hex'), 0, '{0,0,64,48}', 'doe',
                      'starve-site', 'c', now(), '\\x00', 'default', 'extracting',
                      CASE WHEN n < $2 THEN 0 END, CASE WHEN n < $2 THEN n END,
                      now() - CASE WHEN n < $2 THEN interval '2 hours' ELSE interval '1 hour' END
               FROM generate_series(0, $2) n""", tag, queued_n)
        stuck = await conn.fetchval("SELECT id FROM detections WHERE site = 'starve-site' AND published_partition IS NULL")
        # every queued one waits in a body partition that flows; the stuck one was never published
        body = (BODY_GROUP, DETECTIONS.name)
        backlog = Backlog({body: Position({0: 0}, {0: 10 ** 9})}, frozenset({(body, 0)}))
        pool = await asyncpg.create_pool(pg_dsn, init=_init_connection, min_size=1, max_size=2)
        try:
            retried, failed, queued = await reconcile_once(pool, 1.0, 10, backlog, queued_max_s=10 ** 6)
        finally:
            await pool.close()
        assert queued >= queued_n and failed == 0
        assert await conn.fetchval("SELECT attempts FROM detections WHERE id = $1", stuck) == 1
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE detection_id = $1", stuck) == 1
        assert await conn.fetchval("SELECT max(attempts) FROM detections WHERE site = 'starve-site' "
                                   "AND published_partition IS NOT NULL") == 0
    finally:
        await conn.execute("DELETE FROM outbox WHERE detection_id IN (SELECT id FROM detections WHERE site = 'starve-site')")
        await conn.execute("DELETE FROM detections WHERE site = 'starve-site'")
        await conn.execute("DELETE FROM images WHERE site = 'starve-site'")
        await conn.close()


class SentMessages:
    """A producer that keeps what it is asked to send (the join deadlines' wiring needs no broker)."""

    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None):
        self.sent.append((topic, value))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_a_join_past_its_deadline_waits_while_its_component_queue_flows_and_is_announced_when_not(pg_dsn):
    """announce_due_joins on the real database: of three joins past their deadline, each expecting coat that
    has not come, the one whose event the coat group has yet to reach (and which moves) gets a later deadline
    and no announcement; the one the coat group passed without an answer, and the one that has waited past
    the ceiling, are announced to fusion."""
    from services.reconciler.backlog import COMPONENT_QUEUES
    from services.reconciler.reconcile import announce_due_joins
    from shared.schemas import JoinDeadline
    from shared.topics import JOIN_DEADLINES

    [behind, passed, too_long] = ids = await enqueue(pg_dsn, [make_jpeg() for _ in range(3)])
    pool = await asyncpg.create_pool(pg_dsn, init=_init_connection, min_size=1, max_size=2)
    try:
        await pool.execute("DELETE FROM outbox WHERE detection_id = ANY($1::uuid[])", ids)
        for det, offset, body_age in ((behind, 900_000, "5 seconds"), (passed, 10, "5 seconds"),
                                      (too_long, 900_001, "2 hours")):
            await pool.execute(
                """UPDATE detections SET state = 'fusing', expected = ARRAY['body', 'coat'], published_partition = 0,
                       published_offset = $2, join_deadline = now() - interval '1 second' WHERE id = $1""", det, offset)
            await pool.execute("INSERT INTO detection_features (detection_id, component, status, features, arrived_at) "
                               "VALUES ($1, 'body', 'ok', '{}', now() - $2::text::interval)", det, body_age)
        coat_in = COMPONENT_QUEUES["coat"][0]
        backlog = Backlog({coat_in: Position({0: 100}, {0: 10 ** 6})}, frozenset({(coat_in, 0)}))
        producer = SentMessages()
        await announce_due_joins(pool, producer, 5.0, backlog, ceiling_s=1800.0)
        announced = {JoinDeadline.from_bytes(v).detection_id for t, v in producer.sent if t == JOIN_DEADLINES.name}
        assert passed in announced and too_long in announced and behind not in announced
        later = await pool.fetch("SELECT id FROM detections WHERE id = ANY($1::uuid[]) AND join_deadline > now()", ids)
        assert {r["id"] for r in later} == set(ids)  # each judged again (or announced again) one timeout on
        # without the groups' positions every deadline expires, as before
        await pool.execute("UPDATE detections SET join_deadline = now() - interval '1 second' WHERE id = $1", behind)
        producer = SentMessages()
        await announce_due_joins(pool, producer, 5.0, None, ceiling_s=1800.0)
        assert behind in {JoinDeadline.from_bytes(v).detection_id for _, v in producer.sent}
    finally:
        await pool.execute("UPDATE detections SET state = 'failed' WHERE id = ANY($1::uuid[])", ids)
        await pool.close()
