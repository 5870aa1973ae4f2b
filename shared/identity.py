"""Identity mechanics every writer of identities shares: fusion's decisions, people's changes (the API) and
the census job's re-clustering. One lock per property serializes them, so a person, the machine and the
census job never interleave, and individuals are founded only under it; one `Change` records a set of
moves with its audit entry, its `decisions` rows and the refreshed individuals and exemplars.
"""
from __future__ import annotations

from uuid import UUID

import asyncpg
import numpy as np

from shared import exemplars as exemplar_choice
from shared.viewpoints import VIEWPOINT_SQL


async def lock_property(conn: asyncpg.Connection, prop: str) -> None:
    """Serialize identity assignment per property for the rest of the transaction.

    Individuals are founded only under this lock, so their ids grow in commit order within a
    property: "founded after my search" is exactly "id above the largest id my search could see".
    """
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", prop)


async def rechoose_exemplars(conn: asyncpg.Connection, individual: int, n: int, pool_size: int = 200) -> None:
    """Re-choose the individual's exemplars among its newest `pool_size` embeddings of each version."""
    rows = await conn.fetch(
        f"""SELECT id, version, vec, exemplar, captured_at, viewpoint FROM (
               SELECT e.id, e.version, e.vec, e.exemplar, d.captured_at, {VIEWPOINT_SQL} AS viewpoint,
                      row_number() OVER (PARTITION BY e.version ORDER BY d.captured_at DESC, e.id DESC) AS n
               FROM embeddings e JOIN detections d ON d.id = e.detection_id WHERE e.individual_id = $1) r
           WHERE n <= $2 OR exemplar ORDER BY captured_at DESC, id DESC""", individual, pool_size)
    by_version: dict[str, list] = {}
    for r in rows:
        by_version.setdefault(r["version"], []).append(r)
    keep: list[int] = []
    drop: list[int] = []
    for version_rows in by_version.values():
        pool = version_rows[:pool_size]
        items = [exemplar_choice.ExemplarCandidate(
            r["id"], np.asarray(r["vec"].to_numpy(), dtype=np.float32), r["captured_at"], r["viewpoint"])
            for r in pool]
        chosen = set(exemplar_choice.choose(items, n))
        keep += [r["id"] for r in version_rows if r["id"] in chosen and not r["exemplar"]]
        drop += [r["id"] for r in version_rows if r["id"] not in chosen and r["exemplar"]]
    if keep:
        await conn.execute("UPDATE embeddings SET exemplar = true WHERE id = ANY($1::bigint[])", keep)
    if drop:
        await conn.execute("UPDATE embeddings SET exemplar = false WHERE id = ANY($1::bigint[])", drop)


DECIDABLE = ("review", "assigned", "new")  # terminal, and not failed
PLACED = ("assigned", "new")
DETECTION_FIELDS = ("individual_id", "state", "decided_by")
INDIVIDUAL_FIELDS = ("name", "notes", "tags", "merged_into")


class CurationError(Exception):
    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


def detection_snapshot(row) -> dict:
    return {k: row[k] for k in DETECTION_FIELDS}


def individual_snapshot(row) -> dict:
    return {k: (list(row[k]) if k == "tags" else row[k]) for k in INDIVIDUAL_FIELDS}


class Change:
    """One human change being built inside its transaction."""

    def __init__(self, conn: asyncpg.Connection, actor: str, exemplars_per_individual: int,
                 founder: str | None = None):
        self.conn, self.actor, self.n_exemplars = conn, actor, exemplars_per_individual
        self.founder = founder or f"human:{actor}"  # `individuals.created_by` of what this change founds
        self.before: dict = {"detections": {}, "individuals": {}}
        self.after: dict = {"detections": {}, "individuals": {}}
        self.touched: set[int] = set()
        self.property: str | None = None

    async def lock(self, prop: str) -> None:
        if self.property is None:
            await lock_property(self.conn, prop)
            self.property = prop
        elif prop != self.property:
            raise CurationError("individuals of two properties (populations) cannot be mixed", 422)

    async def detection(self, detection_id: UUID) -> asyncpg.Record:
        prop = await self.conn.fetchval("SELECT property FROM detections WHERE id = $1", detection_id)
        if prop is None:
            raise CurationError(f"no detection {detection_id}", 404)
        await self.lock(prop)
        return await self.conn.fetchrow(
            "SELECT id, property, state, individual_id, decided_by, result, image_sha256 FROM detections "
            "WHERE id = $1 FOR UPDATE", detection_id)

    async def individual(self, individual_id: int, *, live: bool = True) -> asyncpg.Record:
        prop = await self.conn.fetchval("SELECT property FROM individuals WHERE id = $1", individual_id)
        if prop is None:
            raise CurationError(f"no individual {individual_id}", 404)
        await self.lock(prop)
        row = await self.conn.fetchrow("SELECT * FROM individuals WHERE id = $1 FOR UPDATE", individual_id)
        if live and row["merged_into"] is not None:
            raise CurationError(f"individual {individual_id} was merged into {row['merged_into']}", 409)
        return row

    async def found(self, site: str, sex: str, first_seen) -> int:
        """A new individual, founded by a person (under the property lock, as fusion founds them)."""
        return await self.conn.fetchval(
            """INSERT INTO individuals (site, property, sex, first_seen, last_seen, sightings, created_by)
               VALUES ($1, $2, $3, $4, $4, 0, $5) RETURNING id""", site, self.property, sex, first_seen,
            self.founder[:100])

    async def move(self, det: asyncpg.Record, individual_id: int | None, state: str,
                   decided_by: str | None = "human") -> None:
        await self.move_many([(det, individual_id, state, decided_by)])

    async def move_many(self, moves: list[tuple[asyncpg.Record, int | None, str, str | None]]) -> None:
        """Move detections: (row as read under the lock, individual, state, decided_by) each, in two statements
        whatever their number (the census job moves thousands at once)."""
        for det, individual_id, state, decided_by in moves:
            key = str(det["id"])
            self.before["detections"].setdefault(key, detection_snapshot(det))
            self.after["detections"][key] = {"individual_id": individual_id, "state": state, "decided_by": decided_by}
            for ind in (det["individual_id"], individual_id):
                if ind is not None:
                    self.touched.add(ind)
        if not moves:
            return
        await self.conn.execute(
            """UPDATE detections d SET individual_id = m.individual_id, state = m.state, decided_by = m.decided_by,
                   updated_at = now()
               FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[]) AS m(id, individual_id, state, decided_by)
               WHERE d.id = m.id""",
            [d["id"] for d, *_ in moves], [i for _, i, _, _ in moves], [s for _, _, s, _ in moves],
            [by for *_, by in moves])
        # the embeddings follow; exemplars are re-chosen for every touched individual in `finish`
        changed = [(d["id"], i) for d, i, _, _ in moves if d["individual_id"] != i]
        if changed:
            await self.conn.execute(
                """UPDATE embeddings e SET individual_id = m.individual_id, exemplar = false
                   FROM unnest($1::uuid[], $2::bigint[]) AS m(id, individual_id) WHERE e.detection_id = m.id""",
                [d for d, _ in changed], [i for _, i in changed])

    async def edit_individual(self, row: asyncpg.Record, **fields) -> None:
        key = str(row["id"])
        self.before["individuals"].setdefault(key, individual_snapshot(row))
        after = {**self.after["individuals"].get(key, individual_snapshot(row)), **fields}
        self.after["individuals"][key] = after
        await self.conn.execute(
            "UPDATE individuals SET name = $2, notes = $3, tags = $4, merged_into = $5 WHERE id = $1",
            row["id"], after["name"], after["notes"], after["tags"], after["merged_into"])

    async def merge_many(self, rows: list[asyncpg.Record], into: list[int]) -> None:
        """Point each emptied individual (row as read under the lock) at the one it joined, in one statement."""
        for row, target in zip(rows, into):
            key = str(row["id"])
            self.before["individuals"].setdefault(key, individual_snapshot(row))
            self.after["individuals"][key] = {**self.after["individuals"].get(key, individual_snapshot(row)),
                                              "merged_into": target}
        if rows:
            await self.conn.execute(
                """UPDATE individuals i SET merged_into = m.target
                   FROM unnest($1::bigint[], $2::bigint[]) AS m(id, target) WHERE i.id = m.id""",
                [r["id"] for r in rows], into)

    async def finish(self, action: str, reason: str, undoes: int | None = None) -> dict:
        await self._check_cannot_link()
        await refresh_individuals(self.conn, sorted(self.touched), self.n_exemplars)
        audit_id = await self.conn.fetchval(
            """INSERT INTO audit_log (actor, action, property, reason, before, after, undoes)
               VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id""",
            self.actor, action, self.property, reason[:2000], self.before, self.after, undoes)
        # a person's decision, or the census job's (an undo that hands a detection back to fusion records none)
        decided = [(UUID(k), v["decided_by"], v["state"], v["individual_id"])
                   for k, v in self.after["detections"].items() if v["decided_by"] in ("human", "recluster")]
        await self.conn.execute(
            """INSERT INTO decisions (detection_id, decided_by, state, individual_id, actor, audit_id)
               SELECT d, by, s, i, $5, $6
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[]) AS m(d, by, s, i)""",
            [d for d, *_ in decided], [by for _, by, _, _ in decided], [s for _, _, s, _ in decided],
            [i for *_, i in decided], self.actor, audit_id)
        return {"audit_id": audit_id, "action": action, "before": self.before, "after": self.after}

    async def _check_cannot_link(self) -> None:
        """Two animals of one photo are two deer: no change may put them in one individual."""
        moved = [UUID(k) for k, v in self.after["detections"].items() if v["individual_id"] is not None]
        if not moved:
            return
        clash = await self.conn.fetchrow(
            """SELECT d.image_sha256, d.individual_id FROM detections d
               WHERE d.image_sha256 IN (SELECT image_sha256 FROM detections WHERE id = ANY($1::uuid[]))
                 AND d.individual_id IS NOT NULL AND d.state = ANY($2::text[])
               GROUP BY 1, 2 HAVING count(*) > 1 LIMIT 1""", moved, list(PLACED))
        if clash is not None:
            raise CurationError(f"two animals of image {clash['image_sha256'][:12]} would both be individual "
                                f"{clash['individual_id']}: animals seen together are different deer", 409)


async def refresh_individuals(conn: asyncpg.Connection, individuals: list[int], n_exemplars: int) -> None:
    """Recount sightings and first/last seen from the detections, and re-choose the exemplars."""
    if not individuals:
        return
    await conn.execute(
        """UPDATE individuals i SET sightings = s.n, first_seen = coalesce(s.first, i.first_seen),
                                    last_seen = coalesce(s.last, i.last_seen)
           FROM (SELECT x.id, count(d.id) AS n, min(d.captured_at) AS first, max(d.captured_at) AS last
                 FROM unnest($1::bigint[]) AS x(id)
                 LEFT JOIN detections d ON d.individual_id = x.id AND d.state = ANY($2::text[])
                 GROUP BY x.id) s
           WHERE i.id = s.id""", individuals, list(PLACED))
    # an individual left with no sighting has no embedding left to choose among
    for ind in await conn.fetch("SELECT id FROM individuals WHERE id = ANY($1::bigint[]) AND sightings > 0 ORDER BY id",
                                individuals):
        await rechoose_exemplars(conn, ind["id"], n_exemplars)
