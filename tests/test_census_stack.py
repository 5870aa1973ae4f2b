"""The census on the real stack: re-clustering, questions and answers, and their faults.

A calibration is fitted the way `deer-reid eval` fits one, on real photos of identities the census tests never
upload (their embeddings as the running body service stored them), and installed for this module only.
"""
from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import tempfile
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from deer_reid.evaluation import calibration as cal
from deer_reid.evaluation.census import with_comment
from deer_reid.ingest import Item, wait_terminal
from tests.stack_helpers import WAIT_S, ingest, register, until


def herd(nyala_rows, nyala_paths, identities: list[str], per: int) -> list[tuple[Item, str]]:
    """`per` photos of each identity, each of another encounter (no two are one sighting), as byte-different
    copies (a JPEG comment, the same pixels): an image is content-addressed, and these must not be the
    detections of another test module that uploads the same photo."""
    out, seen = [], {}
    for row, path in zip(nyala_rows, nyala_paths):
        taken = seen.setdefault(row["identity"], set())
        if row["identity"] in identities and len(taken) < per and row["encounter"] not in taken:
            taken.add(row["encounter"])
            data = with_comment(path.read_bytes(), b"deer-reid census tests")
            out.append((Item(str(path), f"{row['identity']}-{path.name}", data), row["identity"]))
    assert identities and len(out) == len(identities) * per, (identities, len(out))
    return out


def identities_with(nyala_rows, encounters: int, skip: int, count: int) -> list[str]:
    """`count` identities with at least `encounters` encounters, after the first `skip` of them: each test of
    this module takes its own (an image uploaded twice is one detection, whatever the property)."""
    by: dict[str, set] = {}
    for r in nyala_rows:
        by.setdefault(r["identity"], set()).add(r["encounter"])
    eligible = sorted((i for i, e in by.items() if len(e) >= encounters), key=int)
    return eligible[skip:skip + count]


@pytest.fixture(scope="module")
async def census_calibration(stack, nyala_rows, nyala_paths):
    """A calibration fitted on 8 identities of their own, installed for this module's tests."""
    import asyncpg

    from shared.db import _init_connection

    fit = herd(nyala_rows, nyala_paths, identities_with(nyala_rows, 4, 0, 8), 3)
    ids = await ingest(stack, [p for p, _ in fit], "census-fit-cam", prop="census-fit")
    await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False, headers=stack.auth)
    conn = await asyncpg.connect(stack.dsn)
    await _init_connection(conn)
    rows = {r["detection_id"]: r for r in await conn.fetch(
        "SELECT detection_id, model, version, vec FROM embeddings WHERE detection_id = ANY($1::uuid[])", ids)}
    vecs = np.stack([np.asarray(rows[uuid.UUID(i)]["vec"].to_numpy(), dtype=np.float64) for i in ids])
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    model, version = rows[next(iter(rows))]["model"], rows[next(iter(rows))]["version"]
    labels = [ident for _, ident in fit]
    fusion = cal.fit_fusion({f"body:{model}": vecs @ vecs.T}, list(range(len(ids))), labels,
                            [str(i) for i in range(len(ids))])
    artifact = cal.write_artifact(Path(tempfile.mkdtemp()) / "c.json", versions={model: version}, fusion=fusion,
                                  chosen=cal.OperatingPoint(0.8, 0.6, {}), met_target=True, target=0.02,
                                  fit={"identity_names": sorted(set(labels))}, held_out={})
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth) as client:
        r = await client.post("/v1/calibration", json=artifact)
        assert r.status_code == 201, r.text
    try:
        yield {"model": model, "version": version}
    finally:
        await conn.execute("UPDATE calibrations SET active = false")
        await conn.close()


async def recluster(client: httpx.AsyncClient, prop: str, timeout: float = 120.0) -> dict:
    r = await client.post(f"/v1/census/{prop}/recluster")
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]

    async def the_run() -> dict:
        return (await client.get(f"/v1/census/runs/{run_id}")).json()

    run = await until(the_run, lambda run: run["state"] in ("done", "failed", "abandoned"), timeout=timeout,
                      what=f"census run {run_id} to finish")
    assert run["state"] == "done", run
    return run


async def test_recluster_questions_answers_and_their_rules_on_the_real_stack(stack, db, census_calibration,
                                                                             nyala_rows, nyala_paths):
    prop = "census-q"
    photos = herd(nyala_rows, nyala_paths, identities_with(nyala_rows, 4, 8, 5), 3)
    truth = {}
    ids = await ingest(stack, [p for p, _ in photos], "census-q-cam", prop=prop)
    truth = dict(zip(ids, (ident for _, ident in photos)))
    await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False, headers=stack.auth)
    fusion_decided = {r["detection_id"]: r["n"] for r in await db.fetch(
        "SELECT detection_id, count(*) AS n FROM decisions WHERE detection_id = ANY($1::uuid[]) "
        "AND decided_by = 'fusion' GROUP BY 1", ids)}
    assert len(fusion_decided) == len(ids)
    # fusion wrote the graph's edges of what it scored
    assert await db.fetchval("SELECT count(*) FROM identity_edges WHERE property = $1 AND source = 'fusion'", prop) > 0

    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth, timeout=60) as client:
        run = await recluster(client, prop)
        summary = run["summary"]
        assert summary["nodes"] == len(ids) and summary["edges"] > 0 and summary["calibration"]["scope"] == "global"
        # the body's nearest neighbours among all detections, not only the exemplars fusion searched
        assert await db.fetchval("SELECT count(*) FROM identity_edges WHERE property = $1 AND source = 'census'",
                                 prop) > 0, (summary, await db.fetch("SELECT source, count(*) FROM identity_edges "
                                                                     "WHERE property = $1 GROUP BY 1", prop))
        placed = await db.fetch("SELECT id, individual_id, decided_by FROM detections WHERE id = ANY($1::uuid[])", ids)
        if summary["moved"]:
            entry = await db.fetchrow("SELECT actor, action, after FROM audit_log WHERE id = $1", summary["audit_id"])
            assert (entry["actor"], entry["action"]) == ("census", "recluster")
            moved = [r for r in placed if r["decided_by"] == "recluster"]
            assert len(moved) == summary["moved"] == len(entry["after"]["detections"])
        # every individual's sightings add up after the moves; none lives on merged
        assert await db.fetchval(
            """SELECT count(*) FROM individuals i WHERE i.property = $1 AND i.sightings <>
                   (SELECT count(*) FROM detections d
                    WHERE d.individual_id = i.id AND d.state IN ('assigned', 'new'))""", prop) == 0
        assert await db.fetchval(
            """SELECT count(*) FROM detections d JOIN individuals i ON i.id = d.individual_id
               WHERE d.property = $1 AND i.merged_into IS NOT NULL AND d.state IN ('assigned', 'new')""", prop) == 0
        standing = (await client.get(f"/v1/census/{prop}")).json()
        assert standing["last_run"]["id"] == run["id"] and standing["open_questions"] == summary["questions"]

        # question mode: the best open question, answered by the labels
        q = (await client.get(f"/v1/census/{prop}/questions/next")).json()["question"]
        assert q is not None, summary
        assert q["rank"] == 0 and q["why"]["flip"] > 0 and q["a"]["photo"].endswith("/crop")
        same = truth[q["a"]["detection"]] == truth[q["b"]["detection"]]
        # two people answer at once: one wins, the other is told and handed the next question
        answers = await asyncio.gather(*(client.post(f"/v1/census/questions/{q['id']}/answer",
                                                     json={"answer": "same" if same else "different"})
                                         for _ in range(2)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [200, 409], [r.text for r in answers]
        lost = next(r for r in answers if r.status_code == 409).json()["detail"]
        assert "answered" in lost["error"] and "next" in lost
        won = next(r for r in answers if r.status_code == 200).json()
        row = await db.fetchrow("SELECT answer, actor, undone, audit_id FROM identity_answers WHERE id = $1",
                                won["answer"]["id"])
        assert row["answer"] == ("same" if same else "different") and not row["undone"]
        assert await db.fetchval("SELECT action FROM audit_log WHERE id = $1", row["audit_id"]) == "census:answer"

        # the answer is a hard rule for the next run; a person's placement is never moved by the machine
        person = next(r for r in placed if str(r["id"]) not in (q["a"]["detection"], q["b"]["detection"]))
        r = await client.post(f"/v1/detections/{person['id']}/reassign", json={"action": "new", "reason": "test"})
        assert r.status_code == 200, r.text
        mine = (await db.fetchrow("SELECT individual_id FROM detections WHERE id = $1", person["id"]))["individual_id"]
        run2 = await recluster(client, prop)
        after = {str(r["id"]): r for r in await db.fetch(
            "SELECT id, individual_id, decided_by FROM detections WHERE id = ANY($1::uuid[])", ids)}
        a, b = after[q["a"]["detection"]], after[q["b"]["detection"]]
        assert (a["individual_id"] == b["individual_id"]) == same, run2["summary"]
        assert (after[str(person["id"])]["individual_id"], after[str(person["id"])]["decided_by"]) == (mine, "human")

        # undo the answer: it stops counting
        r = await client.post(f"/v1/census/answers/{won['answer']['id']}/undo", json={"reason": "test"})
        assert r.status_code == 200, r.text
        assert await db.fetchval("SELECT undone FROM identity_answers WHERE id = $1", won["answer"]["id"]) is True

        # answers that contradict the hard rules, on questions made for them (a stale page could show them)
        two = await _two_animals_of_one_frame(stack, db, prop, nyala_paths)
        frame_q = await _question(db, prop, run2["id"], *two)
        r = await client.post(f"/v1/census/questions/{frame_q}/answer", json={"answer": "same"})
        assert r.status_code == 409 and "one frame" in r.json()["detail"]["error"], r.text
        assert await db.fetchval("SELECT state FROM census_questions WHERE id = $1", frame_q) == "open"
        # a detection that is no longer in the census
        gone = ids[-1]
        await db.execute("UPDATE detections SET state = 'failed', state_reason = 'test: gone' WHERE id = $1", gone)
        gone_q = await _question(db, prop, run2["id"], gone, ids[0])
        r = await client.post(f"/v1/census/questions/{gone_q}/answer", json={"answer": "different"})
        assert r.status_code == 409 and "no longer in the census" in r.json()["detail"]["error"], r.text
        # an unknown question, and a malformed answer
        assert (await client.post("/v1/census/questions/999999999/answer", json={"answer": "same"})).status_code == 404
        assert (await client.post(f"/v1/census/questions/{gone_q}/answer", json={"answer": "maybe"})).status_code == 422
        assert (await client.get("/v1/census/no-such-property")).status_code == 404

        # the answers teach the machine: labelled pairs of the property's own animals refit its calibration
        pairs = [(str(r["a"]), str(r["b"])) for r in await db.fetch(
            "SELECT a, b FROM identity_edges WHERE property = $1 AND a = ANY($2::uuid[]) AND b = ANY($2::uuid[]) "
            "ORDER BY a, b", prop, ids[:-1])]  # pairs the machine scored: their raw scores are what is refitted
        same_pairs = [p for p in pairs if truth[p[0]] == truth[p[1]]][:3]
        other_pairs = [p for p in pairs if truth[p[0]] != truth[p[1]]][:3]
        for a, b in same_pairs + other_pairs:
            qid = await _question(db, prop, run2["id"], a, b)
            r = await client.post(f"/v1/census/questions/{qid}/answer",
                                  json={"answer": "same" if truth[a] == truth[b] else "different"})
            assert r.status_code in (200, 409), r.text  # 409: the pair is already settled by a rule
        run3 = await recluster(client, prop)
        refit = run3["summary"]["refit"]
        assert refit is not None and refit["answers"] >= 6 and refit["before"]["pairs"] == refit["answers"], refit
        assert refit["form"] == "scale", refit  # the default: the fused log-odds in force rescaled
        own = await db.fetchval("SELECT id FROM calibrations WHERE active AND property = $1", prop)
        assert (own is not None) == bool(refit["accepted"]) == bool(refit.get("calibration_id")), refit
        if own is not None:
            standing = (await client.get(f"/v1/census/{prop}")).json()
            assert standing["calibration"]["id"] == own and standing["calibration"]["reliability_after"]
            assert standing["calibration"]["form"] == "scale" and standing["calibration"]["rescaled"]["scale"] >= 0
            r = await client.delete(f"/v1/census/{prop}/calibration")
            assert r.status_code == 200 and r.json()["deactivated"] == [own]
        assert (await client.delete(f"/v1/census/{prop}/calibration")).status_code == 404

        # the machine's change is undoable like a person's
        if run2["summary"]["audit_id"]:
            r = await client.post(f"/v1/audit/{run2['summary']['audit_id']}/undo", json={"reason": "test"})
            assert r.status_code in (200, 409), r.text  # 409 only if a later change touched the same detections


async def _two_animals_of_one_frame(stack, db, prop, nyala_paths) -> tuple[str, str]:
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth, timeout=60) as client:
        boxes = [{"box": [0, 0, 200, 200], "cls": "doe"}, {"box": [180, 100, 400, 340], "cls": "doe"}]
        photo = with_comment(nyala_paths[700].read_bytes(), b"two")  # bytes of its own: a new image
        r = await client.post("/v1/uploads", data={"site": "census-q-cam", "detections": json.dumps(boxes),
                                                   "fallback_captured_at": "2025-11-02T06:00:00Z"},
                              files=[("files", ("two.jpg", photo, "image/jpeg"))])
        assert r.status_code == 201, r.text
    det = [d["id"] for d in r.json()["images"][0]["detections"]]
    await wait_terminal(stack.api_url, det, timeout=WAIT_S, progress=False, headers=stack.auth)
    return det[0], det[1]


async def _question(db, prop: str, run_id: int, a, b) -> int:
    a, b = sorted((uuid.UUID(str(a)), uuid.UUID(str(b))))
    return await db.fetchval(
        """INSERT INTO census_questions (property, run_id, a, b, kind, rank, flip, moves, priority, log_odds,
                                         side_a, side_b)
           VALUES ($1, $2, $3, $4, 'merge', 0, 0.5, 1, 0.5, 0, $5, $6) RETURNING id""",
        prop, run_id, a, b, f"test:{a}", f"test:{b}")


async def _upload_sighting(client: httpx.AsyncClient, site: str, key: str, photos: list[Path]) -> list[str]:
    """Both flanks of one encounter as one sighting (single-animal frames sharing the uploader's key)."""
    ids = []
    for path in photos:
        data = with_comment(path.read_bytes(), b"deer-reid census slip test")
        r = await client.post("/v1/uploads", data={"site": site, "camera": "cam1", "sighting": key, "cls": "doe",
                                                   "fallback_captured_at": "2025-11-03T06:00:00Z"},
                              files=[("files", (path.name, data, "image/jpeg"))])
        assert r.status_code == 201, r.text
        ids += [d["id"] for d in r.json()["images"][0]["detections"]]
    return ids


async def test_a_slip_is_verified_on_another_pair_and_undone_by_the_answer_there(stack, db, census_calibration,
                                                                                 nyala_rows, nyala_paths):
    """A person's `same` for two animals (people are wrong sometimes) holds until verified: the census asks
    once more on another pair of the two sightings, and a `different` there (refused before: it contradicted a
    person's `same`) takes the slip back."""
    prop = site = "census-slip"
    await register(stack, site, prop)
    sightings = []
    for identity in identities_with(nyala_rows, 4, 33, 2):
        encounter = next(r["encounter"] for r in nyala_rows if r["identity"] == identity and sum(
            1 for x in nyala_rows if x["identity"] == identity and x["encounter"] == r["encounter"]) == 2)
        sightings.append([p for r, p in zip(nyala_rows, nyala_paths)
                          if r["identity"] == identity and r["encounter"] == encounter])
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth, timeout=60) as client:
        (a1, a2), (b1, b2) = [await _upload_sighting(client, site, f"slip-{k}", photos)
                              for k, photos in enumerate(sightings)]
        await wait_terminal(stack.api_url, [a1, a2, b1, b2], timeout=WAIT_S, progress=False, headers=stack.auth)
        assert len({r["sighting"] for r in await db.fetch(
            "SELECT sighting FROM detections WHERE id = ANY($1::uuid[])", [a1, a2, b1, b2])}) == 2
        run = await recluster(client, prop)

        def placed():
            return db.fetch("SELECT id, individual_id FROM detections WHERE id = ANY($1::uuid[])", [a1, a2, b1, b2])
        slip = await _question(db, prop, run["id"], a1, b1)
        r = await client.post(f"/v1/census/questions/{slip}/answer", json={"answer": "same", "reason": "a slip"})
        assert r.status_code == 200, r.text
        run = await recluster(client, prop)
        assert len({r["individual_id"] for r in await placed()}) == 1, run["summary"]  # the answer holds meanwhile
        # the next question verifies it on another pair of the two sightings, as a split question
        q = (await client.get(f"/v1/census/{prop}/questions/next")).json()["question"]
        assert q is not None and q["kind"] == "split", run["summary"]
        pair = {q["a"]["detection"], q["b"]["detection"]}
        assert pair != {a1, b1} and len(pair & {a1, a2}) == len(pair & {b1, b2}) == 1, (pair, a1, a2, b1, b2)
        # the machine saw less chance of a match than not: a slip is likelier than the reviewer's error rate
        assert q["why"]["flip"] > 0.02
        r = await client.post(f"/v1/census/questions/{q['id']}/answer", json={"answer": "different"})
        assert r.status_code == 200, r.text
        run = await recluster(client, prop)
        now = {str(r["id"]): r["individual_id"] for r in await placed()}
        assert now[a1] == now[a2] != now[b1] == now[b2], (now, run["summary"])
        slip_answer = await db.fetchval("SELECT id FROM identity_answers WHERE question_id = $1", slip)
        assert f"answer {slip_answer} (same)" in run["summary"]["rules_dropped"]
        # a `different` about a pair a sighting joins is still refused
        inside = await _question(db, prop, run["id"], a1, a2)
        r = await client.post(f"/v1/census/questions/{inside}/answer", json={"answer": "different"})
        assert r.status_code == 409 and "sighting" in r.json()["detail"]["error"], r.text


async def test_a_census_run_a_person_undid_is_not_redone_and_undoing_the_undo_brings_it_back(
        stack, db, census_calibration, nyala_rows, nyala_paths):
    prop = "census-undo"
    photos = herd(nyala_rows, nyala_paths, identities_with(nyala_rows, 4, 35, 2), 1)
    ids = await ingest(stack, [p for p, _ in photos], "census-undo-cam", prop=prop)
    await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False, headers=stack.auth)
    a, b = sorted(ids, key=uuid.UUID)
    # the machine all but sure the two are one animal (they are not): the census joins them
    await db.execute(
        """INSERT INTO identity_edges (property, a, b, components, probability, source)
           VALUES ($1, $2, $3, $4, 0.999, 'census')
           ON CONFLICT (a, b) DO UPDATE SET components = EXCLUDED.components, probability = 0.999""",
        prop, uuid.UUID(a), uuid.UUID(b), {f"body:{census_calibration['model']}": 0.999})

    async def together() -> bool:
        rows = await db.fetch("SELECT individual_id FROM detections WHERE id = ANY($1::uuid[])", [a, b])
        return rows[0]["individual_id"] is not None and rows[0]["individual_id"] == rows[1]["individual_id"]

    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth, timeout=60) as client:
        run = await recluster(client, prop)
        assert await together() and run["summary"]["audit_id"], run["summary"]
        # a person takes the machine's change back: remembered as their `different`
        r = await client.post(f"/v1/audit/{run['summary']['audit_id']}/undo", json={"reason": "two deer"})
        assert r.status_code == 200 and r.json()["answers"] == 1, r.text
        undo = r.json()["audit_id"]
        answer = await db.fetchrow("SELECT a, b, answer, actor, undone, audit_id FROM identity_answers "
                                   "WHERE property = $1", prop)
        assert (answer["answer"], answer["undone"], answer["audit_id"]) == ("different", False, undo)
        assert {str(answer["a"]), str(answer["b"])} == {a, b} and answer["actor"] != "census"
        run = await recluster(client, prop)
        assert not await together(), run["summary"]  # the next run does not redo it
        # undoing the undo: the answer stops counting, and the evidence joins them again
        r = await client.post(f"/v1/audit/{undo}/undo", json={"reason": "one deer after all"})
        assert r.status_code == 200, r.text
        assert await db.fetchval("SELECT undone FROM identity_answers WHERE property = $1", prop) is True
        await recluster(client, prop)
        assert await together()


async def test_kill_9_mid_run_applies_nothing_and_the_next_run_finishes(stack, db, census_calibration, nyala_rows,
                                                                       nyala_paths):
    import asyncpg

    prop = "census-kill"
    photos = herd(nyala_rows, nyala_paths, identities_with(nyala_rows, 4, 13, 4), 3)
    ids = await ingest(stack, [p for p, _ in photos], "census-kill-cam", prop=prop)
    await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False, headers=stack.auth)
    audit_before = await db.fetchval("SELECT coalesce(max(id), 0) FROM audit_log")
    # hold the property's identity lock: the run stops inside its one transaction, at the apply
    holder = await asyncpg.connect(stack.dsn)
    tx = holder.transaction()
    await tx.start()
    await holder.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", prop)
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth, timeout=60) as client:
        run_id = (await client.post(f"/v1/census/{prop}/recluster")).json()["run_id"]
        await until(lambda: db.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"),
                    lambda n: n >= 1, what="the run to wait at the lock")
        pid = stack.children["census"].process.pid
        os.kill(pid, signal.SIGKILL)
        await until(lambda: asyncio.to_thread(lambda: stack.children["census"].process.pid != pid), bool,
                    what="the supervisor to restart the census service")
        await tx.rollback()
        await holder.close()
        assert await db.fetchval("SELECT state FROM census_runs WHERE id = $1", run_id) == "running"
        assert await db.fetchval("SELECT coalesce(max(id), 0) FROM audit_log WHERE actor = 'census' AND id > $1",
                                 audit_before) == 0
        assert await db.fetchval("SELECT count(*) FROM detections WHERE id = ANY($1::uuid[]) "
                                 "AND decided_by = 'recluster'", ids) == 0
        # the restarted service finishes the work: the dead run is abandoned, a new one is done
        run = await recluster(client, prop)
        assert run["id"] != run_id and run["state"] == "done"
        assert await db.fetchval("SELECT state FROM census_runs WHERE id = $1", run_id) == "abandoned"
        assert run["summary"]["nodes"] == len(ids)


async def test_reclustering_racing_fusion_loses_nothing_and_decides_nothing_twice(stack, db, census_calibration,
                                                                                 nyala_rows, nyala_paths, tmp_path):
    prop = "census-race"
    photos = herd(nyala_rows, nyala_paths, identities_with(nyala_rows, 4, 17, 6), 4)
    await register(stack, "census-race-cam", prop)
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth, timeout=60) as client:
        first = await ingest(stack, [p for p, _ in photos[:8]], "census-race-cam", prop=prop)
        await wait_terminal(stack.api_url, first, timeout=WAIT_S, progress=False, headers=stack.auth)
        run = await recluster(client, prop)
        # a person's answer before the race: two photos of one animal are the same (asked on a pair of our choosing)
        qid = await _question(db, prop, run["id"], first[0], first[1])
        assert photos[0][1] == photos[1][1]
        r = await client.post(f"/v1/census/questions/{qid}/answer", json={"answer": "same", "reason": "race"})
        assert r.status_code == 200, r.text
        answer_id = r.json()["answer"]["id"]
        upload = asyncio.create_task(ingest(stack, [p for p, _ in photos[8:]], "census-race-cam", prop=prop))
        runs = 0
        while not upload.done() or runs < 2:
            await recluster(client, prop)
            runs += 1
        rest = await upload
        ids = first + rest
        await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False, headers=stack.auth)
        await recluster(client, prop)
    rows = await db.fetch("SELECT id, state FROM detections WHERE id = ANY($1::uuid[])", ids)
    assert len(rows) == len(ids) and all(r["state"] in ("assigned", "new", "review") for r in rows)
    # the person's answer is intact and holds: the two detections are one individual
    kept = await db.fetchrow("SELECT a, b, answer, undone FROM identity_answers WHERE id = $1", answer_id)
    assert (kept["answer"], kept["undone"]) == ("same", False)
    assert len({r["individual_id"] for r in await db.fetch(
        "SELECT individual_id FROM detections WHERE id IN ($1, $2)", kept["a"], kept["b"])}) == 1
    fusion = await db.fetch("SELECT detection_id, count(*) AS n FROM decisions WHERE detection_id = ANY($1::uuid[]) "
                            "AND decided_by = 'fusion' GROUP BY 1", ids)
    assert len(fusion) == len(ids) and all(r["n"] == 1 for r in fusion), "a detection was decided twice by fusion"
    assert await db.fetchval(
        """SELECT count(*) FROM individuals i WHERE i.property = $1 AND i.sightings <>
               (SELECT count(*) FROM detections d WHERE d.individual_id = i.id AND d.state IN ('assigned', 'new'))""",
        prop) == 0
    assert await db.fetchval(
        """SELECT count(*) FROM detections d JOIN individuals i ON i.id = d.individual_id
           WHERE d.property = $1 AND i.merged_into IS NOT NULL""", prop) == 0
    # the answered pair is a labelled pair of the property's own animals in `export-labels`
    from deer_reid.training.labels import export_labels

    report = await export_labels(stack.dsn, tmp_path / "labels", prop=prop)
    assert report["answered_pairs"] == 1
    with open(tmp_path / "labels" / "pairs.csv") as f:
        (pair,) = list(csv.DictReader(f))
    assert {pair["a"], pair["b"]} == {str(kept["a"]), str(kept["b"])} and pair["answer"] == "same"
    assert (tmp_path / "labels" / pair["a_path"]).exists() and (tmp_path / "labels" / pair["b_path"]).exists()


async def test_question_mode_in_a_real_browser_answers_five_by_key_and_undoes(stack, db, census_calibration, browser,
                                                                             nyala_rows, nyala_paths):
    from urllib.parse import quote

    from selenium.webdriver.common.by import By

    from tests.test_page import shot, shown

    prop = "census-page"
    photos = herd(nyala_rows, nyala_paths, identities_with(nyala_rows, 4, 23, 6), 3)
    ids = await ingest(stack, [p for p, _ in photos], "census-page-cam", prop=prop)
    truth = dict(zip(ids, (ident for _, ident in photos)))
    await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False, headers=stack.auth)
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth, timeout=60) as client:
        run = await recluster(client, prop)
    assert run["summary"]["questions"] >= 5, run["summary"]

    browser.get(f"{stack.api_url}/ui/login?next={quote(f'/ui/census?property={prop}')}#key={quote(stack.admin_key)}")
    await shown(lambda: "/ui/census" in browser.current_url, what="the sign-in to land on the census page")
    answered = []
    for n in range(5):
        on_page = await shown(lambda: browser.execute_script(
            "const q = document.getElementById('question');"
            "return q && [q.dataset.question, q.dataset.a, q.dataset.b];"), what=f"question {n + 1}")
        qid = int(on_page[0])
        same = truth[on_page[1]] == truth[on_page[2]]
        if n == 0:
            assert "question" in browser.find_element(By.ID, "census-left").text
            browser.find_element(By.TAG_NAME, "body").send_keys("i")  # the evidence, a key away
            assert browser.find_element(By.ID, "evidence").is_displayed()
            shot(browser, "census-question")
        browser.find_element(By.TAG_NAME, "body").send_keys("s" if same else "d")
        row = await until(lambda: db.fetchrow("SELECT id, answer, actor, undone FROM identity_answers "
                                              "WHERE question_id = $1", qid), lambda r: r is not None,
                          what=f"answer {n + 1} in the database")
        assert row["answer"] == ("same" if same else "different") and not row["undone"]
        answered.append(row["id"])
        await shown(lambda: browser.execute_script(
            "const q = document.getElementById('question');"
            "return document.getElementById('census-empty') !== null"
            " || (q !== null && q.dataset.question !== arguments[0]);",
            str(qid)), what="the next question")
        if n < 4:
            assert not browser.find_elements(By.ID, "census-empty"), "the census ran out of questions"
    # U takes the last answer back; the others are undoable through the API the page calls
    browser.find_element(By.TAG_NAME, "body").send_keys("u")
    await until(lambda: db.fetchval("SELECT undone FROM identity_answers WHERE id = $1", answered[-1]), bool,
                what="the last answer undone")
    shot(browser, "census-after-undo")
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth, timeout=60) as client:
        for answer_id in answered[:-1]:
            r = await client.post(f"/v1/census/answers/{answer_id}/undo", json={"reason": "test"})
            assert r.status_code == 200, r.text
            assert (await client.post(f"/v1/census/answers/{answer_id}/undo", json={})).status_code == 409
    assert await db.fetchval("SELECT count(*) FROM identity_answers WHERE id = ANY($1::bigint[]) AND undone",
                             answered) == 5


async def test_eval_census_protocol_reports_the_curve_and_todays_way(stack, census_calibration, nyala_rows,
                                                                    nyala_paths, tmp_path):
    from deer_reid.evaluation.census import run_census

    folder = tmp_path / "labelled"
    (folder / "img").mkdir(parents=True)
    lines = ["path,identity,viewpoint,encounter"]
    for n, (item, identity) in enumerate(herd(nyala_rows, nyala_paths, identities_with(nyala_rows, 4, 29, 4), 3)):
        (folder / "img" / item.name).write_bytes(item.data)  # byte-different copies: never seen by this stack
        lines.append(f"img/{item.name},{identity},left,{identity}-{n}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    result = await asyncio.to_thread(
        run_census, folder, mode="fast", body_model=None, limit=None, seed=0, api_url=stack.api_url,
        report_dir=tmp_path / "report", json_path=tmp_path / "census.json", budget=15, reviewer_error=0.0,
        recluster_every=5, progress=False, settings=stack.settings, stack_models=[stack.settings.body_model])
    assert (result["sightings"], result["true_individuals"], result["images"]) == (12, 4, 12)
    curve = result["curve"]
    assert curve[0]["answers"] == 0 and curve[-1]["answers"] == result["tally"]["answers"] <= 15
    assert all(set(p) >= {"answers", "bcubed_f1", "bcubed_precision", "bcubed_recall", "predicted_individuals"}
               for p in curve + result["baseline"]["curve"])
    assert [p["answers"] for p in curve] == sorted(p["answers"] for p in curve)
    assert result["tally"]["wrong_answers"] == 0  # --reviewer-error 0
    for key in ("answers_to_f1_90", "answers_to_f1_95"):
        assert result[key] is None or 0 <= result[key] <= 15
    # 4 animals of 3 one-photo sightings: F1 0.90 needs three joined whole (6 answers), 0.95 all four (8)
    assert result["answers_floor"] == {"f1_90": 6, "f1_95": 8, "per_sighting_f1_95": 0.667}
    assert result["baseline"]["property"].endswith("-today") and result["baseline"]["curve"][0]["answers"] == 0
    assert json.loads((tmp_path / "census.json").read_text())["curve"] == json.loads(json.dumps(curve))
    assert (tmp_path / "report" / "census.png").exists()
    assert "Census with people in the loop" in (tmp_path / "report" / "report.md").read_text()
