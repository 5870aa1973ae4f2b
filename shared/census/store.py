"""The identity graph's rows, read and requested the same way by the census job and the API (which checks a
person's answer against the hard rules before it is taken)."""
from __future__ import annotations

import math
from collections import defaultdict
from uuid import UUID

import asyncpg

from shared.calibrated import FusionModel, logit
from shared.census.graph import IdentityGraph, bridges
from shared.census.hubness import LocalScale
from shared.identity import PLACED

IN_CENSUS = ("assigned", "new", "review")  # the detections that are nodes of the graph


def run_lock_key(prop: str) -> str:
    """The session advisory lock a census process holds while it re-clusters the property (hashed with 8)."""
    return f"census:{prop}"


async def runner_alive(conn: asyncpg.Connection, prop: str) -> bool:
    """Whether some census process holds the property's run lock now (a run left `running` without one died)."""
    free = await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 8))", run_lock_key(prop))
    if free:
        await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 8))", run_lock_key(prop))
    return not free


async def request_run(conn: asyncpg.Connection, prop: str, requested_by: str) -> int:
    """A run of the property for the census service to do: the pending one, when one is already waiting or
    running; a run left `running` by a process that died is marked `abandoned` (nothing of it was applied)
    and a new one is requested."""
    pending = await conn.fetchrow(
        "SELECT id, state FROM census_runs WHERE property = $1 AND state IN ('requested', 'running')", prop)
    if pending is not None and pending["state"] == "running" and not await runner_alive(conn, prop):
        await conn.execute("UPDATE census_runs SET state = 'abandoned', finished_at = now() "
                           "WHERE id = $1 AND state = 'running'", pending["id"])
        pending = None
    if pending is not None:
        return pending["id"]
    return await conn.fetchval(
        """INSERT INTO census_runs (property, requested_by) VALUES ($1, $2)
           ON CONFLICT (property) WHERE state IN ('requested', 'running')
           DO UPDATE SET requested_by = census_runs.requested_by RETURNING id""", prop, requested_by[:100])


def edge_probability(model: FusionModel | None, components: dict, stored: float | None) -> float | None:
    """P(same) of an edge's raw component scores by `model` (None: the probability stored with it)."""
    if model is None:
        return stored
    raw = {n: float(v) for n, v in components.items() if n in model.weights and v is not None}
    if not raw:
        return stored
    return float(model.probability(model.calibrate(raw)))


async def snapshot(conn: asyncpg.Connection, prop: str, with_edges: bool = True) -> dict:
    """The property's graph as it stands: nodes, edges, answers, and the hard rules' raw material."""
    nodes = await conn.fetch(
        """SELECT id, individual_id, state, decided_by, sighting, image_sha256 FROM detections
           WHERE property = $1 AND state IN ('assigned', 'new', 'review') ORDER BY created_at, id""", prop)
    edges = await conn.fetch("SELECT a, b, components, probability FROM identity_edges WHERE property = $1", prop) \
        if with_edges else []
    answers = await conn.fetch(
        "SELECT id, a, b, answer FROM identity_answers WHERE property = $1 AND NOT undone ORDER BY id", prop)
    return {"nodes": nodes, "edges": edges, "answers": answers}


def uncorroborated(nodes: list, latest: dict[tuple[int, int], tuple[str, int]]) -> set[tuple[int, int]]:
    """The pairs whose `same` answer no other answer corroborates: between the two sightings it joins (a
    detection without one stands alone) no other chain of `same` answers runs, so it is a bridge of the
    graph of sightings and `same` answers (Graph ID's positive redundancy of one: a second, independent
    `same` confirms a merge)."""
    def unit(i: int):
        return ("sighting", nodes[i]["sighting"]) if nodes[i]["sighting"] is not None else ("node", i)
    same = [pair for pair, (answer, _) in latest.items() if answer == "same"]
    alone = bridges([(unit(i), unit(j)) for i, j in same])
    return {same[k] for k in alone}


def build_graph(snapshot: dict, model: FusionModel | None, scale: LocalScale | None = None
                ) -> tuple[IdentityGraph, dict[UUID, int], set, list]:
    """(graph, node index, pairs never to ask again, labelled pairs for the refit) of a snapshot; `scale`: the
    local scaling of the body's scores (`shared.census.hubness`)."""
    nodes = snapshot["nodes"]
    index = {r["id"]: i for i, r in enumerate(nodes)}
    graph = IdentityGraph(len(nodes))
    by_sighting: dict = defaultdict(list)
    by_frame: dict = defaultdict(list)
    for i, r in enumerate(nodes):
        if r["sighting"] is not None:
            by_sighting[r["sighting"]].append(i)
        by_frame[r["image_sha256"]].append(i)
        if r["decided_by"] == "human" and r["individual_id"] is not None and r["state"] in PLACED:
            graph.anchors[i] = r["individual_id"]
    latest: dict[tuple[int, int], tuple[str, int]] = {}
    for r in snapshot["answers"]:
        if r["a"] in index and r["b"] in index:
            i, j = index[r["a"]], index[r["b"]]
            latest[(min(i, j), max(i, j))] = (r["answer"], r["id"])  # the newest answer about a pair counts
    unconfirmed = uncorroborated(nodes, latest)
    # the rules, strongest first (after the anchors): people's answers, newest first; two animals of one
    # frame; a sighting's frames; last, the `same` answers nothing corroborates yet, so that one wrong answer
    # (people are wrong sometimes) gives way to a later `different` about the same two sides
    tail = []
    for (i, j), (answer, answer_id) in sorted(latest.items(), key=lambda kv: -kv[1][1]):
        if answer in ("same", "different"):
            rule = ("must" if answer == "same" else "cannot", i, j, f"answer {answer_id} ({answer})")
            (tail if (i, j) in unconfirmed else graph.rules).append(rule)
    for members in by_frame.values():
        graph.rules += [("cannot", a, b, f"one frame ({nodes[a]['image_sha256'][:12]})")
                        for n, a in enumerate(members) for b in members[n + 1:]]
    for key, members in by_sighting.items():
        graph.rules += [("must", members[0], m, f"sighting {key}") for m in members[1:]]
    graph.rules += tail
    graph.tentative = unconfirmed
    graph.dropped = graph.resolve()
    asked = set(latest)
    latest = {key: answer for key, (answer, _) in latest.items()}
    for r in snapshot["edges"]:
        i, j = index.get(r["a"]), index.get(r["b"])
        if i is None or j is None:
            continue
        key = (min(i, j), max(i, j))
        if latest.get(key) == "cannot-tell":
            continue  # a person could not tell: the pair says nothing either way
        components = r["components"] if scale is None else scale.applied(r["components"], r["a"], r["b"])
        p = edge_probability(model, components, r["probability"])
        if p is not None and math.isfinite(p):
            graph.add_edge(i, j, float(logit(p)))
    return graph, index, asked, list(latest.items())


async def remember_undone_run(conn: asyncpg.Connection, entry: asyncpg.Record, actor: str, undo_audit: int) -> int:
    """A person undid a census run's changes (`entry`, its audit entry): record what that says as answers, so
    that the next run does not redo them. For each group of detections the run moved together from B (an
    individual, or review) to A: `different` between them and A's likeliest other detection (A kept others);
    `same` with B's likeliest detection when A held nothing else (the run had split them out of B). Each answer
    is the undoing person's, on the undo's audit entry (undoing the undo takes them back too). Returns how many."""
    groups: dict[tuple, list[UUID]] = defaultdict(list)
    for key, after in entry["after"]["detections"].items():
        before = entry["before"]["detections"][key]
        groups[(before["individual_id"], after["individual_id"])].append(UUID(key))
    taken = 0
    for (old, new), moved in sorted(groups.items(), key=lambda kv: str(kv[0])):
        for individual, answer in ((new, "different"), (old, "same")):
            if individual is None:
                continue
            other = await conn.fetchval(
                """SELECT d.id FROM detections d
                   LEFT JOIN identity_edges e ON (e.a = d.id AND e.b = $2) OR (e.b = d.id AND e.a = $2)
                   WHERE d.individual_id = $1 AND d.state = ANY($3::text[]) AND NOT (d.id = ANY($4::uuid[]))
                   ORDER BY e.probability DESC NULLS LAST, d.created_at, d.id LIMIT 1""",
                individual, moved[0], list(PLACED), moved)
            if other is None:
                continue  # A was founded by the run (nothing else in it): B's `same` below says it
            a, b = sorted((moved[0], other))
            await conn.execute(
                """INSERT INTO identity_answers (property, a, b, answer, actor, reason, audit_id)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)""", entry["property"], a, b, answer, actor,
                f"undo of census entry {entry['id']}", undo_audit)
            taken += 1
            break
    return taken
