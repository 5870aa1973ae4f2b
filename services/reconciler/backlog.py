"""Whether an overdue detection is stuck or queued behind others, and whether a join past its deadline is
still being worked towards: judged from the consumer groups' positions alone (read from the broker by
`offsets`), with no I/O here.

In a season's backlog nearly every detection waits longer than the reconciler's patience; re-publishing
one whose event still waits in a queue that flows would only queue a copy behind itself, and deciding a
join whose component is on its way would decide it `degraded` for nothing but the load.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Mapping

from shared.topics import DETECTIONS, FEATURES_ANTLER, FEATURES_BODY, FEATURES_COAT, FEATURES_POSE, POSE_REQUESTS

# shared.broker.BrokerRunner's groups of the services ("deer-" and the handler's name)
BODY_GROUP, FUSION_GROUP = "deer-body", "deer-fusion"
COAT_GROUP, ANTLER_GROUP, POSE_GROUP = "deer-coat", "deer-antler", "deer-pose"

Queue = tuple[str, str]  # (consumer group, topic name): one group's queue of one topic

# Where an optional component's work waits before fusion joins it: the component's own input queue (the
# detection's event, or for pose the request fusion sent), then fusion's queue of the component's features.
COMPONENT_QUEUES: dict[str, tuple[Queue, Queue]] = {
    "coat": ((COAT_GROUP, DETECTIONS.name), (FUSION_GROUP, FEATURES_COAT.name)),
    "antler": ((ANTLER_GROUP, DETECTIONS.name), (FUSION_GROUP, FEATURES_ANTLER.name)),
    "pose": ((POSE_GROUP, POSE_REQUESTS.name), (FUSION_GROUP, FEATURES_POSE.name)),
}


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
    """The queues a detection can wait in before its decision: its event in the body group's queue (where
    it landed is known), its body features in the fusion group's, and an optional component's work in that
    component's queues (`COMPONENT_QUEUES`). `flowing` names the (queue, partition) whose group offset moved
    lately; a queue not in `positions` (not read) never counts as flowing."""

    positions: Mapping[Queue, Position]
    flowing: frozenset[tuple[Queue, int]] = frozenset()
    body_group: str = BODY_GROUP
    fusion_group: str = FUSION_GROUP

    @property
    def body_queue(self) -> Queue:
        return self.body_group, DETECTIONS.name

    @property
    def body(self) -> Position:
        return self.positions[self.body_queue]

    def behind(self, queue: Queue, partition: int | None, offset: int | None) -> bool:
        """The message at (partition, offset) waits in a partition of `queue` that flows: not consumed yet,
        and still in the log (a broker restarted empty has lost it). A partition that does not move (a
        consumer wedged, hung or gone) holds stuck work, not queued work: re-publishing is then the cure,
        as it was seen to be after a broker restarted empty."""
        position = self.positions.get(queue)
        if position is None or partition is None or offset is None or partition not in position.end \
                or (queue, partition) not in self.flowing:
            return False
        return position.committed.get(partition, 0) <= offset < position.end[partition]

    def busy(self, queue: Queue) -> bool:
        """Some partition of `queue` waits and moves: work whose place in it is not known may be there."""
        position = self.positions.get(queue)
        return position is not None and any(position.waiting(p) and (queue, p) in self.flowing
                                            for p in position.end)

    def in_body_queue(self, partition: int | None, offset: int | None) -> bool:
        return self.behind(self.body_queue, partition, offset)

    def fusion_busy(self) -> bool:
        """Fusion works through a queue of body features: a detection the body has answered may be in it."""
        return self.busy((self.fusion_group, FEATURES_BODY.name))

    def on_its_way(self, missing: Iterable[str], partition: int | None, offset: int | None) -> list[str]:
        """The missing components of a joining detection whose work still waits in a queue that flows: its
        event behind in the component's input queue ((partition, offset): where the event landed), or, where
        its place is not known (a pose request, features on their way to fusion), a queue that waits and
        moves. A component whose queues stand still is stuck or down: its work is not on its way.

        The event's place is unknown too when the relay published it but died before recording where it
        landed: then, as for pose, a waiting queue that moves may hold it. (Judged on the place alone, every
        join whose component had not started on it by its deadline was decided without that component: 22 to
        99 of 256 coat joins in a bench burst with the ensemble on, whose events carry no recorded place.)"""
        out = []
        for component in missing:
            if component not in COMPONENT_QUEUES:
                continue
            inbox, features = COMPONENT_QUEUES[component]
            position_known = inbox[1] == DETECTIONS.name and partition is not None and offset is not None
            if (self.behind(inbox, partition, offset) if position_known else self.busy(inbox)) or self.busy(features):
                out.append(component)
        return out

    def queued(self, state: str, partition: int | None, offset: int | None, missing: Iterable[str] = ()) -> bool:
        """Whether an overdue detection waits in a queue that flows (`missing`: a joining detection's
        components not arrived yet)."""
        if state == "extracting" and self.in_body_queue(partition, offset):
            return True
        if state in ("extracting", "fusing") and self.fusion_busy():
            return True
        return state == "fusing" and bool(self.on_its_way(missing, partition, offset))


def join_waits_on(backlog: Backlog | None, missing: Iterable[str], partition: int | None, offset: int | None,
                  joined_s: float, ceiling_s: float) -> list[str]:
    """The components a join past its deadline waits on for one more deadline instead of being decided
    without them: those of its missing components whose work is on its way (`Backlog.on_its_way`), as long
    as the join started (its body features arrived) less than `ceiling_s` ago. Empty: decide now, with
    what arrived. Without the groups' positions (the broker did not answer) every deadline expires, as it
    did before queues were read."""
    if backlog is None or joined_s >= ceiling_s:
        return []
    return backlog.on_its_way(missing, partition, offset)


def backlog_of(positions: dict[Queue, Position], body_group: str = BODY_GROUP,
               fusion_group: str = FUSION_GROUP) -> Backlog:
    """The backlog in the groups' positions, with nothing flowing yet: which queues move is for a
    `QueueWatch` to say, across rounds."""
    return Backlog(positions, frozenset(), body_group, fusion_group)


@dataclass
class _Standing:
    """Since when one (queue, partition) has stood still with work waiting, and what its queue did since."""

    offset: int  # the group's committed offset then, and at the last round (a move starts a new standing)
    end: int  # the partition's log end then (a lower one later: the log was re-created)
    since: float  # when the offset last moved, or last had nothing waiting
    served: int  # the queue's messages committed up to then (`QueueWatch._served`)
    ahead: int  # the most messages waiting in the queue's other partitions at any round since


class QueueWatch:
    """Remembers, across rounds, when a group's committed offset of each (queue, partition) last moved or
    last had nothing waiting, and what the queue as a whole committed since: a group that has caught up is
    not stuck, and work that reaches it after a quiet spell gets the whole window to be started on before
    its partition counts as standing still.

    One consumer holds many partitions and serves them in turns: a waiting partition can stand still for
    longer than the window while the queue around it moves (seen on a loaded 2-core runner: one coat
    consumer at 1.4 s a detection left 3 of its 8 partitions unmoved for over 8 s, and their joins were
    decided without coat). So a partition that stood still longer than the window still flows while the
    queue moved within the window and has committed, since the partition last moved, no more than the
    most that waited in the queue's other partitions at once since then, plus `slack` (a batch in
    flight): its turn may yet come. Once the queue has served more and the partition is still passed over
    (a fetcher wedged on it, or a hung replica holding it while others work), or the queue itself stood
    still for the window, or the partition stood still for `longest_s`, it is stuck."""

    def __init__(self):
        self._standing: dict[tuple[Queue, int], _Standing] = {}
        self._served: dict[Queue, int] = {}  # messages the queue's group committed, summed over rounds
        self._queue_moved_at: dict[Queue, float] = {}  # when some partition of the queue last moved forward

    def flowing(self, positions: Mapping[Queue, Position], within_s: float, now: float | None = None,
                longest_s: float | None = None, slack: int = 0) -> frozenset:
        """(queue, partition) that flow: moved, or had nothing waiting, within `within_s` (a first sighting
        counts as a move), or wait their turn in a queue that moves (the class's rule), for at most
        `longest_s` (default: `within_s`, which leaves that rule out)."""
        now = time.monotonic() if now is None else now
        longest_s = within_s if longest_s is None else longest_s
        out = set()
        for queue, position in positions.items():
            # work served is each partition's gain over its offset at the last round (its standing's); a first
            # sighting, or a fall (a broker restarted empty starts the offsets again), gains nothing
            gained = 0
            for p in position.end:
                offset, standing = position.committed.get(p, 0), self._standing.get((queue, p))
                gained += max(0, offset - standing.offset) if standing is not None else 0
            served = self._served[queue] = self._served.get(queue, 0) + gained
            if gained or queue not in self._queue_moved_at:
                self._queue_moved_at[queue] = now
            queue_moves = now - self._queue_moved_at[queue] <= within_s
            waiting = lag(position)
            for p, end in position.end.items():
                offset = position.committed.get(p, 0)
                ahead = waiting - max(0, end - offset)
                standing = self._standing.get((queue, p))
                if standing is None or standing.offset != offset or end < standing.end or not position.waiting(p):
                    standing = self._standing[(queue, p)] = _Standing(offset, end, now, served, ahead)
                standing.end, standing.ahead = end, max(standing.ahead, ahead)
                still_s = now - standing.since
                if still_s <= within_s or (still_s <= longest_s and queue_moves
                                           and served - standing.served <= standing.ahead + slack):
                    out.add((queue, p))
        return frozenset(out)
