"""`deer-reid backup` of the running stack and `deer-reid restore` into an empty home: individuals,
decisions, the audit log, names and exemplars identical, and a stack on the restored home keeps deciding."""
from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import httpx
import pytest

from deer_reid.cli import main
from deer_reid.ingest import wait_terminal
from shared.embedded import EmbeddedPostgres, free_port
from shared.states import TERMINAL
from tests.stack_helpers import WAIT_S, ingest, supervised
from tests.megadetector_tool import reencoded

pytestmark = pytest.mark.stack
PROP = "backup-prop"


def copies(folder, photos, tag: str) -> list:
    """Byte copies of the photos of this test's own (no other test's upload makes them duplicates)."""
    paths = []
    for i, photo in enumerate(photos):
        p = folder / f"{tag}-{i}.jpg"
        p.write_bytes(reencoded(photo, f"{tag}/{i}"))
        paths.append(p)
    return paths


async def census_of(dsn: str, prop: str, *, audit_of_prop: bool = False) -> dict:
    """What a restore must give back, row for row (the audit log whole, or only the property's)."""
    conn = await asyncpg.connect(dsn)
    try:
        def rows(records):
            return sorted(tuple(str(v) for v in r.values()) for r in records)

        return {
            "individuals": rows(await conn.fetch(
                "SELECT id, name, notes, tags, sex, sightings, merged_into, created_by FROM individuals "
                "WHERE property = $1", prop)),
            "decisions": rows(await conn.fetch(
                "SELECT id, state, individual_id, decided_by, score FROM detections WHERE property = $1", prop)),
            "audit": rows(await conn.fetch("SELECT id, at, actor, action, property, reason, before, after, undone_by "
                                           "FROM audit_log WHERE NOT $1 OR property = $2", audit_of_prop, prop)),
            "decided": rows(await conn.fetch(
                "SELECT c.id, c.detection_id, c.decided_by, c.state, c.individual_id, c.actor, c.audit_id FROM "
                "decisions c JOIN detections d ON d.id = c.detection_id WHERE d.property = $1", prop)),
            "exemplars": rows(await conn.fetch(
                "SELECT e.detection_id, e.version, e.exemplar FROM embeddings e JOIN detections d "
                "ON d.id = e.detection_id WHERE d.property = $1", prop)),
        }
    finally:
        await conn.close()


async def test_backup_then_restore_into_an_empty_home_gives_the_same_census_and_it_keeps_deciding(
        stack, db, nyala_paths, tmp_path, monkeypatch, capsys):
    ids = await ingest(stack, copies(tmp_path, nyala_paths[70:74], "backup"), "backup-cam", prop=PROP)
    states = await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False)
    assert all(states[i] in TERMINAL for i in ids)
    individual = await db.fetchval("SELECT individual_id FROM detections WHERE id = $1 AND individual_id IS NOT NULL",
                                   ids[0]) or await db.fetchval(
        "SELECT individual_id FROM detections WHERE property = $1 AND individual_id IS NOT NULL LIMIT 1", PROP)
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth) as client:
        r = await client.patch(f"/v1/individuals/{individual}", json={"name": "Old Broken-Tine", "tags": ["keep"]})
        assert r.status_code == 200, r.text

    monkeypatch.setenv("DEER_HOME", str(stack.home))
    monkeypatch.delenv("DEER_DATABASE_URL", raising=False)
    monkeypatch.setenv("DEER_MODEL_CACHE", str(stack.settings.model_cache))
    out = tmp_path / "backup"
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["backup", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    before = await census_of(stack.dsn, PROP)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"]["detections"] >= len(ids) and report["database_bytes"] > 0
    assert any(f.startswith("blobs/") for f in manifest["files"])
    assert any(f.startswith("models/") for f in manifest["files"])  # the trained viewpoint classifier
    figures = (f"BACKUP {report['files']} files, {report['bytes'] / 2**20:.1f} MiB, dump {report['dump_s']} s, "
               f"total {report['total_s']} s")

    # a damaged backup is refused before anything is restored; a home in use is refused without --force
    home = tmp_path / "restored-home"
    damaged = tmp_path / "damaged"
    import shutil
    shutil.copytree(out, damaged)
    blob = next(p for p in (damaged / "blobs").rglob("*") if p.is_file())
    blob.write_bytes(b"bit rot")
    monkeypatch.setenv("DEER_HOME", str(home))
    monkeypatch.setenv("DEER_MODEL_CACHE", str(tmp_path / "restored-models"))
    assert await asyncio.to_thread(main, ["restore", str(damaged)]) == 2
    assert "checksum does not match" in capsys.readouterr().err and not home.exists()
    (home / "something").mkdir(parents=True)
    assert await asyncio.to_thread(main, ["restore", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    started = time.monotonic()
    assert await asyncio.to_thread(main, ["restore", str(out), "--force"]) == 0
    restored = json.loads(capsys.readouterr().out)
    figures += f"; RESTORE {restored['files']} files in {time.monotonic() - started:.1f} s"
    assert restored["rows_match_backup"] is True, restored

    pg = EmbeddedPostgres(home / "pg")
    dsn = pg.start()
    try:
        assert await census_of(dsn, PROP) == before
    finally:
        pg.stop()

    # a stack on the restored home decides new photos of the property, after what was restored
    from deer_reid.stack import Stack
    from shared.config import Settings

    settings = Settings(home=home, api_port=free_port(), body_model="efficientnet_lite0",
                        model_cache=tmp_path / "restored-models")
    second = Stack(settings, env={"DEER_JOIN_TIMEOUT_S": "5", "DEER_CENSUS_AFTER_DECISIONS": "1000000",
                                  "DEER_CENSUS_EVERY_S": "31536000"})
    monkeypatch.delenv("DEER_HOME")
    await asyncio.to_thread(second.start)
    try:
        with supervised(second):
            fresh = tmp_path / "after.jpg"
            fresh.write_bytes(reencoded(nyala_paths[74], "backup/after"))
            new_ids = await ingest(second, [fresh], "backup-cam", prop=PROP)
            states = await wait_terminal(second.api_url, new_ids, timeout=WAIT_S, progress=False)
            assert states[new_ids[0]] in ("assigned", "new", "review"), states
            conn = await asyncpg.connect(second.dsn)
            try:
                named = await conn.fetchval("SELECT name FROM individuals WHERE id = $1", individual)
                newest = await conn.fetchval("SELECT individual_id FROM detections WHERE id = $1", new_ids[0])
            finally:
                await conn.close()
        assert named == "Old Broken-Tine"
        restored_ids = {int(r[0]) for r in before["individuals"]}
        assert newest is None or newest in restored_ids or newest > max(restored_ids)  # ids go on, none reused
    finally:
        await asyncio.to_thread(second.stop)
    capsys.readouterr()
    with capsys.disabled():
        print(f"\n{figures}")


async def test_a_propertys_backup_holds_that_property_only_and_restores_it_whole(
        stack, db, nyala_paths, tmp_path, monkeypatch, capsys):
    part, other = "backup-part", "backup-other"
    ids = await ingest(stack, copies(tmp_path, nyala_paths[80:83], part), "part-cam", prop=part)
    other_ids = await ingest(stack, copies(tmp_path, nyala_paths[85:86], other), "other-cam", prop=other)
    await wait_terminal(stack.api_url, ids + other_ids, timeout=WAIT_S, progress=False)
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth) as client:
        r = await client.post(f"/v1/detections/{ids[1]}/reassign", json={"action": "new", "reason": "my call"})
        assert r.status_code == 200, r.text
        founded = r.json()["after"]["founded"]
        r = await client.patch(f"/v1/individuals/{founded}", json={"name": "Lefty"})
        assert r.status_code == 200, r.text

    monkeypatch.setenv("DEER_HOME", str(stack.home))
    monkeypatch.delenv("DEER_DATABASE_URL", raising=False)
    monkeypatch.setenv("DEER_MODEL_CACHE", str(stack.settings.model_cache))
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["backup", str(tmp_path / "none"), "--property", "no-such-place"]) == 2
    assert "no property 'no-such-place'" in capsys.readouterr().err
    out = tmp_path / "part-backup"
    assert await asyncio.to_thread(main, ["backup", str(out), "--property", part]) == 0
    report = json.loads(capsys.readouterr().out)
    before = await census_of(stack.dsn, part, audit_of_prop=True)
    manifest = json.loads((out / "manifest.json").read_text())
    images = {r["image_sha256"] for r in await db.fetch("SELECT image_sha256 FROM detections WHERE property = $1",
                                                        part)}
    assert manifest["property"] == part and report["rows"]["detections"] == len(ids)
    assert {f.rsplit("/", 1)[-1] for f in manifest["files"] if f.startswith("blobs/")} == images
    assert "tables/api_keys.copy" not in manifest["files"] and "tables/detections.copy" in manifest["files"]

    home = tmp_path / "part-home"
    monkeypatch.setenv("DEER_HOME", str(home))
    monkeypatch.setenv("DEER_MODEL_CACHE", str(tmp_path / "part-models"))
    assert await asyncio.to_thread(main, ["restore", str(out)]) == 0
    restored = json.loads(capsys.readouterr().out)
    assert restored["rows_match_backup"] is True, restored
    assert sum(1 for p in (home / "blobs").rglob("*") if p.is_file()) == len(images)
    pg = EmbeddedPostgres(home / "pg")
    dsn = pg.start()
    try:
        assert await census_of(dsn, part, audit_of_prop=True) == before
        conn = await asyncpg.connect(dsn)
        try:
            for table in ("detections", "individuals", "sites", "audit_log", "identity_edges"):
                assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE property <> $1", part) == 0, table
            assert await conn.fetchval("SELECT count(*) FROM images WHERE site NOT IN "
                                       "(SELECT name FROM sites WHERE property = $1)", part) == 0
            assert await conn.fetchval("SELECT count(*) FROM api_keys") == 0
            # a camera nobody registered joins the `default` property, as on any stack
            await conn.execute("INSERT INTO sites (name, property) VALUES ('unregistered-cam', 'default')")
            assert await conn.fetchval("SELECT name FROM individuals WHERE id = $1", founded) == "Lefty"
            # the id counters go on past the restored ids: nothing founded later reuses one
            top = await conn.fetchval("SELECT max(id) FROM individuals")
            assert await conn.fetchval("SELECT nextval(pg_get_serial_sequence('individuals', 'id'))") > top
        finally:
            await conn.close()
    finally:
        pg.stop()
