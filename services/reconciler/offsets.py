"""The consumer groups' positions, read from the broker: each group's committed offsets and the logs' ends.

Read each round from outside the consumers, so the lag an operator (and KEDA) scales on stays true while
a consumer is idle, hung or gone, and so the stuck-work rounds can tell queued work from stuck work.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.reconciler.backlog import ANTLER_GROUP, BODY_GROUP, COAT_GROUP, FUSION_GROUP, POSE_GROUP, Backlog, \
    Position, Queue, backlog_of
from shared.broker import abandon_after, read_true_ends, refuse_topic_auto_creation
from shared.topics import DETECTIONS, FEATURES_ANTLER, FEATURES_BODY, FEATURES_COAT, FEATURES_POSE, \
    JOIN_DEADLINES, POSE_REQUESTS, Topic

log = logging.getLogger(__name__)

# Every consumer group's queue.
WATCHED = ((BODY_GROUP, DETECTIONS), (COAT_GROUP, DETECTIONS), (ANTLER_GROUP, DETECTIONS),
           (POSE_GROUP, POSE_REQUESTS), (FUSION_GROUP, FEATURES_BODY), (FUSION_GROUP, FEATURES_COAT),
           (FUSION_GROUP, FEATURES_ANTLER), (FUSION_GROUP, FEATURES_POSE), (FUSION_GROUP, JOIN_DEADLINES))

BROKER_CALL_S = 10.0  # the longest a reconcile round waits on one of the broker's admin answers


async def read_positions(bootstrap: str, pairs: Sequence[tuple[str, Topic]] = WATCHED, timeout_s: float = BROKER_CALL_S
                         ) -> dict[Queue, Position] | None:
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


async def _read_positions(bootstrap: str, pairs: Sequence[tuple[str, Topic]]) -> dict[Queue, Position] | None:
    refuse_topic_auto_creation()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5_000)
    try:
        await admin.start()
        ends = await _ends(bootstrap, list({t.name: t for _, t in pairs}.values()))
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
        try:
            await admin.close()
        except Exception as exc:  # noqa: BLE001 - a failed clean-up must not fail the round
            log.warning("reconciler: closing an offsets client: %r", exc)
    return positions


def _partitions(topics: list[Topic]) -> list[TopicPartition]:
    return [TopicPartition(t.name, p) for t in topics for p in range(t.partitions)]


async def _committed(admin: AIOKafkaAdminClient, group: str, topics: list[Topic]) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = {}
    for tp, meta in (await admin.list_consumer_group_offsets(group, partitions=_partitions(topics))).items():
        if meta.offset >= 0:
            out.setdefault(tp.topic, {})[tp.partition] = meta.offset
    return out


async def _ends(bootstrap: str, topics: list[Topic]) -> dict[str, dict[int, int]]:
    """topic name -> partition -> the log's true end, for all the topics in one round trip of each kind."""
    out: dict[str, dict[int, int]] = {t.name: {} for t in topics}
    for tp, end in (await read_true_ends(bootstrap, _partitions(topics), BROKER_CALL_S)).items():
        out[tp.topic][tp.partition] = end
    return out
