"""Every detection ends terminal: the stuck-work rounds and the join deadlines.

- a detection stuck in a non-terminal state is re-enqueued for the relay, and failed once it made no
  progress after `max_attempts`;
- a join past its deadline is announced to fusion, which decides it with what arrived, unless a missing
  component's work is still on its way through a queue that flows (then it waits one more deadline, up to
  a ceiling: `backlog.join_waits_on`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from datetime import datetime, timezone

import asyncpg
from aiokafka import AIOKafkaProducer

from services.reconciler.backlog import Backlog, QueueWatch, backlog_of, join_waits_on, lag
from services.reconciler.offsets import BROKER_CALL_S, read_positions
from shared.broker import abandon_after
from shared.db import OUTBOX_CHANNEL
from shared.observability import DETECTIONS_BY_STATE, GROUP_LAG
from shared.schemas import JoinDeadline
from shared.states import PENDING, STATES
from shared.topics import JOIN_DEADLINES, ensure_topics

log = logging.getLogger(__name__)

RECONCILE_PAGE = 2000  # overdue detections read and judged in one transaction
RECONCILE_MAX_PAGES = 100  # a round looks at up to 200,000 of them: a season's backlog and more

# The components a detection's join has in (any status), for `missing`; `d` is the detection's row.
ARRIVED_SQL = "(SELECT array_agg(f.component) FROM detection_features f WHERE f.detection_id = d.id) AS arrived"


def missing(row: asyncpg.Record) -> list[str]:
    """The components the detection expects that have not joined yet (body alone before its publication)."""
    arrived = set(row["arrived"] or ())
    return [c for c in row["expected"] or ["body"] if c not in arrived]


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
                f"""SELECT id, state, attempts, published_partition, published_offset, updated_at, expected,
                           {ARRIVED_SQL}, extract(epoch FROM now() - updated_at) AS waited FROM detections d
                   WHERE state = ANY($1::text[])
                     AND updated_at < now() - make_interval(secs => $2 * power(2, least(attempts, 3)))
                     AND (updated_at, id) > ($3, $4)
                     AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.detection_id = d.id)
                   ORDER BY updated_at, id LIMIT $5 FOR UPDATE SKIP LOCKED""",
                sorted(PENDING), stuck_after_s, after[0], after[1], RECONCILE_PAGE)
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
              and backlog.queued(r["state"], r["published_partition"], r["published_offset"], missing(r))]
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


async def count_states(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT state, count(*) AS n FROM detections GROUP BY state")
    counts = {state: 0 for state in STATES}
    counts.update({r["state"]: r["n"] for r in rows})
    for state, n in counts.items():
        DETECTIONS_BY_STATE.labels(state).set(n)
    return counts


class StuckWork:
    """The reconcile loop's round, and what it remembers from one round to the next."""

    def __init__(self, pool: asyncpg.Pool, settings):
        self.pool = pool
        self.settings = settings
        self.watch = QueueWatch()
        self.suspects: set = set()  # found stuck by the last round: re-published if this one agrees
        self.queued = 0  # overdue detections whose events still wait in the log (last round)
        self.backlog: Backlog | None = None  # the last round's (None: not read yet, or the broker did not say)
        self.states: dict[str, int] = {}

    async def round(self) -> None:
        bootstrap = self.settings.kafka_bootstrap
        # A broker restarted empty has lost its topics: put them back before anything auto-creates them.
        # Bounded: a round hung here (seen for minutes after a broker restarted empty) re-publishes nothing,
        # and the work the broker lost waits with it.
        try:
            await abandon_after(ensure_topics(bootstrap), BROKER_CALL_S)
        except asyncio.TimeoutError:
            log.warning("reconciler: the broker did not list its topics within %.0f s: trying again next round",
                        BROKER_CALL_S)
        positions = await read_positions(bootstrap, timeout_s=BROKER_CALL_S)
        backlog = None
        if positions is not None:
            for (group, topic), position in positions.items():
                GROUP_LAG.labels(group, topic).set(lag(position))
            # a partition waiting its turn in a queue that moves counts as queued for up to queued_max_s; a
            # batch of the consumer's in flight is the slack of what it may serve before that turn
            flowing = self.watch.flowing(positions, self.settings.stuck_after_s, longest_s=self.settings.queued_max_s,
                                         slack=self.settings.batch_max)
            backlog = dataclasses.replace(backlog_of(positions), flowing=flowing)
        self.backlog = backlog
        _, _, self.queued = await reconcile_once(self.pool, self.settings.stuck_after_s, self.settings.max_attempts,
                                                 backlog, self.settings.queued_max_s, self.suspects)
        self.states = await count_states(self.pool)


async def announce_due_joins(pool: asyncpg.Pool, producer: AIOKafkaProducer, join_timeout_s: float,
                             backlog: Backlog | None = None, ceiling_s: float = 0.0,
                             limit: int = 1000) -> tuple[int, int]:
    """Tell fusion about joins past their deadline, except those still waiting on a component whose work
    is on its way through a queue that flows (`join_waits_on`, with `backlog` and `ceiling_s`): their
    deadline moves one timeout on, to be judged again then. An announced join is announced again one timeout
    later if still open (the announcement may be lost, and deciding is idempotent). Returns (announced,
    extended)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"""UPDATE detections d SET join_deadline = now() + make_interval(secs => $1::float8)
                WHERE d.id IN (SELECT id FROM detections WHERE state = 'fusing' AND join_deadline < now()
                               ORDER BY join_deadline LIMIT $2 FOR UPDATE SKIP LOCKED)
                RETURNING d.id, d.property, d.published_partition, d.published_offset, d.expected, {ARRIVED_SQL},
                          extract(epoch FROM now() - (SELECT f.arrived_at FROM detection_features f
                                                      WHERE f.detection_id = d.id AND f.component = 'body'))
                            AS joined_s""", join_timeout_s, limit)
    due = [r for r in rows if not join_waits_on(backlog, missing(r), r["published_partition"], r["published_offset"],
                                                float(r["joined_s"] or 0.0), ceiling_s)]
    if due:
        futures = [await producer.send(JOIN_DEADLINES.name, JoinDeadline(detection_id=r["id"], property=r["property"])
                                       .to_bytes(), key=r["property"].encode()) for r in due]
        await asyncio.gather(*futures)
    if len(rows) > len(due):
        log.info("reconciler: %d joins past their deadline wait on components still on their way",
                 len(rows) - len(due))
    return len(due), len(rows) - len(due)
