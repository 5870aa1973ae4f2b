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


async def census_of(dsn: str, prop: str) -> dict:
    """What a restore must give back, row for row."""
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
                                           "FROM audit_log")),
            "exemplars": rows(await conn.fetch(
                "SELECT e.detection_id, e.version, e.exemplar FROM embeddings e JOIN detections d "
                "ON d.id = e.detection_id WHERE d.property = $1", prop)),
        }
    finally:
        await conn.close()


async def test_backup_then_restore_into_an_empty_home_gives_the_same_census_and_it_keeps_deciding(
        stack, db, nyala_paths, tmp_path, monkeypatch, capsys):
    paths = []
    for i in range(4):
        p = tmp_path / f"b{i}.jpg"
        p.write_bytes(reencoded(nyala_paths[70 + i], f"backup/{i}"))
        paths.append(p)
    ids = await ingest(stack, paths, "backup-cam", prop=PROP)
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
