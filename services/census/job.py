"""One re-clustering of a property's identity graph: read it, solve it, apply what the evidence carries in
one transaction, and leave the rest as questions.

1. Edges: fusion writes one per pair it scored (the detection and each top candidate's closest photo);
   this job adds the body network's nearest neighbours among all of the property's detections (not only
   the gallery's exemplars), so that two photos of one animal that never met in a search still meet here.
2. Weights: each edge's stored raw component scores through the property's calibration (refitted from its
   people's answers, `shared.census.refit`) or the global one, as log-odds.
3. Rules: a sighting's frames and a person's `same` are one animal; two animals of one frame and a
   person's `different` are two; what a person placed stays (anchors).
4. Solve (`shared.census.graph.cluster`), plan (`shared.census.plan.plan`), apply under the property's
   identity lock with the current state re-read there: a detection fusion decided meanwhile is simply
   not in this run's graph, a person's change meanwhile is an anchor. A kill -9 anywhere leaves either
   nothing or everything: the changes, the questions and the run's record commit together.
"""
from __future__ import annotations

import logging
import time
from uuid import UUID

import asyncpg
import numpy as np

from shared.calibrated import FusionModel, logit
from shared.census.graph import IdentityGraph, cluster, units_of
from shared.census.hubness import LocalScale, neighbours
from shared.census.plan import NewIndividual, plan, questions, sides, stopping
from shared.census.refit import RefitRule, labelled_pairs, refit_from_answers
from shared.census.store import build_graph, request_run, run_lock_key, snapshot
from shared.config import Settings
from shared.identity import PLACED, Change, lock_property
from shared.schemas import sex_of

log = logging.getLogger(__name__)
ACTOR = "census"
ANSWERS = ("same", "different", "cannot-tell")


class RunTaken(RuntimeError):
    """Another census process is re-clustering this property right now."""


async def calibration_for(conn: asyncpg.Connection, prop: str) -> tuple[int | None, dict | None, str]:
    """(id, artifact, 'property' | 'global') of the calibration that applies to the property's edges."""
    row = await conn.fetchrow("SELECT id, artifact FROM calibrations WHERE active AND property = $1 "
                              "ORDER BY id DESC LIMIT 1", prop)
    if row is not None:
        return row["id"], row["artifact"], "property"
    row = await conn.fetchrow("SELECT id, artifact FROM calibrations WHERE active AND property IS NULL "
                              "ORDER BY id DESC LIMIT 1")
    return (row["id"], row["artifact"], "global") if row else (None, None, "none")


async def add_neighbour_edges(conn: asyncpg.Connection, prop: str, nodes: list[UUID], keep: int,
                              hubness_k: int) -> tuple[int, LocalScale | None]:
    """Census edges from each node to its `keep` nearest by the property's most common body embedding version
    (by locally scaled similarity, `shared.census.hubness`); returns how many were new, and the local scale
    of that version's body scores (None without vectors, or with `hubness_k` 0). Pairs fusion scored keep
    fusion's edge (more components)."""
    version = await conn.fetchrow(
        """SELECT version, model FROM embeddings WHERE property = $1 AND detection_id = ANY($2::uuid[])
           GROUP BY version, model ORDER BY count(*) DESC, version LIMIT 1""", prop, nodes)
    if version is None or (keep <= 0 and hubness_k <= 0):
        return 0, None
    rows = await conn.fetch(
        "SELECT detection_id, vec FROM embeddings WHERE version = $1 AND detection_id = ANY($2::uuid[])",
        version["version"], nodes)
    if len(rows) < 2:
        return 0, None
    ids = [r["detection_id"] for r in rows]
    vecs = np.stack([np.asarray(r["vec"].to_numpy(), dtype=np.float32) for r in rows])
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    name = f"body:{version['model']}"  # fusion's body component name (shared.components.body_component)
    blocks = ((start, vecs[start:start + 2048] @ vecs.T) for start in range(0, len(ids), 2048))
    r, nearest = neighbours(blocks, len(ids), keep, hubness_k)
    scale = LocalScale(name, dict(zip(ids, r.tolist())), float(r.mean())) if hubness_k > 0 else None
    if not nearest:
        return 0, scale
    pairs = [(min(ids[i], ids[j], key=str), max(ids[i], ids[j], key=str), s) for (i, j), s in nearest.items()]
    async with conn.transaction():  # bulk: a season holds hundreds of thousands of pairs
        await conn.execute("CREATE TEMP TABLE census_pairs (a uuid, b uuid, sim real) ON COMMIT DROP")
        await conn.copy_records_to_table("census_pairs", records=pairs)
        status = await conn.execute(
            """INSERT INTO identity_edges (property, a, b, components, source)
               SELECT $1, a, b, jsonb_build_object($2::text, sim), 'census' FROM census_pairs
               ON CONFLICT (a, b) DO NOTHING""", prop, name)
    return int(status.split()[-1]), scale


def refit(prop: str, artifact: dict | None, scope: str, raw: dict, same: np.ndarray,
          rule: RefitRule) -> tuple[dict, dict | None]:
    """The property's calibration refitted from its answers: (report, the artifact to install, or None). Pure:
    the artifact is installed with the run's changes, in its transaction (`install_refit`)."""
    current = (artifact or {}).get("fusion")
    report = refit_from_answers(raw, same, current, rule)
    report["replaces"] = scope
    if not report["accepted"] or artifact is None:
        if artifact is None and report["accepted"]:
            report["accepted"] = False
            report["why"] = "no calibration to refit (install one: `deer-reid calibration install`)"
        return {k: v for k, v in report.items() if k != "fusion"}, None
    fitted = {**artifact, "fusion": {**report["fusion"], "coat_version": current.get("coat_version"),
                                     "antler_version": current.get("antler_version")},
              "fit": {**artifact.get("fit", {}), "property": prop, "answers": report["answers"], "form": report["form"],
                      "rescaled": report["fusion"].get("rescaled"),
                      "reliability_before": report["before"], "reliability_after": report["after"]}}
    return {k: v for k, v in report.items() if k != "fusion"}, fitted


async def install_refit(conn: asyncpg.Connection, prop: str, fitted: dict) -> int:
    """Make a refit the property's calibration (the earlier ones stay as history)."""
    await conn.execute("UPDATE calibrations SET active = false WHERE active AND property = $1", prop)
    return await conn.fetchval(
        "INSERT INTO calibrations (artifact, created_by, property) VALUES ($1, 'census', $2) RETURNING id",
        fitted, prop)


async def recluster(pool: asyncpg.Pool, prop: str, settings: Settings, run_id: int | None = None) -> dict:
    """Re-solve the property's census; returns the run's summary (also stored in `census_runs`)."""
    async with pool.acquire() as conn:
        # one runner per property: a session lock, released if this process dies (kill -9 included)
        if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 8))", run_lock_key(prop)):
            raise RunTaken(f"property {prop!r} is being re-clustered by another census process")
        try:
            return await _recluster(conn, prop, settings, run_id)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 8))", run_lock_key(prop))


async def _recluster(conn: asyncpg.Connection, prop: str, settings: Settings, run_id: int | None) -> dict:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    async with conn.transaction():
        # a run left `running` died mid-way (its lock is free now): nothing of it was applied
        await conn.execute("UPDATE census_runs SET state = 'abandoned', finished_at = now() "
                           "WHERE property = $1 AND state = 'running' AND id IS DISTINCT FROM $2", prop, run_id)
        if run_id is None:
            run_id = await request_run(conn, prop, "cli")
        started_run = await conn.fetchval("UPDATE census_runs SET state = 'running', started_at = now() "
                                          "WHERE id = $1 AND state = 'requested' RETURNING id", run_id)
        if started_run is None:  # another census process did it already (or it was abandoned meanwhile)
            raise RunTaken(f"census run {run_id} of {prop!r} is no longer waiting")
        decisions_seen = await conn.fetchval("SELECT coalesce(max(id), 0) FROM decisions")
        answers_seen = await conn.fetchval("SELECT coalesce(max(id), 0) FROM identity_answers WHERE property = $1",
                                           prop)
    try:
        nodes = [r["id"] for r in await conn.fetch(
            "SELECT id FROM detections WHERE property = $1 AND state IN ('assigned', 'new', 'review')", prop)]
        t = time.perf_counter()
        new_edges, scale = await add_neighbour_edges(conn, prop, nodes, settings.census_neighbours,
                                                     settings.census_hubness_k)
        timings["neighbours_s"] = time.perf_counter() - t
        t = time.perf_counter()
        snap = await snapshot(conn, prop)
        timings["read_s"] = time.perf_counter() - t
        cal_id, artifact, scope = await calibration_for(conn, prop)
        model = FusionModel.from_artifact({**artifact, "version_id": cal_id}) if artifact else None
        t = time.perf_counter()
        graph, index, asked, latest = build_graph(snap, model, scale)
        refitted, fitted = None, None
        previous = await conn.fetchval(
            "SELECT (summary->'refit'->>'answers')::int FROM census_runs WHERE property = $1 AND state = 'done' "
            "AND summary->'refit' IS NOT NULL ORDER BY id DESC LIMIT 1", prop)
        raw, same = labelled_pairs(snap, index, latest)
        rule = RefitRule.of(settings)
        if rule.due(same.size, previous or 0):
            refitted, fitted = refit(prop, artifact, scope, raw, same, rule)
            if fitted is not None:  # the refit weighs this run's edges; it is installed with the run's changes
                artifact, scope = fitted, "property (refitted in this run)"
                model = FusionModel.from_artifact({**artifact, "version_id": "0"})
                graph, index, asked, latest = build_graph(snap, model, scale)
        timings["graph_s"] = time.perf_counter() - t
        t = time.perf_counter()
        solved = cluster(graph)
        timings["solve_s"] = time.perf_counter() - t
        match = float((artifact or {}).get("thresholds", {}).get("match", settings.match_threshold))
        threshold = float(logit(min(max(match, 0.5), 0.999)))  # the calibrated match threshold, as log-odds
        t = time.perf_counter()
        async with conn.transaction():
            await lock_property(conn, prop)
            if fitted is not None:
                cal_id = refitted["calibration_id"] = await install_refit(conn, prop, fitted)
            summary = await _apply(conn, prop, snap, graph, index, asked, solved.labels, threshold, settings,
                                   run_id)
            summary.update({"nodes": graph.n, "edges": len(graph.weights), "new_edges": new_edges,
                            "units": solved.units, "objective": round(solved.objective, 3),
                            "calibration": {"id": cal_id, "scope": scope}, "refit": refitted,
                            "rules_dropped": graph.dropped[:50],
                            "threshold_log_odds": round(threshold, 4)})
            timings["apply_s"] = time.perf_counter() - t
            timings["total_s"] = time.perf_counter() - started
            summary["seconds"] = {k: round(v, 3) for k, v in timings.items()}
            await conn.execute(
                """UPDATE census_runs SET state = 'done', finished_at = now(), summary = $2, decisions_seen = $3,
                       answers_seen = $4 WHERE id = $1""", run_id, summary, decisions_seen, answers_seen)
        return {"run_id": run_id, **summary}
    except Exception as exc:
        await conn.execute("UPDATE census_runs SET state = 'failed', finished_at = now(), error = $2 "
                           "WHERE id = $1 AND state = 'running'", run_id, f"{type(exc).__name__}: {exc}"[:2000])
        raise


async def _apply(conn: asyncpg.Connection, prop: str, snapshot: dict, graph: IdentityGraph, index: dict, asked: set,
                 solved: list[int], threshold: float, settings: Settings, run_id: int) -> dict:
    """Under the property lock: re-read the nodes, plan against what they are now, move, and ask."""
    ids = [r["id"] for r in snapshot["nodes"]]
    fresh = {r["id"]: r for r in await conn.fetch(
        """SELECT id, property, state, individual_id, decided_by, result, image_sha256, site, cls, captured_at
           FROM detections WHERE id = ANY($1::uuid[]) FOR UPDATE""", ids)}
    current = []
    graph.anchors = {}
    for i, det_id in enumerate(ids):
        r = fresh[det_id]
        placed = r["state"] in PLACED
        current.append(r["individual_id"] if placed else None)
        if r["decided_by"] == "human" and placed:
            graph.anchors[i] = r["individual_id"]
    graph.resolve()  # against the anchors as they are now: a person may have placed a detection meanwhile
    # and answers given meanwhile are not asked again
    for r in await conn.fetch("SELECT a, b FROM identity_answers WHERE property = $1 AND NOT undone", prop):
        if r["a"] in index and r["b"] in index:
            asked.add((min(index[r["a"]], index[r["b"]]), max(index[r["a"]], index[r["b"]])))
    units = units_of(graph)
    decided = plan(graph, current, solved, threshold, units)
    change = Change(conn, ACTOR, settings.exemplars_per_individual, founder=ACTOR)
    change.property = prop  # the lock is held: taken above
    founded: dict[int, int] = {}
    moves = []
    for move in decided.applied:
        target = move.after
        for i in move.nodes:
            det = fresh[ids[i]]
            if isinstance(target, NewIndividual):
                first = target.cluster not in founded
                if first:
                    founded[target.cluster] = await change.found(det["site"], sex_of(det["cls"]), det["captured_at"])
                individual, state = founded[target.cluster], "new" if first else "assigned"
            else:
                individual, state = target, "assigned"
            if det["individual_id"] == individual and det["state"] in PLACED:
                continue
            moves.append((det, individual, state, "recluster"))
    await change.move_many(moves)
    moved = len(moves)
    # an individual is merged only when nothing of it is left (fusion may have placed a detection in it since
    # the snapshot: then it stays, with that detection)
    emptied = await conn.fetch(
        """SELECT i.* FROM individuals i WHERE i.id = ANY($1::bigint[]) AND i.merged_into IS NULL
           AND NOT EXISTS (SELECT 1 FROM detections d WHERE d.individual_id = i.id AND d.state = ANY($2::text[]))
           ORDER BY i.id FOR UPDATE""", list(decided.merged), list(PLACED))
    await change.merge_many(list(emptied), [decided.merged[r["id"]] for r in emptied])
    audit = None
    if change.after["detections"] or change.after["individuals"]:
        change.after["founded_individuals"] = sorted(founded.values())  # ("founded": one, a person's split or new)
        audit = (await change.finish("recluster", f"census run {run_id}"))["audit_id"]
    # the census as applied, with the founded individuals' ids, asks its questions
    labels = [None] * graph.n
    for i, target in enumerate(decided.target):
        labels[i] = founded.get(target.cluster) if isinstance(target, NewIndividual) else target
    ranked = questions(graph, labels, asked, units=units, reviewer_error=settings.census_reviewer_error)
    left = stopping(ranked, settings.census_stop_flip)
    await conn.execute("UPDATE census_questions SET state = 'stale' WHERE property = $1 AND state = 'open'", prop)
    kept = ranked[:settings.census_questions_kept]
    await conn.executemany(
        """INSERT INTO census_questions (property, run_id, a, b, kind, rank, flip, moves, priority, log_odds,
                                         side_a, side_b)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)""",
        [(prop, run_id, min(ids[q.a], ids[q.b]), max(ids[q.a], ids[q.b]), q.kind, rank, q.flip, q.moves, q.priority,
          max(-50.0, min(50.0, q.log_odds)), *sides(q, ids, labels)) for rank, q in enumerate(kept)])
    individuals = len({x for x in labels if x is not None})
    return {"moved": moved, "deferred": len(decided.deferred), "merged": len(emptied), "founded": len(founded),
            "individuals_before": len({x for x in current if x is not None}), "individuals_after": individuals,
            "in_review": sum(1 for x in labels if x is None), "audit_id": audit,
            "questions": len(kept), **left}
