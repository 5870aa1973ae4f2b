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

from shared.census.store import remember_undone_run
from shared.identity import DECIDABLE, PLACED, Change, CurationError, individual_snapshot, detection_snapshot
from shared.schemas import sex_of

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
        if detection_snapshot(det) != want:
            raise CurationError(f"detection {key} changed after entry {audit_id}; undo the later change first", 409)
        old = before["detections"][key]
        await change.move(det, old["individual_id"], old["state"], old["decided_by"])
    for key, want in after["individuals"].items():
        row = await conn.fetchrow("SELECT * FROM individuals WHERE id = $1 FOR UPDATE", int(key))
        if individual_snapshot(row) != want:
            raise CurationError(f"individual {key} changed after entry {audit_id}; undo the later change first", 409)
        await change.edit_individual(row, **before["individuals"][key])
    result = await change.finish("undo", reason or f"undo of entry {audit_id}", undoes=audit_id)
    await conn.execute("UPDATE audit_log SET undone_by = $2 WHERE id = $1", audit_id, result["audit_id"])
    # an answer's entry undone: the answer stops counting as a hard rule from the next re-clustering on
    await conn.execute("UPDATE identity_answers SET undone = true WHERE audit_id = $1", audit_id)
    if entry["actor"] == "census" and entry["action"] == "recluster":
        # what the machine did, a person took back: remembered as their answers, or the next run redoes it
        result["answers"] = await remember_undone_run(conn, entry, actor, result["audit_id"])
    return result
