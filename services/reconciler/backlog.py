"""Whether an overdue detection is stuck or queued behind others: judged from the consumer groups'
positions alone (read from the broker by `offsets`), with no I/O here.

In a season's backlog nearly every detection waits longer than the reconciler's patience; re-publishing
one whose event still waits in a queue that flows would only queue a copy behind itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from shared.topics import DETECTIONS, FEATURES_BODY

BODY_GROUP, FUSION_GROUP = "deer-body", "deer-fusion"  # shared.broker.BrokerRunner's groups of the services


@dataclass(frozen=True)
class Position:
    """Where a consumer group stands on a topic: per partition its committed offset and the log's end."""

    committed: dict[int, int]
    end: dict[int, int]

    def waiting(self, partition: int) -> bool:
        return self.committed.get(partition, 0) < self.end.get(partition, 0)


def lag(position: Position) -> int:
    """Messages the group has yet to consume, all partitions together."""
    return sum(max(0, end - position.committed.get(p, 0)) for p, end in position.end.items())


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


def backlog_of(positions: dict[tuple[str, str], Position], body_group: str = BODY_GROUP,
               fusion_group: str = FUSION_GROUP) -> Backlog:
    """The backlog in the groups' positions ((group, topic name) -> position), with nothing flowing yet:
    which queues move is for a `QueueWatch` to say, across rounds."""
    return Backlog(positions[(body_group, DETECTIONS.name)], positions.get((fusion_group, FEATURES_BODY.name)))


class QueueWatch:
    """Remembers when a group's committed offset of each (topic, partition) last moved, across rounds."""

    def __init__(self):
        self._last: dict[tuple[str, int], tuple[int, float]] = {}  # -> (committed offset, when it last changed)

    def flowing(self, positions: dict[str, Position], within_s: float, now: float | None = None) -> frozenset:
        """(topic, partition) whose group offset moved within `within_s` (a first sighting counts as a move)."""
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
