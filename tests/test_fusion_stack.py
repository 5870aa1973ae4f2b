"""Fusion on the real stack: identity across a property's sites, the join, cannot-link, switches, hostile features."""
from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
import uuid
from datetime import datetime, timezone

import httpx
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from PIL import Image

from deer_reid.ingest import wait_terminal
from services.fusion import store
from shared import coat as coat_features
from shared.broker import producer_for
from shared.schemas import DeadLetter, Embedding, Features
from shared.topics import FEATURES_ANTLER, FEATURES_BODY, FEATURES_COAT, FEATURES_POSE, POSE_REQUESTS, \
    dead_letter_of
from tests.conftest import JOIN_TIMEOUT_S
from tests.stack_helpers import WAIT_S, assert_exactly_once, ingest, paused, register, until

pytestmark = pytest.mark.stack


def cropped(path, keep: float = 0.95, quality: int = 90) -> bytes:
    """A slightly cropped, re-encoded copy of a photo: the same animal, other bytes (another image)."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    dx, dy = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    out = io.BytesIO()
    im.crop((dx, dy, w - dx, h - dy)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


async def upload(stack, name: str, data: bytes, site: str, *, boxes=None, cls="doe",
                 captured_at="2025-06-01T06:00:00Z") -> list[str]:
    fields = {"site": site, "camera": "cam1", "captured_at": captured_at, "cls": cls}
    if boxes is not None:
        fields["detections"] = json.dumps([{"box": b, "cls": cls} for b in boxes])
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, headers=stack.auth) as client:
        r = await client.post("/v1/uploads", data=fields, files=[("files", (name, data, "image/jpeg"))])
    assert r.status_code == 201, r.text
    return [d["id"] for d in r.json()["images"][0]["detections"]]


async def detection(stack, det_id: str) -> dict:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, headers=stack.auth) as client:
        return (await client.get(f"/v1/detections/{det_id}")).json()


async def decided(stack, ids: list[str]) -> list[dict]:
    states = await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False, poll_s=0.2)
    assert all(states[i] in ("assigned", "new", "review") for i in ids), states
    return [await detection(stack, i) for i in ids]


async def set_config(stack, **switches) -> dict:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, headers=stack.auth) as client:
        r = await client.put("/v1/config", json=switches)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
async def config(stack):
    """Run-time switches a test changes are put back afterwards (the stack is shared)."""
    before = await set_config(stack)
    yield
    await set_config(stack, **{k: before[k] for k in ("mode", "ensemble", "temporal", "coat", "pose", "antler")})


async def test_one_animal_at_two_sites_of_one_property_is_one_individual(stack, db, nyala_paths):
    await register(stack, "ranch-north", "ranch")
    await register(stack, "ranch-south", "ranch")
    photo = nyala_paths[700]
    [first] = await upload(stack, "north.jpg", photo.read_bytes(), "ranch-north")
    [d1] = await decided(stack, [first])
    [second] = await upload(stack, "south.jpg", cropped(photo), "ranch-south")
    [d2] = await decided(stack, [second])
    assert d1["state"] == "new"
    assert d2["result"]["candidates"], "the gallery search must span every site of the property"
    assert d2["result"]["candidates"][0]["individual_id"] == d1["individual_id"]
    assert (d2["state"], d2["individual_id"]) == ("assigned", d1["individual_id"])
    row = await db.fetchrow("SELECT property, site, sightings FROM individuals WHERE id = $1", d1["individual_id"])
    assert (row["property"], row["site"], row["sightings"]) == ("ranch", "ranch-north", 2)


async def test_the_same_deer_at_two_far_sites_within_minutes_goes_to_review(stack, db, nyala_paths):
    await register(stack, "hill-east", "hill", lat=45.000, lon=-93.000)
    await register(stack, "hill-west", "hill", lat=44.980, lon=-93.000)  # 2.2 km away
    photo = nyala_paths[705]
    [first] = await upload(stack, "east.jpg", photo.read_bytes(), "hill-east", captured_at="2025-06-01T06:00:00Z")
    [d1] = await decided(stack, [first])
    [second] = await upload(stack, "west.jpg", cropped(photo), "hill-west", captured_at="2025-06-01T06:02:00Z")
    [d2] = await decided(stack, [second])
    best = d2["result"]["candidates"][0]
    assert best["individual_id"] == d1["individual_id"] and "temporal-conflict" in best["flags"]
    assert d2["state"] == "review" and "temporal-conflict" in d2["result"]["flags"]


async def test_two_properties_never_share_an_individual(stack, db, nyala_paths):
    await register(stack, "farm-a-cam", "farm-a")
    await register(stack, "farm-b-cam", "farm-b")
    photo = nyala_paths[710]
    [a] = await upload(stack, "a.jpg", photo.read_bytes(), "farm-a-cam")
    [b] = await upload(stack, "b.jpg", cropped(photo), "farm-b-cam")
    da, db_ = await decided(stack, [a, b])
    assert da["state"] == db_["state"] == "new"
    assert da["individual_id"] != db_["individual_id"]
    assert not db_["result"]["candidates"]  # farm-a's individual is not even a candidate
    props = await db.fetch("SELECT property FROM individuals WHERE id = ANY($1::bigint[]) ORDER BY property",
                           [da["individual_id"], db_["individual_id"]])
    assert [r["property"] for r in props] == ["farm-a", "farm-b"]


async def test_two_detections_of_one_image_are_never_one_individual(stack, db, nyala_paths):
    await register(stack, "pair-cam", "pair")
    photo = nyala_paths[720]
    [known] = await upload(stack, "known.jpg", photo.read_bytes(), "pair-cam")
    [k] = await decided(stack, [known])
    # Another frame with two boxes that both look like the known animal: at most one of them is it.
    data = cropped(photo, keep=0.97)
    w, h = Image.open(io.BytesIO(data)).size
    ids = await upload(stack, "two.jpg", data, "pair-cam", boxes=[[0, 0, w, h], [2, 2, w - 2, h - 2]])
    d = await decided(stack, ids)
    placed = [x["individual_id"] for x in d if x["state"] in ("assigned", "new")]
    assert len(placed) == len(set(placed)), f"two boxes of one frame joined one individual: {placed}"
    # the box decided second was barred from the individual the first one joined
    order = list(dict.fromkeys(r["detection_id"] for r in await db.fetch(
        "SELECT detection_id FROM decisions WHERE detection_id = ANY($1::uuid[]) ORDER BY id", [x["id"] for x in d])))
    first, second = (next(x for x in d if str(x["id"]) == str(i)) for i in order[:2])
    assert first["state"] in ("assigned", "new"), f"the first box was not placed, nothing to bar: {first['state']}"
    assert first["individual_id"] in second["result"]["cannot_link"], (first, second)


async def test_a_component_that_never_arrives_is_decided_degraded_after_the_timeout(stack, db, nyala_paths, config):
    await set_config(stack, mode="enhanced", antler=True, ensemble=False)
    started = time.monotonic()
    with paused(stack, "antler"):  # the antler service stops answering
        ids = await ingest(stack, nyala_paths[730:733], "degraded-cam", cls="buck")
        results = [d["result"] for d in await decided(stack, ids)]
        assert time.monotonic() - started >= JOIN_TIMEOUT_S
        for r in results:
            assert "degraded" in r["flags"] and r["missing"] == ["antler"] and r["expected"] == ["body", "antler"]
            assert r["switches"]["antler"] is True and r["mode"] == "enhanced"
        await assert_exactly_once(db, ids, "degraded-cam")
        before = {i: await db.fetchrow("SELECT state, result FROM detections WHERE id = $1", uuid.UUID(i))
                  for i in ids}
    # resumed, the service answers after the decisions: the features are stored as late and reopen nothing
    await until(lambda: db.fetchval("SELECT count(*) FROM detection_features WHERE detection_id = ANY($1::uuid[]) "
                                    "AND component = 'antler' AND late", ids),
                lambda late: late == len(ids), timeout=60, what="the resumed antler service's features, stored as late")
    for i in ids:
        after = await detection(stack, i)
        assert (after["state"], after["result"]) == tuple(before[i])
    await assert_exactly_once(db, ids, "degraded-cam")


async def test_an_uncertain_match_asks_the_pose_service_and_records_why(stack, db, nyala_paths, config):
    await set_config(stack, mode="enhanced", pose=True, ensemble=False)
    [det] = await ingest(stack, nyala_paths[735:736], "pose-cam")  # an empty property: no confident match
    [d] = await decided(stack, [det])
    r = d["result"]
    # on failure, say when each component arrived and when the decision fell
    timeline = [dict(x) for x in await db.fetch(
        "SELECT component, arrived_at, late FROM detection_features WHERE detection_id = $1 UNION ALL "
        "SELECT 'decision', decided_at, NULL FROM decisions WHERE detection_id = $1 ORDER BY 2", uuid.UUID(det))]
    assert r["expected"] == ["body", "pose"] and not r["missing"] and "degraded" not in r["flags"], timeline
    assert r["arrived"]["pose"] in ("ok", "no-evidence")
    pose = r["pose"]
    assert pose["ran"] is True and "uncertain" in pose["why"]
    # no AP-10K weights here: the keypoint model refused, so the regions fall back (flagged); the viewpoint
    # comes from the stack's trained classifier, or is unknown with the reason
    assert "pose-fallback" in r["flags"] and "pose-fallback" in pose["flags"]
    assert pose["versions"]["keypoints"] is None and pose["versions"]["viewpoint_classifier"].startswith("viewpoint:")
    assert pose["viewpoint"] in ("profile-left", "profile-right") and pose["source"] == "classifier" \
        or pose["viewpoint"] == "unknown" and "unsure" in pose["why_unknown"]
    stored = await db.fetchval("SELECT features FROM detection_features WHERE detection_id = $1 AND component = "
                               "'pose'", uuid.UUID(det))
    assert len(json.dumps(stored["attributes"])) < 1000  # small metadata: no vectors, no images

    # a black frame is answered (unknown, fallback), never blocked
    black = io.BytesIO()
    Image.new("RGB", (320, 240), (0, 0, 0)).save(black, format="JPEG")
    [dark] = await upload(stack, "black.jpg", black.getvalue(), "pose-dark-cam")
    [b] = await decided(stack, [dark])
    assert b["result"]["pose"]["viewpoint"] == "unknown" and "black-frame" in b["result"]["pose"]["flags"]
    assert "black-frame" in b["result"]["pose"]["why_unknown"] and "pose-fallback" in b["result"]["flags"]

    # a pose service that does not answer costs the join timeout, then the detection is decided degraded
    with paused(stack, "pose"):
        [slow] = await ingest(stack, nyala_paths[738:739], "pose-slow-cam")
        [p] = await decided(stack, [slow])
    assert p["result"]["missing"] == ["pose"] and "degraded" in p["result"]["flags"]
    assert p["result"]["pose"] == {"ran": False, "why": "requested; no answer before the join deadline"}

    # in fast mode pose is never asked for, and the result says so
    await set_config(stack, mode="fast")
    [fast] = await ingest(stack, nyala_paths[736:737], "pose-cam")
    [f] = await decided(stack, [fast])
    assert f["result"]["expected"] == ["body"] and not f["result"]["missing"]
    assert f["result"]["pose"] == {"ran": False, "why": "fast mode"}


async def test_hostile_pose_requests_and_features_are_dead_lettered(stack, db, nyala_paths):
    [target] = await ingest(stack, nyala_paths[781:782], "hostile-pose-cam")
    await decided(stack, [target])
    row = await db.fetchrow("SELECT * FROM detections WHERE id = $1", uuid.UUID(target))
    marker = uuid.uuid4().hex
    unasked = Features(component="pose", detection_id=row["id"], site=row["site"], property=row["property"],
                       camera=row["camera"], captured_at=row["captured_at"], cls=row["cls"],
                       attributes={"viewpoint": "profile-left"})
    producer = producer_for(stack.bootstrap, "test-hostile-pose")
    await producer.start()
    try:
        await producer.send_and_wait(POSE_REQUESTS.name, f'{{"kind": "detection", "junk": "{marker}"}}'.encode(),
                                     key=b"hostile")
        await producer.send_and_wait(FEATURES_POSE.name, unasked.to_bytes(), key=b"hostile")
    finally:
        await producer.stop()

    def ours(letters):
        return [x for x in letters if marker.encode() in x.payload or x.detection_id == row["id"]]
    letters = ours(await read_letters(stack.bootstrap, [dead_letter_of(POSE_REQUESTS).name,
                                                        dead_letter_of(FEATURES_POSE).name],
                                      lambda got: len(ours(got)) >= 2))
    by_service = {x.service: x for x in letters}
    assert "DetectionEvent" in by_service["pose"].reason and by_service["pose"].detection_id is None
    assert "not expected" in by_service["fusion"].reason and not by_service["fusion"].fails_detection
    assert (await db.fetchval("SELECT state FROM detections WHERE id = $1", row["id"])) == row["state"]


async def test_kill_9_of_fusion_with_joins_half_complete_decides_each_once(stack, db, nyala_paths, config):
    await set_config(stack, mode="enhanced", antler=True, ensemble=False)
    with paused(stack, "antler"):  # the test answers in the antler service's place, for half of them
        await _half_join_then_kill(stack, db, nyala_paths)


async def _half_join_then_kill(stack, db, nyala_paths):
    ids = await ingest(stack, nyala_paths[740:760], "halfjoin-cam", cls="buck")
    # wait until body features have joined some of them (state fusing), then answer half with antler
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        fusing = await db.fetch("SELECT id, site, property, camera, captured_at, cls FROM detections "
                                "WHERE id = ANY($1::uuid[]) AND state = 'fusing'", ids)
        if len(fusing) >= 2:
            break
        await asyncio.sleep(0.05)
    assert fusing, "no join was ever half complete"
    antler_for = fusing[: len(fusing) // 2 + 1]
    producer = producer_for(stack.bootstrap, "test-antler")
    await producer.start()
    try:
        for r in antler_for:
            event = Features(component="antler", detection_id=r["id"], site=r["site"], property=r["property"],
                             camera=r["camera"], captured_at=r["captured_at"], cls=r["cls"], status="no-evidence",
                             attributes={"season": "2025-rut", "casting_window": None, "present": None,
                                         "note": "test stand-in for the antler service"})
            await producer.send_and_wait(FEATURES_ANTLER.name, event.to_bytes(), key=r["property"].encode())
    finally:
        await producer.stop()
    child = stack.children["fusion"]
    restarts = child.restarts
    os.kill(child.process.pid, signal.SIGKILL)
    results = await decided(stack, ids)
    assert child.restarts >= restarts + 1
    await assert_exactly_once(db, ids, "halfjoin-cam")
    joined = await db.fetch("SELECT detection_id, component FROM detection_features WHERE detection_id = ANY($1::uuid[])",
                            ids)
    have = {(str(r["detection_id"]), r["component"]) for r in joined}
    assert all((i, "body") in have for i in ids)
    assert all((str(r["id"]), "antler") in have for r in antler_for)  # joined in time, or stored as late
    for d in results:
        has_antler = (d["id"], "antler") in have and "antler" in d["result"]["arrived"]
        assert ("degraded" in d["result"]["flags"]) != has_antler


async def test_switches_change_at_run_time_and_every_result_records_them(stack, db, nyala_paths, config):
    await set_config(stack, mode="enhanced", ensemble=False, temporal=False)
    ids = await ingest(stack, nyala_paths[770:772], "switch-cam")
    for d in await decided(stack, ids):
        r = d["result"]
        assert r["mode"] == "enhanced" and list(r["versions"]) == ["efficientnet_lite0"]
        assert r["switches"] == {"ensemble": False, "temporal": False, "coat": False, "pose": False, "antler": False}
    await set_config(stack, ensemble=True, temporal=True)
    ids = await ingest(stack, nyala_paths[772:774], "switch-cam")
    for d in await decided(stack, ids):
        r = d["result"]
        assert sorted(r["versions"]) == ["efficientnet_lite0", "efficientnet_lite1"]
        assert r["switches"]["temporal"] is True and r["switches"]["ensemble"] is True


async def read_letters(bootstrap: str, topics: list[str], done, timeout: float = 60) -> list[DeadLetter]:
    """Dead letters of `topics` from the beginning, until `done(letters)` or the timeout."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"test-letters-{uuid.uuid4()}")
    await consumer.start()
    letters: list[DeadLetter] = []
    try:
        deadline = time.monotonic() + timeout
        while not done(letters) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                letters.extend(DeadLetter.from_bytes(r.value) for r in records)
    finally:
        await consumer.stop()
    return letters


async def test_hostile_feature_events_are_dead_lettered_and_disturb_nothing(stack, db, nyala_paths):
    [target] = await ingest(stack, nyala_paths[780:781], "hostile-cam")
    [before] = await decided(stack, [target])
    row = await db.fetchrow("SELECT * FROM detections WHERE id = $1", uuid.UUID(target))
    decisions_before = await db.fetchval("SELECT count(*) FROM decisions")
    version = next(iter(before["result"]["versions"].values()))
    common = dict(detection_id=row["id"], site=row["site"], property=row["property"], camera=row["camera"],
                  captured_at=row["captured_at"], cls=row["cls"])

    def body(vec, **over):
        return Features(component="body", embeddings=[Embedding.of("efficientnet_lite0", version, vec, False)],
                        **{**common, **over})

    marker = uuid.uuid4().hex
    hostile = [
        (FEATURES_BODY, body(np.ones(1280, np.float32), detection_id=uuid.uuid4()).to_bytes(), "unknown detection"),
        (FEATURES_BODY, body(np.ones(640, np.float32)).to_bytes(), "640 dimensions"),
        (FEATURES_BODY, body(np.full(1280, np.nan, np.float32)).to_bytes(), "NaN"),
        (FEATURES_COAT, Features(component="coat", **common).to_bytes(), "not expected"),
        (FEATURES_BODY, body(np.ones(1280, np.float32), property="elsewhere").to_bytes(), "property"),
        (FEATURES_COAT, f'{{"kind": "features", "junk": "{marker}"}}'.encode(), "not a valid fusion input"),
    ]
    producer = producer_for(stack.bootstrap, "test-hostile")
    await producer.start()
    try:
        for topic, raw, _ in hostile:
            await producer.send_and_wait(topic.name, raw, key=b"hostile")
    finally:
        await producer.stop()
    def ours(letters):
        return [l for l in letters if l.service == "fusion" and l.at > before_time(row)]

    def all_seen(letters):
        reasons = " | ".join(l.reason for l in ours(letters))
        return all(why in reasons for _, _, why in hostile)

    ours = ours(await read_letters(stack.bootstrap, [dead_letter_of(FEATURES_BODY).name,
                                                     dead_letter_of(FEATURES_COAT).name], all_seen, timeout=60))
    reasons = " | ".join(l.reason for l in ours)
    for _, _, why in hostile:
        assert why in reasons, f"no dead letter saying {why!r}: {reasons}"
    assert all(not l.fails_detection for l in ours)
    after = await detection(stack, target)
    assert (after["state"], after["individual_id"], after["result"]) == \
        (before["state"], before["individual_id"], before["result"])
    assert await db.fetchval("SELECT count(*) FROM decisions") == decisions_before
    assert await db.fetchval("SELECT count(*) FROM detection_features WHERE detection_id = $1 AND component = 'coat'",
                             row["id"]) == 0


def before_time(row) -> datetime:
    return row["created_at"] if row["created_at"].tzinfo else row["created_at"].replace(tzinfo=timezone.utc)


async def test_frames_of_one_burst_are_one_sighting_and_one_individual(stack, db, nyala_paths, nyala_rows):
    await register(stack, "burst-cam", "burst")
    # two different animals' photos, as if one deer walked through a burst: the sighting decides (copies of
    # their own, so that no other test's upload of the same photo makes these duplicates)
    ids = {}
    for n, (path, at) in enumerate([(nyala_paths[800], "2025-06-01T06:00:00Z"),
                                    (nyala_paths[900], "2025-06-01T06:00:04Z")]):
        [ids[n]] = await upload(stack, f"b{n}.jpg", cropped(path, 0.98), "burst-cam", captured_at=at)
    # the burst decided before anything else reaches the property: whichever frame comes first has no
    # candidate and founds the individual (decided in one batch with a later photo, it could go to review)
    d = await decided(stack, [ids[0], ids[1]])
    [ids[2]] = await upload(stack, "b2.jpg", cropped(nyala_paths[1000], 0.98), "burst-cam",
                            captured_at="2025-06-01T06:05:00Z")  # minutes later: not the burst
    d += await decided(stack, [ids[2]])
    rows = {str(r["id"]): r["sighting"] for r in await db.fetch(
        "SELECT id, sighting FROM detections WHERE id = ANY($1::uuid[])", list(ids.values()))}
    assert rows[ids[0]] is not None and rows[ids[0]] == rows[ids[1]] != rows[ids[2]]
    # whichever frame fusion decided second joined the first's individual through the sighting
    assert d[1]["individual_id"] == d[0]["individual_id"]
    assert ["sighting" in x["result"]["flags"] for x in d[:2]].count(True) == 1
    assert d[1]["result"]["sighting"] == d[0]["result"]["sighting"] == str(rows[ids[0]])
    # an explicit burst key groups frames regardless of time; a frame with two animals joins no sighting
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, headers=stack.auth) as client:
        r = await client.post("/v1/uploads", data={"site": "burst-cam", "camera": "cam1", "sighting": "seq-7",
                                                    "captured_at": "2025-06-02T06:00:00Z"},
                              files=[("files", ("k1.jpg", cropped(nyala_paths[810], 0.98), "image/jpeg"))])
        k1 = r.json()["images"][0]["detections"][0]["id"]
        r = await client.post("/v1/uploads", data={"site": "burst-cam", "camera": "cam1", "sighting": "seq-7",
                                                    "captured_at": "2025-06-02T09:00:00Z"},
                              files=[("files", ("k2.jpg", cropped(nyala_paths[910], 0.98), "image/jpeg"))])
        k2 = r.json()["images"][0]["detections"][0]["id"]
        bad = await client.post("/v1/uploads", data={"site": "burst-cam", "sighting": "../etc",
                                                      "captured_at": "2025-06-02T09:00:00Z"},
                                files=[("files", ("k3.jpg", cropped(nyala_paths[911], 0.98), "image/jpeg"))])
    assert bad.status_code == 422 and "sighting" in bad.json()["error"]
    keyed = await decided(stack, [k1, k2])
    assert keyed[0]["individual_id"] == keyed[1]["individual_id"]
    data = cropped(nyala_paths[820])
    w, h = Image.open(io.BytesIO(data)).size
    pair = await upload(stack, "pair.jpg", data, "burst-cam", boxes=[[0, 0, w // 2, h], [w // 2, 0, w, h]],
                        captured_at="2025-06-01T06:00:02Z")
    assert await db.fetchval("SELECT count(*) FROM detections WHERE id = ANY($1::uuid[]) AND sighting IS NOT NULL",
                             pair) == 0
    await decided(stack, pair)


async def test_photos_with_only_a_fallback_time_are_never_one_sighting(stack, db, nyala_paths):
    ids = await ingest(stack, nyala_paths[830:833], "fallback-cam")  # one shared invented instant
    await decided(stack, ids)
    assert await db.fetchval("SELECT count(*) FROM detections WHERE id = ANY($1::uuid[]) AND sighting IS NOT NULL",
                             ids) == 0


async def test_coat_features_join_and_score_candidates_and_bad_crops_only_lose_coat(stack, db, nyala_rows, nyala_paths,
                                                                                    config):
    await register(stack, "coat-cam", "coat")
    await set_config(stack, mode="enhanced", coat=True, ensemble=False, temporal=False)
    # two photos of one nyala's left flank (two encounters), then an infrared (grey) copy and a tiny crop
    first = next(i for i, r in enumerate(nyala_rows) if r["viewpoint"] == "left")
    same = next(i for i, r in enumerate(nyala_rows) if i != first and r["identity"] == nyala_rows[first]["identity"]
                and r["viewpoint"] == "left")
    # re-encoded copies: uploads are content-addressed, and other tests upload the originals
    [a] = await upload(stack, "a.jpg", cropped(nyala_paths[first], keep=0.98), "coat-cam")
    [da] = await decided(stack, [a])
    [b] = await upload(stack, "b.jpg", cropped(nyala_paths[same]), "coat-cam")
    grey = io.BytesIO()
    Image.open(nyala_paths[same]).convert("L").convert("RGB").save(grey, format="JPEG", quality=90)
    [g] = await upload(stack, "grey.jpg", grey.getvalue(), "coat-cam")
    tiny = io.BytesIO()
    Image.open(nyala_paths[first]).convert("RGB").resize((28, 20)).save(tiny, format="JPEG")
    [t] = await upload(stack, "tiny.jpg", tiny.getvalue(), "coat-cam")
    db_, dg, dt = await decided(stack, [b, g, t])
    for d in (da, db_, dg, dt):
        r = d["result"]
        assert r["expected"] == ["body", "coat"] and "coat" in r["arrived"] and not r["missing"], r
    # the second photo was matched on coat against the first's individual (its exemplar), all three parts
    cand = next(c for c in db_["result"]["candidates"] if c["individual_id"] == da["individual_id"])
    for part in ("coat:colour", "coat:markings", "coat:pattern-xfeat", "coat:pattern-rootsift"):
        assert part in cand["components"], cand
    assert cand["components"]["coat:pattern-xfeat"]["raw"] is not None and cand["components"]["coat:colour"]["raw"] > 0
    assert cand["components"]["coat:pattern-rootsift"]["raw"] is not None
    assert db_["result"]["coat"]["exemplars_matched"] >= 1 and db_["result"]["coat"]["matching_ms"] > 0
    # infrared: flagged, and its grey levels never compared with the day photos' colour
    assert "coat:infrared" in dg["result"]["flags"]
    for c in dg["result"]["candidates"]:
        assert c["components"].get("coat:colour", {}).get("raw") is None
    # a tiny crop: no coat evidence, flagged, decided on body like any other
    assert dt["result"]["arrived"]["coat"] == "no-evidence" and "coat:tiny-crop" in dt["result"]["flags"]
    # patterns are stored compactly, as bytes, one row per detection and matcher
    sizes = await db.fetch("SELECT matcher, keypoints, octet_length(pattern) AS n FROM coat_patterns "
                           "WHERE detection_id = ANY($1::uuid[])", [uuid.UUID(x) for x in (a, b, g)])
    per_keypoint = {"xfeat": 4 + 64, "rootsift": 4 + 128}
    assert sorted(r["matcher"] for r in sizes) == ["rootsift"] * 3 + ["xfeat"] * 3
    assert all(r["n"] == 8 + per_keypoint[r["matcher"]] * r["keypoints"] and r["keypoints"] >= 5 for r in sizes)
    stored = await db.fetchval("SELECT features FROM detection_features WHERE detection_id = $1 AND component = 'coat'",
                               uuid.UUID(a))
    assert "patterns" not in stored["attributes"] and stored["attributes"]["marks"] is not None
    await assert_exactly_once(db, [a, b, g, t], "coat")

    # fusion's pattern cache: a pattern read once is held, and read again only its cached copy is used
    ids = [uuid.UUID(x) for x in (a, b, g, t)]
    plain = await store.coat_of(db, ids)
    cache = coat_features.PatternCache(64 << 20)
    first, again = await store.coat_of(db, ids, cache), await store.coat_of(db, ids, cache)
    assert len(cache) == 6 and first.keys() == again.keys() == plain.keys()
    for d, stored in plain.items():
        assert first[d]["features"] == stored["features"] and first[d]["status"] == stored["status"]
        for matcher, (version, raw) in stored["patterns"].items():
            assert isinstance(raw, bytes) and first[d]["patterns"][matcher][0] == version
            assert again[d]["patterns"][matcher][1] is first[d]["patterns"][matcher][1]  # not read or unpacked again
            np.testing.assert_array_equal(again[d]["patterns"][matcher][1].codes, coat_features.unpack(raw).codes)
    tight = coat_features.PatternCache(1)  # holds nothing: every pattern read and unpacked each time
    assert (await store.coat_of(db, ids, tight)).keys() == plain.keys() and len(tight) == 0


async def merged_while_fusion_waits(stack, db, prop: str, keep: int, absorb: int, upload_then) -> list[str]:
    """Hold the property's identity lock, upload through `upload_then()` and wait until fusion has scored the
    detection and waits for the lock; then merge `absorb` into `keep` as a person does (the API's own
    change, in the lock holder's transaction) and let fusion decide on what it scored before the merge."""
    from services.api import curation

    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", prop)
        ids = await upload_then()
        await until(lambda: db.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                                        "AND pid <> pg_backend_pid()"),
                    timeout=WAIT_S, every=0.1, what="fusion to come to the property lock")
        assert await db.fetchval("SELECT count(*) FROM detections WHERE id = ANY($1::uuid[]) AND state IN "
                                 "('assigned', 'new', 'review')", ids) == 0
        await curation.merge(db, "race-test", stack.settings.exemplars_per_individual, keep, absorb,
                             "merged while fusion was deciding")
    return ids


async def two_individuals(stack, site: str, first: bytes, second: bytes) -> tuple[int, int]:
    """Two individuals of the site's property, founded from two photos of different animals."""
    [a] = await decided(stack, await upload(stack, "a.jpg", first, site))
    [b] = await decided(stack, await upload(stack, "b.jpg", second, site, captured_at="2025-06-03T06:00:00Z"))
    if b["individual_id"] == a["individual_id"] or b["state"] != "new":  # the body took them for one: a person
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, headers=stack.auth) as client:
            r = await client.post(f"/v1/detections/{b['id']}/reassign", json={"action": "new"})
            assert r.status_code == 200, r.text
        b = await detection(stack, b["id"])
    assert a["state"] == "new" and b["individual_id"] not in (None, a["individual_id"])
    return a["individual_id"], b["individual_id"]


async def test_a_detection_never_joins_an_individual_merged_away_while_it_was_scored(stack, db, nyala_paths, config):
    await set_config(stack, mode="fast")
    await register(stack, "race-cam", "race")
    photo = nyala_paths[600]
    absorbed, kept = await two_individuals(stack, "race-cam", cropped(photo, 0.96, 91), cropped(nyala_paths[650]))
    # the same animal again: before the merge, its best candidate by far is the individual about to be absorbed
    [late] = await merged_while_fusion_waits(
        stack, db, "race", kept, absorbed,
        lambda: upload(stack, "c.jpg", cropped(photo, 0.94, 89), "race-cam", captured_at="2025-06-05T06:00:00Z"))
    [d] = await decided(stack, [late])
    assert d["individual_id"] != absorbed, "the detection joined an individual merged away under it"
    assert d["result"]["candidates"] and absorbed in d["result"]["cannot_link"], d["result"]["candidates"][:2]
    if d["individual_id"] is not None:
        assert await db.fetchval("SELECT merged_into FROM individuals WHERE id = $1", d["individual_id"]) is None
    assert await db.fetchval("SELECT count(*) FROM embeddings e JOIN individuals i ON i.id = e.individual_id "
                             "WHERE e.exemplar AND i.merged_into IS NOT NULL AND i.property = 'race'") == 0


async def test_a_frame_of_a_sighting_follows_its_earlier_frame_into_the_individual_it_was_merged_into(
        stack, db, nyala_paths, config):
    await set_config(stack, mode="fast")
    await register(stack, "race-burst", "race-burst")
    absorbed, kept = await two_individuals(stack, "race-burst", cropped(nyala_paths[610], 0.96, 91),
                                           cropped(nyala_paths[660]))
    [burst] = await decided(stack, await upload(stack, "f1.jpg", cropped(nyala_paths[610], 0.95, 88), "race-burst",
                                                captured_at="2025-06-07T06:00:00Z"))
    if burst["individual_id"] != absorbed:  # the first frame belongs to the individual about to be absorbed
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, headers=stack.auth) as client:
            r = await client.post(f"/v1/detections/{burst['id']}/reassign",
                                  json={"action": "assign", "individual_id": absorbed})
            assert r.status_code == 200, r.text
    [late] = await merged_while_fusion_waits(
        stack, db, "race-burst", kept, absorbed,
        lambda: upload(stack, "f2.jpg", cropped(nyala_paths[611], 0.95, 88), "race-burst",
                       captured_at="2025-06-07T06:00:03Z"))
    [d] = await decided(stack, [late])
    assert "sighting" in d["result"]["flags"], d["result"]["flags"]
    assert (d["state"], d["individual_id"]) == ("assigned", kept)
