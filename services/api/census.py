"""The census API: where a property's census stands, its re-clustering runs, and question mode.

Question mode asks one pair at a time, best first (the census job ranks them by the chance the answer
changes the census times the detections it would move; a `same` no other answer corroborates is asked once
more on another pair of the same two sides), and takes one answer: `same`, `different`,
`cannot-tell` or `skip`. An answer is a hard rule for the next re-clustering, audited under the key's owner
and undoable (`POST /v1/census/answers/{id}/undo`). Two people answering one question at once: the first
wins, the second gets 409 with the next question. An answer that contradicts the hard rules (`same` for two
animals of one frame, `different` for two frames of one sighting or a chain of people's corroborated
`same`) is 409 with the reason.
"""
from __future__ import annotations

from typing import Literal
from uuid import UUID

import asyncpg
from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from services.api import curation
from services.api.auth import Reader, Reviewer
from services.api.deps import Config, Pool
from shared.census.store import IN_CENSUS, build_graph, request_run, snapshot
from shared.identity import lock_property

router = APIRouter(prefix="/v1/census", tags=["census"])
NEXT_CANDIDATES = 50  # open questions looked at for the next one that is still worth asking


class AnswerIn(BaseModel):
    answer: Literal["same", "different", "cannot-tell", "skip"]
    reason: str = Field("", max_length=2000)


class CensusSettings(BaseModel):
    auto: bool = Field(description="re-cluster on its own after enough decisions or time (off: only when asked)")


class Reason(BaseModel):
    reason: str = Field("", max_length=2000)


async def _property_exists(conn: asyncpg.Connection, prop: str) -> None:
    if not await conn.fetchval("SELECT true FROM properties WHERE name = $1", prop):
        raise HTTPException(404, detail={"error": f"no property {prop!r}"})


def _photo(det: asyncpg.Record | None) -> dict | None:
    if det is None:
        return None
    return {"detection": str(det["id"]), "photo": f"/v1/detections/{det['id']}/crop",
            "individual_id": det["individual_id"],
            "state": det["state"], "site": det["site"], "captured_at": det["captured_at"].isoformat()}


async def question_view(conn: asyncpg.Connection, q: asyncpg.Record) -> dict:
    """A question as the page shows it: both photos, the other side's individual's best photos, the machine's
    evidence per component (a click away on the page), and why it was asked."""
    dets = {r["id"]: r for r in await conn.fetch(
        "SELECT id, individual_id, state, site, captured_at FROM detections WHERE id = ANY($1::uuid[])",
        [q["a"], q["b"]])}
    edge = await conn.fetchrow("SELECT components, probability, source FROM identity_edges WHERE a = $1 AND b = $2",
                               q["a"], q["b"])
    context = {}
    for side in ("a", "b"):
        ind = dets[q[side]]["individual_id"] if q[side] in dets else None
        if ind is not None:
            rows = await conn.fetch(
                """SELECT DISTINCT e.detection_id FROM embeddings e WHERE e.individual_id = $1 AND e.exemplar
                   AND e.detection_id <> $2 LIMIT 4""", ind, q[side])
            context[side] = [f"/v1/detections/{r['detection_id']}/crop" for r in rows]
    return {"id": q["id"], "property": q["property"], "kind": q["kind"], "run_id": q["run_id"], "rank": q["rank"],
            "a": _photo(dets.get(q["a"])), "b": _photo(dets.get(q["b"])), "best_photos": context,
            "why": {"flip": round(q["flip"], 4), "moves": q["moves"], "priority": round(q["priority"], 4),
                    "log_odds": round(q["log_odds"], 3)},
            "evidence": None if edge is None else {"components": edge["components"], "probability": edge["probability"],
                                                   "source": edge["source"]}}


async def next_question(conn: asyncpg.Connection, prop: str) -> asyncpg.Record | None:
    """The best open question still worth asking: not settled by an answer to the same two sides since its run,
    and about two detections still in the census. Questions found settled turn stale."""
    rows = await conn.fetch(
        """SELECT q.* FROM census_questions q
           WHERE q.property = $1 AND q.state = 'open' ORDER BY q.run_id DESC, q.rank LIMIT $2""", prop, NEXT_CANDIDATES)
    for q in rows:
        settled = await conn.fetchval(
            """SELECT EXISTS (SELECT 1 FROM census_questions x WHERE x.run_id = $1 AND x.state = 'answered'
                              AND x.side_a = $2 AND x.side_b = $3)
                   OR (SELECT count(*) FROM detections WHERE id IN ($4, $5) AND state = ANY($6::text[])) < 2""",
            q["run_id"], q["side_a"], q["side_b"], q["a"], q["b"], list(IN_CENSUS))
        if not settled:
            return q
        await conn.execute("UPDATE census_questions SET state = 'stale' WHERE id = $1 AND state = 'open'", q["id"])
    return None


async def standing(conn: asyncpg.Connection, prop: str) -> dict:
    """Where the census stands: individuals, detections in review, the last run, the questions open and the
    estimate of how many are left before the census stops changing, the answers, the calibration in force."""
    await _property_exists(conn, prop)
    last = await conn.fetchrow("SELECT id, state, finished_at, summary FROM census_runs WHERE property = $1 "
                               "AND state = 'done' ORDER BY id DESC LIMIT 1", prop)
    pending = await conn.fetchrow("SELECT id, state, requested_at FROM census_runs WHERE property = $1 "
                                  "AND state IN ('requested', 'running')", prop)
    counts = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM individuals i WHERE i.property = $1 AND i.merged_into IS NULL
                      AND EXISTS (SELECT 1 FROM detections d WHERE d.individual_id = i.id
                                  AND d.state IN ('assigned', 'new'))) AS individuals,
                  (SELECT count(*) FROM detections WHERE property = $1 AND state = 'review') AS in_review,
                  (SELECT count(*) FROM detections WHERE property = $1 AND state IN ('assigned', 'new')) AS placed,
                  (SELECT count(*) FROM census_questions WHERE property = $1 AND state = 'open') AS open_questions,
                  (SELECT count(*) FROM identity_answers WHERE property = $1 AND NOT undone) AS answers""", prop)
    calibration = await conn.fetchrow("SELECT id, created_at, artifact->'fit' AS fit FROM calibrations "
                                      "WHERE active AND property = $1 ORDER BY id DESC LIMIT 1", prop)
    summary = (last["summary"] if last else None) or {}
    fit = (calibration["fit"] if calibration else None) or {}
    auto = await conn.fetchval("SELECT census_auto FROM properties WHERE name = $1", prop)
    return {"property": prop, "auto": auto, **dict(counts),
            "questions_left_estimate": summary.get("questions_left"),
            "expected_changes": summary.get("expected_changes"),
            "last_run": None if last is None else {"id": last["id"], "finished_at": last["finished_at"], **summary},
            "pending_run": None if pending is None else dict(pending),
            "calibration": None if calibration is None else {
                "id": calibration["id"], "scope": "property", "created_at": calibration["created_at"],
                "answers": fit.get("answers"), "form": fit.get("form"), "rescaled": fit.get("rescaled"),
                "reliability_before": fit.get("reliability_before"),
                "reliability_after": fit.get("reliability_after")}}


@router.get("/{prop}")
async def census(prop: str, pool: Pool, _: Reader):
    """Where the census stands (see `standing`)."""
    async with pool.acquire() as conn:
        return await standing(conn, prop)


@router.put("/{prop}")
async def census_settings(prop: str, body: CensusSettings, pool: Pool, who: Reviewer):
    """Whether the census service re-clusters the property on its own."""
    async with pool.acquire() as conn:
        await _property_exists(conn, prop)
        await conn.execute("UPDATE properties SET census_auto = $2 WHERE name = $1", prop, body.auto)
    return {"property": prop, "auto": body.auto}


@router.delete("/{prop}/calibration")
async def reset_calibration(prop: str, pool: Pool, who: Reviewer, reason: str = Query("", max_length=2000)):
    """Take back the property's own calibration (refitted from its answers): the global one applies again.
    The rows stay as history; the change is in the audit log."""
    async with pool.acquire() as conn, conn.transaction():
        await _property_exists(conn, prop)
        ids = [r["id"] for r in await conn.fetch(
            "UPDATE calibrations SET active = false WHERE active AND property = $1 RETURNING id", prop)]
        if not ids:
            raise HTTPException(404, detail={"error": f"property {prop!r} has no calibration of its own"})
        await conn.execute(
            """INSERT INTO audit_log (actor, action, property, reason, before, after)
               VALUES ($1, 'census:calibration-reset', $2, $3, $4, $5)""", who.owner, prop, reason,
            {"detections": {}, "individuals": {}, "calibrations": ids}, {"detections": {}, "individuals": {}})
    return {"property": prop, "deactivated": ids}


@router.post("/{prop}/recluster", status_code=202)
async def recluster(prop: str, pool: Pool, who: Reviewer):
    """Ask the census service to re-cluster the property now (the pending run, if one is already waiting)."""
    async with pool.acquire() as conn:
        await _property_exists(conn, prop)
        run_id = await request_run(conn, prop, f"api:{who.owner}")
    return {"run_id": run_id, "status": f"/v1/census/runs/{run_id}"}


@router.get("/runs/{run_id}")
async def run(run_id: int, pool: Pool, _: Reader):
    row = await pool.fetchrow("SELECT * FROM census_runs WHERE id = $1", run_id)
    if row is None:
        raise HTTPException(404, detail={"error": f"no census run {run_id}"})
    return dict(row)


@router.get("/{prop}/questions/next")
async def question(prop: str, pool: Pool, _: Reader):
    """The next question (null when none is open: the census is settled, or waits for its next run)."""
    async with pool.acquire() as conn:
        await _property_exists(conn, prop)
        q = await next_question(conn, prop)
        return {"question": None if q is None else await question_view(conn, q)}


async def _check_rules(conn: asyncpg.Connection, prop: str, a: UUID, b: UUID, answer: str) -> None:
    """409 when the answer contradicts the hard rules (frames, sightings, people's answers and placements)."""
    snap = await snapshot(conn, prop, with_edges=False)
    graph, index, _, _ = build_graph(snap, None)
    if a not in index or b not in index:
        raise HTTPException(409, detail={"error": "a detection of this question is no longer in the census "
                                                  "(failed or removed); take the next question"})
    i, j = index[a], index[b]
    # the answer after every rule in force but the uncorroborated `same` answers, which a newer answer
    # outweighs (it is how a slip is undone by the question that verifies it): if the rules leave no room
    # for it, it contradicts them
    loose = [r for r in graph.rules if r[0] == "must" and (min(r[1], r[2]), max(r[1], r[2])) in graph.tentative]
    graph.rules = [r for r in graph.rules if r not in loose] + \
        [("must" if answer == "same" else "cannot", i, j, "this answer")] + loose
    if "this answer" in graph.resolve():
        if answer == "same" and snap["nodes"][i]["image_sha256"] == snap["nodes"][j]["image_sha256"]:
            why = "two animals of one frame are two deer"
        elif answer == "same":
            why = ("a person's 'different', another animal of a frame, or two individuals people placed keep "
                   "these apart (merge the individuals instead, if they are one deer)")
        else:
            why = "a sighting's frames, or people's 'same' answers or placements, make these one animal"
        raise HTTPException(409, detail={"error": f"'{answer}' contradicts the hard rules: {why}"})


@router.post("/questions/{question_id}/answer")
async def answer(question_id: int, body: AnswerIn, pool: Pool, settings: Config, who: Reviewer):
    """One answer to one question. Returns the answer (with its audit entry, to undo it) and the next question."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            prop = await conn.fetchval("SELECT property FROM census_questions WHERE id = $1", question_id)
            if prop is None:
                raise HTTPException(404, detail={"error": f"no question {question_id}"})
            # the property's identity lock first (as the census job takes it before it touches questions): two
            # answers at once are checked one after the other, never against a run half-way through
            await lock_property(conn, prop)
            q = await conn.fetchrow("SELECT * FROM census_questions WHERE id = $1 FOR UPDATE", question_id)
            if q["state"] != "open":
                nxt = await next_question(conn, q["property"])
                raise HTTPException(409, detail={
                    "error": f"question {question_id} is {q['state']} (someone answered it, or a newer run "
                             "replaced it)",
                    "next": None if nxt is None else await question_view(conn, nxt)})
            if body.answer == "skip":
                await conn.execute("UPDATE census_questions SET state = 'skipped' WHERE id = $1", question_id)
                taken = None
            else:
                if body.answer != "cannot-tell":
                    await _check_rules(conn, q["property"], q["a"], q["b"], body.answer)
                audit = await conn.fetchval(
                    """INSERT INTO audit_log (actor, action, property, reason, before, after)
                       VALUES ($1, 'census:answer', $2, $3, $4, $5) RETURNING id""",
                    who.owner, q["property"], body.reason, {"detections": {}, "individuals": {}},
                    {"detections": {}, "individuals": {}, "answer": {"question": question_id, "a": str(q["a"]),
                                                                      "b": str(q["b"]), "answer": body.answer}})
                taken = await conn.fetchrow(
                    """INSERT INTO identity_answers (property, a, b, answer, actor, reason, question_id, audit_id)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id, answer, answered_at, audit_id""",
                    q["property"], q["a"], q["b"], body.answer, who.owner, body.reason, question_id, audit)
                await conn.execute("UPDATE census_questions SET state = 'answered' WHERE id = $1", question_id)
            nxt = await next_question(conn, q["property"])
            if nxt is None:  # nothing left to ask: the census job re-solves with the answers and asks again
                await request_run(conn, q["property"], f"questions answered by {who.owner}")
            return {"answer": None if taken is None else {**dict(taken), "question": question_id},
                    "audit_id": None if taken is None else taken["audit_id"],  # the page's undo key takes it back
                    "next": None if nxt is None else await question_view(conn, nxt)}


@router.post("/answers/{answer_id}/undo")
async def undo_answer(answer_id: int, body: Reason, pool: Pool, settings: Config, who: Reviewer):
    """Take an answer back (its audit entry is undone; the next re-clustering no longer counts it)."""
    audit = await pool.fetchval("SELECT audit_id FROM identity_answers WHERE id = $1", answer_id)
    if audit is None:
        raise HTTPException(404, detail={"error": f"no answer {answer_id}"})
    try:
        async with pool.acquire() as conn, conn.transaction():
            return await curation.undo(conn, who.owner, settings.exemplars_per_individual, audit, body.reason)
    except curation.CurationError as exc:
        raise HTTPException(exc.status, detail={"error": str(exc)}) from None


@router.get("/{prop}/answers")
async def answers(prop: str, pool: Pool, _: Reader, limit: int = Query(100, ge=1, le=10000),
                  offset: int = Query(0, ge=0)):
    """People's answers, newest first (undone ones included and marked)."""
    rows = await pool.fetch(
        """SELECT id, a, b, answer, actor, reason, question_id, audit_id, undone, answered_at FROM identity_answers
           WHERE property = $1 ORDER BY id DESC LIMIT $2 OFFSET $3""", prop, limit, offset)
    return {"items": [dict(r) for r in rows]}
