"""Where a partition's log ends, given that Tansu reports it short.

The quirk: asked for a partition's end (ListOffsets, latest), Tansu answers with the first offset of the
partition's last record batch + 1, where Kafka answers the offset after the last record. The records it
already serves run up to a batch's length past the end it reports: 25 records sent at once (one batch,
offsets 12..36) were reported as ending at 13.

Why it matters: an offset past a partition's end is how a re-created partition is recognised (a broker
restarted empty starts its logs again at 0, while consumers and groups still hold the old offsets), and
an event between a group's committed offset and the end is one still queued (the reconciler leaves it be).
Taken at its word, the reported end makes a consumer that read the whole last batch look past the end,
and the last batch's events look lost.

Two ways to live with it, by who asks:
- a reader of its own (partitions assigned, no group) reads the last batch: `true_end_offsets`;
- a group's member cannot fetch elsewhere without moving its position, so it allows a slack:
  `past_recreated_end`. The slack is a guess (a trail of 1 was seen after a restart): a last batch of
  more than RECREATED_SLACK + 1 records outruns it.
"""
from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition

RECREATED_SLACK = 16


def past_recreated_end(offset: int, reported_end: int) -> bool:
    """Whether an offset lies so far past its partition's reported end that the partition must have been
    re-created. (An offset below the reported end is behind the true end too: no slack is needed there.)"""
    return offset > reported_end + RECREATED_SLACK


async def true_end_offsets(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The offset after each partition's last record: the reported ends, corrected by reading each
    partition's last batch (one small fetch for all of them).

    `consumer` is the caller's own, in no group, and is stopped right after: it is assigned the
    partitions and never unsubscribed (aiokafka's fetcher, woken after an unsubscribe, fails the
    consumer; seen with topics still empty)."""
    ends = await consumer.end_offsets(partitions)
    with_data = [tp for tp, end in ends.items() if end > 0]
    if with_data:
        consumer.assign(with_data)
        for tp in with_data:
            consumer.seek(tp, ends[tp] - 1)
        for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
            ends[tp] = max(ends[tp], max(r.offset for r in records) + 1)
    return ends
