"""Every topic of the system, created explicitly with a fixed partition count.

Tansu auto-creates unknown topics with 4 partitions and forgets all topics on a
restart, so each process calls `ensure_topics` before it produces or consumes,
and the reconciler calls it again on every pass.

No client of ours ever asks the broker to auto-create a topic (production Kafka
runs with auto.create.topics.enable=false for the same reason; see
`shared.broker.refuse_topic_auto_creation`): topics exist only as `ensure_topics`
makes them, with their fixed partition counts, and until then a client waits
(UnknownTopicOrPartition, retried). Producers that retry while Tansu
creates a topic can still leave its partitions' next offsets behind batches it has
stored; `shared.broker` retries the resulting clashes at once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int


# Detections are keyed by detection id so extractors scale out across partitions.
DETECTIONS = Topic("deer.detections.v1", 8)
# Feature topics are keyed by property: one fusion worker sees a property's events in order,
# and fusion also takes a per-property database lock, so parallel workers never race.
FEATURES_BODY = Topic("deer.features.body.v1", 8)
FEATURES_ANTLER = Topic("deer.features.antler.v1", 8)
FEATURES_COAT = Topic("deer.features.coat.v1", 8)
FEATURES_POSE = Topic("deer.features.pose.v1", 8)
POSE_REQUESTS = Topic("deer.pose.requests.v1", 8)
# The reconciler announces joins whose deadline passed; fusion decides them with what arrived.
JOIN_DEADLINES = Topic("deer.fusion.deadlines.v1", 8)
RESULTS = Topic("deer.results.v1", 4)

INPUTS = (DETECTIONS, FEATURES_BODY, FEATURES_ANTLER, FEATURES_COAT, FEATURES_POSE, POSE_REQUESTS, JOIN_DEADLINES)


def dead_letter_of(topic: Topic | str) -> Topic:
    """The dead-letter topic of an input topic."""
    name = topic.name if isinstance(topic, Topic) else topic
    return Topic(f"{name}.dlq", 1)


DEAD_LETTERS = tuple(dead_letter_of(t) for t in INPUTS)
ALL = INPUTS + (RESULTS,) + DEAD_LETTERS


async def ensure_topics(bootstrap: str, topics: tuple[Topic, ...] = ALL) -> list[str]:
    """Create the topics that are missing; returns the names it created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t.name not in existing]
        if not missing:
            return []
        response = await admin.create_topics([NewTopic(t.name, t.partitions, 1) for t in missing])
        created = []
        for name, code, *message in response.topic_errors:  # (topic, error_code[, error_message])
            if code == 0:
                created.append(name)
            elif code != TopicAlreadyExistsError.errno:  # already there: another process won the race, which is fine
                raise for_code(code)(f"creating topic {name}: {message[0] if message else 'no message'}")
        if created:
            log.info("created topics %s", created)
        return created
    finally:
        await admin.close()
