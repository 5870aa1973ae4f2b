"""The people's side on the real stack: keys, review decisions, merges, splits, undo, exports, hostile input.

A small herd of real nyala photos (four animals, four photos each) is ingested once into a property of
its own; each test works on it through the API and checks the database after every step.
"""
from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest

from deer_reid.ingest import wait_terminal
from services.api.auth import create_key, revoke_key
from tests.stack_helpers import WAIT_S, ingest, register, results_for, results_from_now

PROP = "herd"
SITE = "herd-cam"
SCHEMAS = Path(__file__).parent.parent / "deer_reid" / "schemas" / "camtrap-dp-1.0.2"


@pytest.fixture(scope="module")
async def herd_uploaded(stack, nyala_rows, nyala_paths):
    """Sixteen photos of four nyala, uploaded one at a time (so fusion's order is the upload order)."""
    chosen: dict[str, list[int]] = {}
    for i in range(1100, 1200):
        ident = nyala_rows[i]["identity"]
        if ident in ("85", "86", "87", "88") and len(chosen.setdefault(ident, [])) < 4:
            chosen[ident].append(i)
    order = [i for ident in sorted(chosen) for i in chosen[ident]]
    ids = []
    for k, i in enumerate(order):
        ids += await ingest(stack, [nyala_paths[i]], SITE, cls="doe",
                            fallback_captured_at=f"2025-11-0{1 + k % 7}T0{k % 10}:15:00Z", prop=PROP)
    states = await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False)
    assert all(s in ("assigned", "new", "review") for s in states.values()), states
    await register(stack, SITE, PROP, lat=-27.6, lon=32.4)  # where the camera stands (Camtrap DP needs it)
    return {"ids": ids, "identity": {d: nyala_rows[i]["identity"] for d, i in zip(ids, order)}}


@pytest.fixture
async def herd(herd_uploaded, stack, db):
    """The herd as fusion left it, whichever tests ran before: every change a test makes to it is an audited
    change, undone afterwards newest first through the API, and the herd checked back where it started."""
    start = await snapshot(db)
    last = await db.fetchval("SELECT coalesce(max(id), 0) FROM audit_log")
    yield herd_uploaded
    entries = await db.fetch("SELECT id FROM audit_log WHERE property = $1 AND id > $2 AND undoes IS NULL "
                             "AND undone_by IS NULL ORDER BY id DESC", PROP, last)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, headers=stack.auth) as client:
        for e in entries:
            r = await client.post(f"/v1/audit/{e['id']}/undo", json={"reason": "test teardown"})
            assert r.status_code == 200, r.text
    detections, individuals, _ = await snapshot(db)
    assert detections == start[0], "the herd's detections did not return to where the test found them"
    founded = [i for i in individuals if i not in start[1]]
    assert [i for i in individuals if i in start[1]] == start[1] and all(i[1] == 0 for i in founded), founded


@pytest.fixture
async def client(stack):
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, headers=stack.auth) as c:
        yield c


async def placed(db, individual: int) -> set[str]:
    rows = await db.fetch("SELECT id FROM detections WHERE individual_id = $1 AND state IN ('assigned', 'new')",
                          individual)
    return {str(r["id"]) for r in rows}


async def consistent(db, prop: str = PROP) -> None:
    """Every individual's sightings are its placed detections; embeddings follow their detection; exemplars
    belong to individuals that have sightings."""
    bad = await db.fetch(
        """SELECT i.id, i.sightings, count(d.id) AS n FROM individuals i
           LEFT JOIN detections d ON d.individual_id = i.id AND d.state IN ('assigned', 'new')
           WHERE i.property = $1 GROUP BY i.id HAVING i.sightings <> count(d.id)""", prop)
    assert not bad, bad
    drift = await db.fetchval(
        """SELECT count(*) FROM embeddings e JOIN detections d ON d.id = e.detection_id
           WHERE d.property = $1 AND e.individual_id IS DISTINCT FROM
                 CASE WHEN d.state IN ('assigned', 'new') THEN d.individual_id END""", prop)
    assert drift == 0
    orphans = await db.fetchval(
        """SELECT count(*) FROM embeddings e JOIN individuals i ON i.id = e.individual_id
           WHERE e.exemplar AND i.property = $1 AND i.sightings = 0""", prop)
    assert orphans == 0
    missing = await db.fetchval(
        """SELECT count(*) FROM individuals i WHERE i.property = $1 AND i.sightings > 0 AND NOT EXISTS (
               SELECT 1 FROM embeddings e WHERE e.individual_id = i.id AND e.exemplar)""", prop)
    assert missing == 0, "an individual with sightings has no exemplar: the gallery did not follow"


async def snapshot(db) -> tuple:
    rows = await db.fetch("SELECT id, individual_id, state, decided_by FROM detections WHERE property = $1 ORDER BY id",
                          PROP)
    inds = await db.fetch("SELECT id, sightings, name, notes, tags, merged_into FROM individuals WHERE property = $1 "
                          "ORDER BY id", PROP)
    audit = await db.fetchval("SELECT count(*) FROM audit_log")
    return [tuple(r) for r in rows], [tuple(r) for r in inds], audit


async def test_every_state_changing_request_needs_a_key_of_enough_scope(stack, herd, db, nyala_paths):
    det = herd["ids"][0]
    ind = await db.fetchval("SELECT individual_id FROM detections WHERE individual_id IS NOT NULL AND property = $1 "
                            "LIMIT 1", PROP)
    _, reader = await create_key(db, "reader", "read")
    _, revoked = await create_key(db, "gone", "review")
    await revoke_key(db, await db.fetchval("SELECT max(id) FROM api_keys"))
    _, reviewer = await create_key(db, "reviewer", "review")
    changes = [
        ("POST", "/v1/uploads", {"files": [("files", ("x.jpg", nyala_paths[1201].read_bytes(), "image/jpeg"))],
                                 "data": {"site": SITE}}, "review"),
        ("POST", f"/v1/detections/{det}/decision", {"json": {"action": "new"}}, "review"),
        ("POST", f"/v1/detections/{det}/reassign", {"json": {"action": "new"}}, "review"),
        ("POST", "/v1/individuals/merge", {"json": {"keep": ind, "absorb": ind + 1}}, "review"),
        ("POST", f"/v1/individuals/{ind}/split", {"json": {"detections": [det]}}, "review"),
        ("PATCH", f"/v1/individuals/{ind}", {"json": {"name": "Intruder"}}, "review"),
        ("POST", "/v1/audit/1/undo", {"json": {}}, "review"),
        ("PUT", "/v1/config", {"json": {"mode": "enhanced"}}, "admin"),
        ("PUT", f"/v1/sites/{SITE}-x", {"json": {"property": PROP}}, "admin"),
        ("POST", "/v1/calibration", {"json": {"bogus": 1}}, "admin"),
    ]
    before = await snapshot(db)
    images = await db.fetchval("SELECT count(*) FROM images")
    config = await db.fetchval("SELECT value FROM runtime_config WHERE key = 'pipeline'")
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as anon:
        for method, path, kw, scope in changes:
            r = await anon.request(method, path, **kw)
            assert r.status_code == 401, (path, r.status_code, r.text)
            for bad in ("deer_00000000_forged", "not-a-key", revoked):
                r = await anon.request(method, path, headers={"Authorization": f"Bearer {bad}"}, **kw)
                assert r.status_code == 401, (path, bad, r.status_code)
            r = await anon.request(method, path, headers={"Authorization": f"Bearer {reader}"}, **kw)
            assert r.status_code == 403, (path, r.status_code)
            if scope == "admin":
                r = await anon.request(method, path, headers={"Authorization": f"Bearer {reviewer}"}, **kw)
                assert r.status_code == 403, (path, r.status_code)
            # a signed-in page's cookie without the page's header: what a cross-site form would send
            anon.cookies.set("deer_key", reviewer)
            r = await anon.request(method, path, **kw)
            anon.cookies.clear()
            if scope == "review":
                assert r.status_code == 403 and "x-deer-page" in r.text, (path, r.status_code)
        # reads stay open on the loopback-only API, and a read key reads
        assert (await anon.get("/v1/individuals", params={"property": PROP})).status_code == 200
        assert (await anon.get("/v1/review", headers={"Authorization": f"Bearer {reader}"})).status_code == 200
    assert await snapshot(db) == before
    assert await db.fetchval("SELECT count(*) FROM images") == images
    assert await db.fetchval("SELECT value FROM runtime_config WHERE key = 'pipeline'") == config
    # the key is stored hashed: the token appears nowhere in the table
    assert not await db.fetchval("SELECT count(*) FROM api_keys WHERE encode(hash, 'escape') LIKE '%' || $1 || '%' "
                                 "OR prefix = $1", reviewer)


async def test_review_decisions_each_undone_on_the_real_database(herd, client, db):
    det = herd["ids"][5]
    row = await db.fetchrow("SELECT state, individual_id, decided_by, result FROM detections WHERE id = $1", det)
    assert row["decided_by"] == "fusion"
    start = await snapshot(db)
    fusion_rows = await db.fetchval("SELECT count(*) FROM decisions WHERE decided_by = 'fusion'")

    # declare a new individual: founded, the detection moves, the gallery follows
    r = await client.post(f"/v1/detections/{det}/decision", json={"action": "new", "reason": "white blaze"})
    assert r.status_code == 200, r.text
    change = r.json()
    founded = change["after"]["founded"]
    assert await placed(db, founded) == {det}
    assert await db.fetchval("SELECT created_by FROM individuals WHERE id = $1", founded) == "human:local-admin"
    assert await db.fetchval("SELECT count(*) FROM embeddings WHERE individual_id = $1 AND exemplar", founded) >= 1
    entry = await db.fetchrow("SELECT actor, action, reason FROM audit_log WHERE id = $1", change["audit_id"])
    assert tuple(entry) == ("local-admin", "review:new", "white blaze")
    assert await db.fetchval("SELECT count(*) FROM decisions WHERE detection_id = $1 AND decided_by = 'human' "
                             "AND audit_id = $2", det, change["audit_id"]) == 1
    await consistent(db)

    # a second review decision on it is refused (a person decided it); a reassignment is the way
    others = [i["id"] for i in (await client.get("/v1/individuals", params={"property": PROP, "limit": 100})).json()
              ["individuals"] if i["id"] != founded]
    other = others[0]
    r = await client.post(f"/v1/detections/{det}/decision", json={"action": "assign", "individual_id": other})
    assert r.status_code == 409, r.text
    r = await client.post(f"/v1/detections/{det}/reassign", json={"action": "assign", "individual_id": other})
    assert r.status_code == 200, r.text
    reassigned = r.json()["audit_id"]
    assert det in await placed(db, other) and await placed(db, founded) == set()
    await consistent(db)

    # undo in reverse order restores everything; undoing out of order is refused while it would clobber
    r = await client.post(f"/v1/audit/{change['audit_id']}/undo", json={})
    assert r.status_code == 409 and "changed after" in r.json()["detail"]["error"]
    assert (await client.post(f"/v1/audit/{reassigned}/undo", json={})).status_code == 200
    assert await placed(db, founded) == {det}
    assert (await client.post(f"/v1/audit/{change['audit_id']}/undo", json={})).status_code == 200
    assert (await client.post(f"/v1/audit/{change['audit_id']}/undo", json={})).status_code == 409  # once only
    detections, individuals, _ = await snapshot(db)
    assert detections == start[0]
    assert [i for i in individuals if i[0] != founded] == start[1]
    assert await db.fetchval("SELECT sightings FROM individuals WHERE id = $1", founded) == 0
    listed = (await client.get("/v1/individuals", params={"property": PROP, "limit": 100})).json()
    assert founded not in [i["id"] for i in listed["individuals"]]  # an emptied individual drops out of lists
    assert await db.fetchval("SELECT count(*) FROM decisions WHERE decided_by = 'fusion'") == fusion_rows
    await consistent(db)


async def test_confirm_from_the_review_queue_and_queue_contents(herd, client, db):
    queue = (await client.get("/v1/review", params={"property": PROP, "order": "uncertain"})).json()
    assert queue["items"], "the herd produced nothing to review"
    waiting = await db.fetchval("SELECT count(*) FROM detections WHERE property = $1 AND state = 'review'", PROP)
    assert queue["total"] >= waiting
    item = next(i for i in queue["items"] if i["candidates"])
    for c in item["candidates"]:
        assert set(c) >= {"individual_id", "score", "components", "photos", "sightings"}
        assert c["photos"] and all(set(v) == {"raw", "calibrated", "weight"} for v in c["components"].values())
    margins = [i["candidates"][0]["score"] - (i["candidates"][1]["score"] if len(i["candidates"]) > 1 else 0)
               for i in queue["items"] if i["candidates"]]
    assert margins == sorted(margins)  # most uncertain first
    chosen = item["candidates"][0]["individual_id"]
    r = await client.post(f"/v1/detections/{item['detection']}/decision",
                          json={"action": "confirm", "individual_id": chosen})
    assert r.status_code == 200, r.text
    row = await db.fetchrow("SELECT state, individual_id, decided_by FROM detections WHERE id = $1", item["detection"])
    assert tuple(row) == ("assigned", chosen, "human")
    after = (await client.get("/v1/review", params={"property": PROP, "limit": 200})).json()
    assert item["detection"] not in [i["detection"] for i in after["items"]]
    # confirming someone fusion never suggested is refused: that is an assignment
    nxt = next((i for i in after["items"] if i["candidates"]), None)
    assert nxt is not None, "the herd left no other detection with candidates in review: the check cannot run"
    suggested = {c["individual_id"] for c in nxt["candidates"]}
    other = await db.fetchval("SELECT id FROM individuals WHERE property = $1 AND NOT (id = ANY($2::bigint[])) "
                              "AND sightings > 0 LIMIT 1", PROP, list(suggested))
    if other is None:  # every individual of the herd was suggested (the order of the tests decides): found one
        spare = await db.fetchval("SELECT id FROM detections WHERE property = $1 AND state IN ('assigned', 'new') "
                                  "AND id <> $2 LIMIT 1", PROP, uuid.UUID(nxt["detection"]))
        r = await client.post(f"/v1/detections/{spare}/reassign", json={"action": "new", "reason": "test"})
        assert r.status_code == 200, r.text
        other = (await db.fetchrow("SELECT individual_id FROM detections WHERE id = $1", spare))["individual_id"]
    assert other not in suggested
    r = await client.post(f"/v1/detections/{nxt['detection']}/decision",
                          json={"action": "confirm", "individual_id": other})
    assert r.status_code == 422 and "assign" in r.text
    await consistent(db)


async def test_merge_then_split_back_restores_the_counts(herd, client, db):
    inds = (await client.get("/v1/individuals", params={"property": PROP, "limit": 100})).json()["individuals"]
    a, b = sorted(inds, key=lambda i: -i["sightings"])[:2]
    a_dets, b_dets = await placed(db, a["id"]), await placed(db, b["id"])
    total = await db.fetchval("SELECT sum(sightings) FROM individuals WHERE property = $1", PROP)
    r = await client.post("/v1/individuals/merge", json={"keep": a["id"], "absorb": b["id"], "reason": "same scar"})
    assert r.status_code == 200, r.text
    assert await placed(db, a["id"]) == a_dets | b_dets and await placed(db, b["id"]) == set()
    assert await db.fetchval("SELECT merged_into FROM individuals WHERE id = $1", b["id"]) == a["id"]
    assert (await client.get(f"/v1/individuals/{b['id']}")).json()["merged_into"] == a["id"]
    await consistent(db)
    # split b's detections back out: a new individual with exactly them, a keeps its own
    r = await client.post(f"/v1/individuals/{a['id']}/split", json={"detections": sorted(b_dets), "name": "Split G2"})
    assert r.status_code == 200, r.text
    founded = r.json()["after"]["founded"]
    assert await placed(db, founded) == b_dets and await placed(db, a["id"]) == a_dets
    assert await db.fetchval("SELECT sum(sightings) FROM individuals WHERE property = $1", PROP) == total
    assert (await client.get("/v1/individuals", params={"q": "split g2"})).json()["individuals"][0]["id"] == founded
    await consistent(db)


async def test_human_decisions_survive_reprocessing(stack, herd, client, db):
    det = herd["ids"][9]
    r = await client.post(f"/v1/detections/{det}/reassign", json={"action": "new", "reason": "my deer"})
    assert r.status_code == 200, r.text
    mine = r.json()["after"]["founded"]
    decisions = await db.fetchval("SELECT count(*) FROM decisions WHERE detection_id = $1", det)
    # re-process: publish the detection's event again, and rebuild the whole gallery
    from deer_reid.gallery import rebuild

    from services.reconciler.relay import event_from_row
    from shared.broker import producer_for
    from shared.topics import DETECTIONS

    row = await db.fetchrow("SELECT * FROM detections WHERE id = $1", det)
    async with results_from_now(stack) as results:
        # the detection's event delivered again (the outbox relays only pending detections: a decided one is
        # re-processed only by a redelivery like this one)
        producer = producer_for(stack.bootstrap, "test")
        await producer.start()
        await producer.send_and_wait(DETECTIONS.name, event_from_row(row).to_bytes(), key=str(det).encode())
        await producer.stop()
        await rebuild(stack.dsn, 8, prop=PROP, progress=False)
        # fusion has seen the event again once it re-publishes the detection's (unchanged) result
        assert await results_for(results, [det]) == {str(det)}, "the re-published event never reached fusion"
    row = await db.fetchrow("SELECT state, individual_id, decided_by FROM detections WHERE id = $1", det)
    assert tuple(row) == ("new", mine, "human")
    assert await db.fetchval("SELECT count(*) FROM decisions WHERE detection_id = $1", det) == decisions
    await consistent(db)


async def test_hostile_requests_are_refused_and_change_nothing(herd, client, db):
    # a detection no person decided (the refusals below must be the ones asked about, not "already decided")
    det = await db.fetchval("SELECT id FROM detections WHERE id = ANY($1::uuid[]) AND decided_by IS DISTINCT FROM "
                            "'human' ORDER BY id LIMIT 1", herd["ids"])
    ind = await db.fetchval("SELECT individual_id FROM detections WHERE id = $1", det) or \
        await db.fetchval("SELECT id FROM individuals WHERE property = $1 AND sightings > 0 LIMIT 1", PROP)
    before = await snapshot(db)
    cases = [
        ("POST", "/v1/detections/00000000-0000-0000-0000-000000000000/decision", {"action": "new"}, 404),
        ("POST", "/v1/detections/not-a-uuid/decision", {"action": "new"}, 422),
        ("POST", f"/v1/detections/{det}/decision", {"action": "assign", "individual_id": 999999999}, 404),
        ("POST", f"/v1/detections/{det}/decision", {"action": "explode"}, 422),
        ("POST", f"/v1/detections/{det}/decision", {"action": "new", "extra": 1}, 422),
        ("POST", "/v1/individuals/merge", {"keep": ind, "absorb": ind}, 422),
        ("POST", "/v1/individuals/merge", {"keep": ind, "absorb": 999999999}, 404),
        ("POST", f"/v1/individuals/{ind}/split", {"detections": sorted(await placed(db, ind))}, 422),
        ("POST", f"/v1/individuals/{ind}/split", {"detections": [herd["ids"][0]] if
                                                  herd["ids"][0] not in await placed(db, ind) else [herd["ids"][1]]},
         422),
        ("POST", f"/v1/individuals/{ind}/split", {"detections": []}, 422),
        ("PATCH", f"/v1/individuals/{ind}", {}, 422),
        ("PATCH", f"/v1/individuals/{ind}", {"name": "x" * 101}, 422),
        ("PATCH", f"/v1/individuals/{ind}", {"tags": ["a,b"]}, 422),
        ("PATCH", "/v1/individuals/999999999", {"name": "Ghost"}, 404),
        ("POST", "/v1/audit/999999999/undo", {}, 404),
        ("GET", "/v1/individuals/999999999", None, 404),
        ("GET", "/v1/detections/00000000-0000-0000-0000-000000000000/crop", None, 404),
    ]
    for method, path, body, status in cases:
        r = await client.request(method, path, json=body) if body is not None else await client.request(method, path)
        assert r.status_code == status, (path, body, r.status_code, r.text)
    assert await snapshot(db) == before

    # two animals of one photo can never become one deer
    pair = await db.fetchrow(
        """SELECT a.id AS a, b.individual_id AS other FROM detections a JOIN detections b
           ON a.image_sha256 = b.image_sha256 AND a.id <> b.id
           WHERE a.property = $1 AND b.individual_id IS NOT NULL LIMIT 1""", PROP)
    assert pair is None  # the herd has one animal per photo; the clash is checked in the stack test below

    # two people deciding the same detection at once: one wins, the other is told
    free = await db.fetchval("SELECT id FROM detections WHERE property = $1 AND decided_by = 'fusion' "
                             "ORDER BY id DESC LIMIT 1", PROP)
    # counted from here: an earlier test may have decided this detection and undone it (undo keeps its row)
    human = "SELECT count(*) FROM decisions WHERE detection_id = $1 AND decided_by = 'human'"
    decided_before = await db.fetchval(human, free)
    first, second = await asyncio.gather(
        client.post(f"/v1/detections/{free}/decision", json={"action": "new", "reason": "ranger A"}),
        client.post(f"/v1/detections/{free}/decision", json={"action": "new", "reason": "ranger B"}))
    assert sorted([first.status_code, second.status_code]) == [200, 409], (first.text, second.text)
    assert await db.fetchval(human, free) == decided_before + 1

    # a script in a note is kept as typed and shown as text
    note = '<script>document.title="owned"</script> & "quotes"'
    r = await client.patch(f"/v1/individuals/{ind}", json={"notes": note, "tags": ["big 8", "scar"]})
    assert r.status_code == 200, r.text
    assert await db.fetchval("SELECT notes FROM individuals WHERE id = $1", ind) == note
    page = await client.get(f"/ui/individuals/{ind}")
    assert page.status_code == 200 and "<script>document.title" not in page.text
    assert "&lt;script&gt;document.title=&#34;owned&#34;&lt;/script&gt; &amp; &#34;quotes&#34;" in page.text
    await consistent(db)


async def test_two_animals_of_one_photo_cannot_be_merged(stack, client, db, nyala_paths):
    """A photo with two boxes: its two animals are two deer whatever a person clicks."""
    from PIL import Image

    await register(stack, "pair-cam", "pair")
    w, h = Image.open(nyala_paths[1202]).size
    boxes = json.dumps([{"box": [0, 0, w // 2, h], "cls": "doe"}, {"box": [w // 2, 0, w, h], "cls": "doe"}])
    r = await client.post("/v1/uploads", data={"site": "pair-cam", "detections": boxes,
                                               "captured_at": "2025-11-03T05:00:00Z"},
                          files=[("files", ("pair.jpg", nyala_paths[1202].read_bytes(), "image/jpeg"))])
    assert r.status_code == 201, r.text
    a, b = [d["id"] for d in r.json()["images"][0]["detections"]]
    await wait_terminal(stack.api_url, [a, b], timeout=WAIT_S, progress=False)
    ia, ib = [await db.fetchval("SELECT individual_id FROM detections WHERE id = $1", d) for d in (a, b)]
    assert ia and ib and ia != ib
    before = await db.fetchval("SELECT count(*) FROM audit_log")
    r = await client.post("/v1/individuals/merge", json={"keep": ia, "absorb": ib})
    assert r.status_code == 409 and "seen together" in r.json()["detail"]["error"]
    r = await client.post(f"/v1/detections/{b}/reassign", json={"action": "assign", "individual_id": ia})
    assert r.status_code == 409
    assert await db.fetchval("SELECT count(*) FROM audit_log") == before
    assert await db.fetchval("SELECT individual_id FROM detections WHERE id = $1", b) == ib


async def test_profile_statistics_and_audit(herd, client, db):
    # a profile with two sightings and two other individuals to be similar to, made by a person where fusion
    # (uncalibrated, so mostly review) left fewer (the herd fixture undoes it all afterwards)
    for det in await db.fetch("SELECT id FROM detections WHERE property = $1 AND state = 'review' ORDER BY id", PROP):
        if await db.fetchval("SELECT count(*) FROM individuals WHERE property = $1 AND sightings > 0", PROP) >= 4:
            break
        r = await client.post(f"/v1/detections/{det['id']}/decision", json={"action": "new"})
        assert r.status_code == 200, r.text
    top = await db.fetch("SELECT id, sightings FROM individuals WHERE property = $1 AND sightings > 0 "
                         "ORDER BY sightings DESC, id LIMIT 2", PROP)
    ind = top[0]["id"]
    r = await client.post("/v1/individuals/merge", json={"keep": ind, "absorb": top[1]["id"], "reason": "one doe"})
    assert r.status_code == 200, r.text
    p = (await client.get(f"/v1/individuals/{ind}")).json()
    assert p["sightings"] >= 2, p
    assert len(p["timeline"]) == p["sightings"] == sum(p["hours"]) == sum(s["sightings"] for s in p["sites"])
    assert p["best_photos"] and all(v in {t["detection"] for t in p["timeline"]} for v in p["best_photos"].values())
    assert p["similar"] and all(s["individual_id"] != ind and s["components"] for s in p["similar"])
    assert all(k.startswith("body:") for s in p["similar"] for k in s["components"])
    crop = await client.get(f"/v1/detections/{p['timeline'][0]['detection']}/crop")
    image = await client.get(f"/v1/detections/{p['timeline'][0]['detection']}/image", params={"max_side": 300})
    assert crop.headers["content-type"] == image.headers["content-type"] == "image/jpeg"
    from PIL import Image

    assert max(Image.open(io.BytesIO(image.content)).size) == 300
    stats = (await client.get("/v1/stats")).json()
    assert sum(stats["detections"].values()) == await db.fetchval("SELECT count(*) FROM detections")
    assert stats["coverage"]["body"]["ok"] > 0 and "body/" in " ".join(stats["timings_ms"])
    # list filters: each narrows to what it names
    listed = (await client.get("/v1/individuals", params={"property": PROP, "limit": 500})).json()
    assert listed["total"] == await db.fetchval("SELECT count(*) FROM individuals WHERE property = $1 AND "
                                                "sightings > 0 AND merged_into IS NULL", PROP)
    busy = (await client.get("/v1/individuals", params={"property": PROP, "min_sightings": 2})).json()
    assert ind in [i["id"] for i in busy["individuals"]] and all(i["sightings"] >= 2 for i in busy["individuals"])
    assert (await client.get("/v1/individuals", params={"property": PROP, "site": "elsewhere"})).json()["total"] == 0
    assert (await client.get("/v1/individuals", params={"property": PROP, "seen_to": "2020-01-01T00:00:00Z"})
            ).json()["total"] == 0
    assert (await client.get("/v1/individuals", params={"property": PROP, "sex": "male"})).json()["total"] == 0
    log = (await client.get("/v1/audit", params={"individual": ind})).json()["entries"]
    assert log and all(e["actor"] for e in log) and "merge" in [e["action"] for e in log], log


def _read_zip(data: bytes) -> dict[str, str]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: z.read(n).decode() for n in z.namelist()}


async def test_csv_export_round_trips(herd, client, db, tmp_path, stack, monkeypatch):
    files = _read_zip((await client.get("/v1/export", params={"format": "csv", "property": PROP})).content)
    detections = list(csv.DictReader(io.StringIO(files["detections.csv"])))
    rows = await db.fetch("SELECT id, state, individual_id FROM detections WHERE property = $1", PROP)
    assert {d["detection_id"]: (d["state"], d["individual_id"]) for d in detections} == \
        {str(r["id"]): (r["state"], str(r["individual_id"] or "")) for r in rows}
    individuals = list(csv.DictReader(io.StringIO(files["individuals.csv"])))
    db_inds = await db.fetch("SELECT id, name, sightings, tags FROM individuals WHERE property = $1", PROP)
    assert {int(i["individual_id"]): (i["name"] or None, int(i["sightings"]), i["tags"]) for i in individuals} == \
        {r["id"]: (r["name"], r["sightings"], ";".join(r["tags"])) for r in db_inds}
    per_day = list(csv.DictReader(io.StringIO(files["sightings_per_site_day.csv"])))
    assert sum(int(r["detections"]) for r in per_day) == sum(r["sightings"] for r in db_inds)
    # the CLI writes the same files into a folder
    from deer_reid.cli import main

    monkeypatch.setenv("DEER_API_URL", stack.api_url)
    monkeypatch.setenv("DEER_API_KEY", stack.admin_key)
    assert main(["export", str(tmp_path / "out"), "--format", "csv", "--property", PROP]) == 0
    assert (tmp_path / "out" / "detections.csv").read_text() == files["detections.csv"]


async def test_camtrap_dp_export_validates_against_the_standard(stack, herd, client, tmp_path, nyala_paths):
    import frictionless
    import jsonschema
    from referencing.jsonschema import DRAFT4

    r = await client.get("/v1/export", params={"format": "camtrap-dp", "property": PROP,
                                               "scientific_name": "Tragelaphus angasii"})
    assert r.status_code == 200, r.text
    files = _read_zip(r.content)
    package = json.loads(files["datapackage.json"])
    # the package against the Camtrap DP profile, offline: its GeoJSON reference resolves to the copy that
    # frictionless ships; its base Data Package schema (another URL) is what frictionless checks below
    from referencing import Registry, Resource

    geojson = json.loads((Path(frictionless.__file__).parent / "assets" / "profiles" / "geojson.json").read_text())
    registry = Registry().with_resource("http://json.schemastore.org/geojson.json",
                                        Resource.from_contents(geojson, default_specification=DRAFT4))
    profile = json.loads((SCHEMAS / "camtrap-dp-profile.json").read_text())
    profile["allOf"] = [p for p in profile["allOf"] if "$ref" not in p]
    jsonschema.Draft4Validator(profile, registry=registry).validate(package)
    # the tables against the standard's table schemas, keys and foreign keys included
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    local = json.loads(files["datapackage.json"])
    for res in local["resources"]:
        res["schema"] = json.loads((SCHEMAS / f"{res['name']}-table-schema.json").read_text())
    local.pop("profile")
    report = frictionless.Package(local, basepath=str(tmp_path)).validate()
    assert report.valid, report.flatten(["rowNumber", "fieldName", "type", "note"])[:10]
    observations = list(csv.DictReader(io.StringIO(files["observations.csv"])))
    assert any(o["individualID"] for o in observations)
    # a property without coordinates is refused with the sites named, not exported with invented ones
    ids = await ingest(stack, [nyala_paths[1203]], "nowhere-cam", prop="nowhere")
    await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False)
    r = await client.get("/v1/export", params={"format": "camtrap-dp", "property": "nowhere"})
    assert r.status_code == 422 and "nowhere-cam" in r.json()["detail"]["error"]


async def test_command_line_works_the_same_api(stack, herd, db, monkeypatch, capsys):
    from deer_reid.cli import main

    monkeypatch.setenv("DEER_API_URL", stack.api_url)
    monkeypatch.setenv("DEER_DATABASE_URL", stack.dsn)
    monkeypatch.setenv("DEER_HOME", str(stack.home))  # the local admin key `deer-reid up` wrote
    monkeypatch.delenv("DEER_API_KEY", raising=False)
    assert oct((stack.home / "admin.key").stat().st_mode & 0o777) == "0o600"

    # keys: created (shown once), listed without the secret, revoked
    assert await asyncio.to_thread(main, ["keys", "create", "--owner", "ranger-cli", "--scope", "review"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("deer_")
    assert await asyncio.to_thread(main, ["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert "ranger-cli" in listing and token not in listing

    # a person in a terminal: the queue, an individual, a decision with the new key, its undo
    monkeypatch.setenv("DEER_API_KEY", token)
    assert await asyncio.to_thread(main, ["review", "list", "--limit", "3"]) == 0
    assert "waiting" in capsys.readouterr().out
    det = await db.fetchval("SELECT id FROM detections WHERE property = $1 AND decided_by = 'fusion' "
                            "AND state = 'new' ORDER BY id LIMIT 1", PROP)
    before = await db.fetchrow("SELECT state, individual_id, decided_by FROM detections WHERE id = $1", det)
    assert await asyncio.to_thread(main, ["review", "confirm", str(det), "--reason", "checked the scar"]) == 0
    out = capsys.readouterr().out
    audit_id = int(out.split("change ")[1].split(":")[0])
    assert await db.fetchval("SELECT actor FROM audit_log WHERE id = $1", audit_id) == "ranger-cli"
    assert await db.fetchval("SELECT decided_by FROM detections WHERE id = $1", det) == "human"
    ind = before["individual_id"]
    assert await asyncio.to_thread(main, ["individuals", "name", str(ind), "Big 8", "--tags", "buck,scar"]) == 0
    assert await asyncio.to_thread(main, ["individuals", "show", str(ind)]) == 0
    assert "Big 8" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["review", "undo", str(audit_id)]) == 0
    assert tuple(await db.fetchrow("SELECT state, individual_id, decided_by FROM detections WHERE id = $1", det)) == \
        tuple(before)
    assert await asyncio.to_thread(main, ["review", "log", "--limit", "5"]) == 0
    assert "undo" in capsys.readouterr().out

    # a revoked key is refused, and the CLI says so
    key_id = await db.fetchval("SELECT id FROM api_keys WHERE owner = 'ranger-cli'")
    assert await asyncio.to_thread(main, ["keys", "revoke", str(key_id)]) == 0
    with pytest.raises(SystemExit, match="401"):
        await asyncio.to_thread(main, ["review", "new", str(det)])
    monkeypatch.delenv("DEER_API_KEY")
    assert await asyncio.to_thread(main, ["page"]) == 0
    assert capsys.readouterr().out.strip().endswith("#key=" + stack.admin_key)


async def test_reads_need_a_key_when_the_api_listens_beyond_loopback(stack, herd, db, tmp_path):
    """The same app bound to 0.0.0.0 (as in the containers): nothing is open but health and metrics."""
    from services.api.app import create_app
    from shared.config import Settings
    from shared.db import create_pool

    app = create_app(Settings(home=tmp_path, database_url=stack.dsn, api_host="0.0.0.0"))
    app.state.pool = await create_pool(stack.dsn, max_size=2)
    _, reader = await create_key(db, "viewer", "read")
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
            for path in ("/v1/individuals", "/v1/review", "/v1/stats", f"/v1/detections/{herd['ids'][0]}/crop",
                         "/v1/export", "/v1/config", "/v1/sites"):
                assert (await c.get(path)).status_code == 401, path
                assert (await c.get(path, headers={"Authorization": f"Bearer {reader}"})).status_code == 200, path
            page = await c.get("/ui/review")
            assert page.status_code == 303 and page.headers["location"].startswith("/ui/login")
            signed_in = await c.post("/ui/login", data={"key": reader, "next": "/ui/review"})
            assert signed_in.status_code == 303 and "httponly" in signed_in.headers["set-cookie"].lower()
            assert (await c.get("/ui/review")).status_code == 200  # the cookie now reads
            assert (await c.get("/healthz")).status_code == 200
    finally:
        await app.state.pool.close()


def test_a_profile_viewpoint_is_pose_else_the_coat_facing_else_unknown():
    from services.api.browse import viewpoint_of

    assert viewpoint_of({"pose": {"viewpoint": "profile-left"}, "coat": {"facing": "right"}}) == "profile-left"
    assert viewpoint_of({"coat": {"facing": "right"}}) == "profile-right"
    assert viewpoint_of({"pose": {"viewpoint": "unknown"}, "coat": {"facing": "left"}}) == "profile-left"
    assert viewpoint_of({"coat": {"facing": None}}) == viewpoint_of(None) == "unknown"
