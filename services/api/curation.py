"""Human changes to identities: review decisions, reassignments, merges, splits, edits, and undo.

Each change is one transaction under the property's identity lock (the lock fusion decides under, so
a person and the machine never interleave, and individuals are still founded only under it). It:
- moves detections (individual, state, `decided_by = 'human'`);
- refreshes every touched individual's sightings and first/last seen;
- re-chooses their exemplars, so the gallery follows at once;
- records an audit entry with the before and after of everything it touched, plus a `decisions` row
  for every detection whose identity a person set.

Terminal detections are never moved by the pipeline again (`shared.states`), so re-processing cannot
overwrite any of this. Undo replays an entry's `before`, and only while everything it touched still
looks like its `after`: a later change is never silently reverted.
"""
from __future__ import annotations

from uuid import UUID

import asyncpg

from services.fusion import store
from shared.schemas import sex_of

DECIDABLE = ("review", "assigned", "new")  # terminal, and not failed
PLACED = ("assigned", "new")
DETECTION_FIELDS = ("individual_id", "state", "decided_by")
INDIVIDUAL_FIELDS = ("name", "notes", "tags", "merged_into")


class CurationError(Exception):
    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


def _snapshot(row) -> dict:
    return {k: row[k] for k in DETECTION_FIELDS}


def _individual_snapshot(row) -> dict:
    return {k: (list(row[k]) if k == "tags" else row[k]) for k in INDIVIDUAL_FIELDS}


class Change:
    """One human change being built inside its transaction."""

    def __init__(self, conn: asyncpg.Connection, actor: str, exemplars_per_individual: int):
        self.conn, self.actor, self.n_exemplars = conn, actor, exemplars_per_individual
        self.before: dict = {"detections": {}, "individuals": {}}
        self.after: dict = {"detections": {}, "individuals": {}}
        self.touched: set[int] = set()
        self.property: str | None = None

    async def lock(self, prop: str) -> None:
        if self.property is None:
            await store.lock_property(self.conn, prop)
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
            f"human:{self.actor}"[:100])

    async def move(self, det: asyncpg.Record, individual_id: int | None, state: str,
                   decided_by: str | None = "human") -> None:
        key = str(det["id"])
        self.before["detections"].setdefault(key, _snapshot(det))
        self.after["detections"][key] = {"individual_id": individual_id, "state": state, "decided_by": decided_by}
        for ind in (det["individual_id"], individual_id):
            if ind is not None:
                self.touched.add(ind)
        await self.conn.execute(
            """UPDATE detections SET individual_id = $2, state = $3, decided_by = $4, updated_at = now()
               WHERE id = $1""", det["id"], individual_id, state, decided_by)
        if det["individual_id"] != individual_id:
            # the embeddings follow; exemplars are re-chosen for both individuals below
            await self.conn.execute("UPDATE embeddings SET individual_id = $2, exemplar = false WHERE detection_id = $1",
                                    det["id"], individual_id)

    async def edit_individual(self, row: asyncpg.Record, **fields) -> None:
        key = str(row["id"])
        self.before["individuals"].setdefault(key, _individual_snapshot(row))
        after = {**self.after["individuals"].get(key, _individual_snapshot(row)), **fields}
        self.after["individuals"][key] = after
        await self.conn.execute(
            "UPDATE individuals SET name = $2, notes = $3, tags = $4, merged_into = $5 WHERE id = $1",
            row["id"], after["name"], after["notes"], after["tags"], after["merged_into"])

    async def finish(self, action: str, reason: str, undoes: int | None = None) -> dict:
        await self._check_cannot_link()
        await refresh_individuals(self.conn, sorted(self.touched), self.n_exemplars)
        audit_id = await self.conn.fetchval(
            """INSERT INTO audit_log (actor, action, property, reason, before, after, undoes)
               VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id""",
            self.actor, action, self.property, reason[:2000], self.before, self.after, undoes)
        decided = [(UUID(k), v["state"], v["individual_id"]) for k, v in self.after["detections"].items()
                   if v["decided_by"] == "human"]
        await self.conn.executemany(
            """INSERT INTO decisions (detection_id, decided_by, state, individual_id, actor, audit_id)
               VALUES ($1, 'human', $2, $3, $4, $5)""", [(d, s, i, self.actor, audit_id) for d, s, i in decided])
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
    for ind in individuals:
        await store.rechoose_exemplars(conn, ind, n_exemplars)


# --- the changes -------------------------------------------------------------------------------------


async def decide(conn: asyncpg.Connection, actor: str, n_exemplars: int, detection_id: UUID, action: str,
                 individual_id: int | None = None, reason: str = "", override: bool = False) -> dict:
    """A person's decision on one detection.

    - `confirm`: the individual fusion chose or suggested (its best candidate, or `individual_id` among them);
    - `assign`: any individual of the property;
    - `new`: a new individual.
    Without `override` (a review decision) a detection a person already decided is refused with 409, so
    of two reviewers deciding at once one wins and the other is told. `override` is a reassignment.
    """
    change = Change(conn, actor, n_exemplars)
    det = await change.detection(detection_id)
    if det["state"] not in DECIDABLE:
        raise CurationError(f"detection {detection_id} is '{det['state']}': only decided detections "
                            "(review, assigned, new) can be decided by a person", 409)
    if det["decided_by"] == "human" and not override:
        raise CurationError(f"detection {detection_id} was already decided by a person; reassign it instead", 409)
    if action == "confirm":
        suggested = [c["individual_id"] for c in (det["result"] or {}).get("candidates", [])]
        if det["individual_id"] is not None and individual_id is None:
            individual_id = det["individual_id"]
        elif individual_id is None:
            if not suggested:
                raise CurationError("fusion suggested no candidate: assign an individual or declare a new one", 422)
            individual_id = suggested[0]
        elif individual_id not in suggested and individual_id != det["individual_id"]:
            raise CurationError(f"individual {individual_id} is not among the suggested candidates; use 'assign'", 422)
    if action in ("confirm", "assign"):
        if individual_id is None:
            raise CurationError("individual_id is needed", 422)
        target = await change.individual(individual_id)
        if target["property"] != det["property"]:
            raise CurationError("that individual belongs to another property", 422)
        if det["individual_id"] == individual_id and det["decided_by"] == "human":
            raise CurationError(f"detection {detection_id} is already individual {individual_id}", 409)
        # confirming the individual a detection founded keeps it its founder ('new')
        same = det["individual_id"] == individual_id and det["state"] in PLACED
        await change.move(det, individual_id, det["state"] if same else "assigned")
    elif action == "new":
        site, cls, captured = await conn.fetchrow("SELECT site, cls, captured_at FROM detections WHERE id = $1",
                                                  detection_id)
        founded = await change.found(site, sex_of(cls), captured)
        change.after["founded"] = founded
        await change.move(det, founded, "new")
    else:
        raise CurationError(f"unknown action {action!r}: confirm, assign or new", 422)
    return await change.finish("reassign" if override else f"review:{action}", reason)


async def merge(conn: asyncpg.Connection, actor: str, n_exemplars: int, keep: int, absorb: int,
                reason: str = "") -> dict:
    """`absorb`'s sightings become `keep`'s; `absorb` remains as a pointer to `keep`."""
    if keep == absorb:
        raise CurationError("an individual cannot be merged with itself", 422)
    change = Change(conn, actor, n_exemplars)
    kept = await change.individual(keep)
    gone = await change.individual(absorb)
    if kept["property"] != gone["property"]:
        raise CurationError("individuals of two properties (populations) cannot be merged", 422)
    rows = await conn.fetch("SELECT id, state, individual_id, decided_by FROM detections WHERE individual_id = $1 "
                            "FOR UPDATE", absorb)
    for det in rows:
        await change.move(det, keep, det["state"] if det["state"] in PLACED else "assigned")
    await change.edit_individual(gone, merged_into=keep)
    return await change.finish("merge", reason)


async def split(conn: asyncpg.Connection, actor: str, n_exemplars: int, individual_id: int,
                detection_ids: list[UUID], reason: str = "", name: str | None = None) -> dict:
    """The chosen detections of an individual become a new individual."""
    if not detection_ids:
        raise CurationError("choose the detections that become the new individual", 422)
    change = Change(conn, actor, n_exemplars)
    source = await change.individual(individual_id)
    rows = await conn.fetch("SELECT id, state, individual_id, decided_by, captured_at, site FROM detections "
                            "WHERE individual_id = $1 AND state = ANY($2::text[]) ORDER BY captured_at, id FOR UPDATE",
                            individual_id, list(PLACED))
    chosen = [r for r in rows if r["id"] in set(detection_ids)]
    if len(chosen) != len(set(detection_ids)):
        raise CurationError(f"some of those detections are not sightings of individual {individual_id}", 422)
    if len(chosen) == len(rows):
        raise CurationError("a split must leave the individual at least one sighting (rename it instead)", 422)
    founded = await change.found(chosen[0]["site"], source["sex"], chosen[0]["captured_at"])
    change.after["founded"] = founded
    for det in chosen:
        await change.move(det, founded, "assigned")
    if name:
        await change.edit_individual(await change.individual(founded), name=name)
    return await change.finish("split", reason)


async def edit(conn: asyncpg.Connection, actor: str, n_exemplars: int, individual_id: int, fields: dict,
               reason: str = "") -> dict:
    """A name, notes or tags."""
    change = Change(conn, actor, n_exemplars)
    row = await change.individual(individual_id, live=False)
    try:
        async with conn.transaction():  # a savepoint: a taken name is a clear 409, not a broken transaction
            await change.edit_individual(row, **fields)
    except asyncpg.UniqueViolationError:
        raise CurationError(f"another individual of this property is already named {fields.get('name')!r}",
                            409) from None
    return await change.finish("edit", reason)


async def undo(conn: asyncpg.Connection, actor: str, n_exemplars: int, audit_id: int, reason: str = "") -> dict:
    entry = await conn.fetchrow("SELECT * FROM audit_log WHERE id = $1", audit_id)
    if entry is None:
        raise CurationError(f"no audit entry {audit_id}", 404)
    change = Change(conn, actor, n_exemplars)
    await change.lock(entry["property"])
    entry = await conn.fetchrow("SELECT * FROM audit_log WHERE id = $1 FOR UPDATE", audit_id)
    if entry["undone_by"] is not None:
        raise CurationError(f"audit entry {audit_id} was already undone (by entry {entry['undone_by']})", 409)
    before, after = entry["before"], entry["after"]
    for key, want in after["detections"].items():
        det = await conn.fetchrow("SELECT id, state, individual_id, decided_by FROM detections WHERE id = $1 "
                                  "FOR UPDATE", UUID(key))
        if _snapshot(det) != want:
            raise CurationError(f"detection {key} changed after entry {audit_id}; undo the later change first", 409)
        old = before["detections"][key]
        await change.move(det, old["individual_id"], old["state"], old["decided_by"])
    for key, want in after["individuals"].items():
        row = await conn.fetchrow("SELECT * FROM individuals WHERE id = $1 FOR UPDATE", int(key))
        if _individual_snapshot(row) != want:
            raise CurationError(f"individual {key} changed after entry {audit_id}; undo the later change first", 409)
        await change.edit_individual(row, **before["individuals"][key])
    result = await change.finish("undo", reason or f"undo of entry {audit_id}", undoes=audit_id)
    await conn.execute("UPDATE audit_log SET undone_by = $2 WHERE id = $1", audit_id, result["audit_id"])
    return result
