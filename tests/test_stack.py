"""The whole system as `deer-reid up` runs it, with faults injected: nothing is lost, nothing done twice."""
from __future__ import annotations

import os
import signal

import pytest

from deer_reid.ingest import ingest as ingest_path
from deer_reid.ingest import upload_all, wait_terminal
from services.reconciler.relay import event_from_row
from shared.broker import producer_for
from shared.states import TERMINAL
from shared.topics import DETECTIONS
from tests.conftest import tar_of, zip_of
from tests.stack_helpers import WAIT_S, assert_exactly_once, ingest, ingest_through_fault, results_for, results_from_now, \
    until

pytestmark = pytest.mark.stack



async def test_upload_to_identity_end_to_end(stack, db, nyala_paths, nyala_rows):
    # two identities with several photos each, in upload order
    by_identity: dict[str, list] = {}
    for row, path in zip(nyala_rows, nyala_paths):
        by_identity.setdefault(row["identity"], []).append(path)
    paths = [p for ps in list(by_identity.values())[:3] for p in ps[:4]]
    ids = await ingest(stack, paths, "e2e")
    states = await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False)
    assert all(states[i] in TERMINAL for i in ids)
    counts = await assert_exactly_once(db, ids, "e2e")
    assert counts.get("new", 0) >= 1  # the first detection of an empty site founds an individual

    import httpx

    founder = next(i for i in ids if states[i] == "new")
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth) as client:
        det = (await client.get(f"/v1/detections/{founder}")).json()
    assert det["individual_id"] is not None and det["decided_by"] == "fusion"
    assert det["result"]["versions"]["efficientnet_lite0"].startswith("efficientnet_lite0:579344248a93")
    assert det["result"]["random_weights"] is False

    # the same image again: a no-op answered with the same detection
    again = await upload_all(stack.api_url, paths[:1], {"site": "e2e", "captured_at": "2025-11-01T06:00:00Z"},
                             progress=False, headers=stack.auth)
    assert again[0]["duplicate"] is True and again[0]["detections"][0]["id"] == ids[0]
    assert await db.fetchval("SELECT count(*) FROM detections WHERE site = 'e2e'") == len(ids)


async def test_ingest_of_a_folder_with_archives_reports_each_refusal_and_sends_the_rest(stack, db, nyala_paths,
                                                                                         tmp_path):
    """`deer-reid ingest FOLDER`: loose images and the images inside zip and tar archives are uploaded one
    a request; a hostile or unreadable entry is reported with its reason and the others go on."""
    photos = [p.read_bytes() for p in nyala_paths[40:44]]
    (tmp_path / "loose.jpg").write_bytes(photos[0])
    (tmp_path / "card1.zip").write_bytes(zip_of({"DCIM/a.jpg": photos[0], "../../escape.jpg": photos[1],
                                                 "DCIM/readme.txt": b"hi", "DCIM/broken.jpg": b"junk"}))
    (tmp_path / "card2.tar.gz").write_bytes(tar_of({"DCIM/b.jpg": photos[2], "DCIM/c.jpg": photos[3]},
                                                   links={"DCIM/l.jpg": "/etc/passwd"}))
    (tmp_path / "cut.tar").write_bytes(tar_of({"d.jpg": photos[0] * 3}, "w")[:3000])
    report = await ingest_path(stack.api_url, tmp_path, site="archives", camera="cam1",
                               captured_at="2025-11-01T06:00:00Z", wait=True, timeout=WAIT_S, progress=False,
                               headers=stack.auth)
    rejected = {r["path"].split("!")[-1].rsplit("/", 1)[-1]: r for r in report["rejected"]}
    assert "climbs" in rejected.pop("escape.jpg")["error"]
    assert "not an image" in rejected.pop("readme.txt")["error"]
    assert rejected.pop("broken.jpg")["status"] == 422  # the API's answer for that entry
    assert "link" in rejected.pop("l.jpg")["error"]
    assert "cannot be read on" in rejected.pop("cut.tar")["error"]
    assert rejected == {}
    # loose.jpg and a.jpg are one photo: the second is a duplicate of the first
    assert report["uploaded"] == 4 and report["duplicates"] == 1 and report["submitted"] == 4
    assert report["terminal"] == 4 and set(report["states"]) <= TERMINAL
    assert await db.fetchval("SELECT count(*) FROM images WHERE site = 'archives'") == 3


async def test_the_same_event_twice_has_no_second_effect(stack, db, nyala_paths):
    ids = await ingest(stack, nyala_paths[20:24], "twice")
    await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False)
    before = await db.fetch("SELECT id, state, individual_id, score FROM detections WHERE site = 'twice' ORDER BY id")
    individuals = await db.fetchval("SELECT count(*) FROM individuals WHERE site = 'twice'")

    rows = await db.fetch("SELECT * FROM detections WHERE id = ANY($1::uuid[])", ids)
    async with results_from_now(stack) as results:
        producer = producer_for(stack.bootstrap, "test")
        await producer.start()
        for row in rows:
            await producer.send_and_wait(DETECTIONS.name, event_from_row(row).to_bytes(), key=str(row["id"]).encode())
        await producer.stop()
        seen = await results_for(results, ids)
    assert set(ids) <= seen, "the redelivered events were not processed"
    after = await db.fetch("SELECT id, state, individual_id, score FROM detections WHERE site = 'twice' ORDER BY id")
    assert [dict(r) for r in after] == [dict(r) for r in before]
    assert await db.fetchval("SELECT count(*) FROM individuals WHERE site = 'twice'") == individuals
    await assert_exactly_once(db, ids, "twice")


async def test_enhanced_mode_is_switched_on_at_run_time(stack, db, nyala_paths):
    import httpx

    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth) as client:
        assert (await client.put("/v1/config", json={"mode": "enhanced"})).status_code == 200
        try:
            ids = await ingest(stack, nyala_paths[30:34], "switch")
            await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False)
        finally:
            await client.put("/v1/config", json={"mode": "fast"})
        results = [(await client.get(f"/v1/detections/{i}")).json()["result"] for i in ids]
    assert all(r["mode"] == "enhanced" for r in results)
    assert all(set(r["versions"]) == {"efficientnet_lite0", "efficientnet_lite1"} for r in results)
    rows = await db.fetch("SELECT model, count(*) AS n FROM embeddings WHERE detection_id = ANY($1::uuid[]) "
                          "GROUP BY model ORDER BY model", ids)
    assert [(r["model"], r["n"]) for r in rows] == [("efficientnet_lite0", 4), ("efficientnet_lite1", 4)]


FAULT_BATCH = 60


@pytest.mark.parametrize("service", ["body", "fusion", "reconciler", "api"])
async def test_kill_9_of_a_service_mid_ingest_loses_nothing(stack, db, nyala_paths, service):
    offset = 100 + ["body", "fusion", "reconciler", "api"].index(service) * FAULT_BATCH
    child = stack.children[service]
    restarts = child.restarts
    await ingest_through_fault(stack, db, nyala_paths[offset:offset + FAULT_BATCH], f"kill-{service}",
                               lambda: os.kill(child.process.pid, signal.SIGKILL))
    await until(lambda: child.restarts != restarts, timeout=10, every=0.1,
                what="the supervisor to restart the killed service")
    assert child.restarts == restarts + 1, "the supervisor restarted the killed service more than once"


async def test_broker_restarted_empty_mid_ingest_loses_nothing(stack, db, nyala_paths):
    log_path = stack.home / "logs" / "broker.log"
    restarts = stack.broker_restarts

    async def restarted_empty():  # by the supervisor, as under `deer-reid up`
        await until(lambda: stack.broker_restarts != restarts and stack.broker.process.poll() is None, timeout=30,
                    every=0.1, what="the supervisor to restart the broker")
        assert stack.broker_restarts == restarts + 1

    await ingest_through_fault(stack, db, nyala_paths[400:400 + FAULT_BATCH], "broker-restart", stack.broker.kill,
                               restarted_empty, wait_s=180)
    clashes = sum(1 for line in log_path.read_text(errors="replace").splitlines()
                  if "produce" in line and "AlreadyExists" in line and ".batch" in line)
    print(f"broker-restart: {clashes} produce clashes in Tansu after its restart, healed")

