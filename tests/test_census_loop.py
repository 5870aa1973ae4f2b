"""The census service's loop on a real PostgreSQL of its own: runs on its own after enough decisions, not
after its own moves, not while a property holds it, and after a run that died."""
from __future__ import annotations

import asyncpg
import pytest

from deer_reid.census_bench import PROPERTY, _load, fitted_artifact
from deer_reid.gallery_bench import synthetic_gallery
from services.census.service import CensusWorker
from shared.config import Settings
from shared.db import create_pool, migrate


@pytest.fixture
async def census_db(pg_dsn):
    """A database of this test's own on the session's server (the stack's tests never see its runs)."""
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("DROP DATABASE IF EXISTS census_loop")
    await admin.execute("CREATE DATABASE census_loop")
    await admin.close()
    dsn = pg_dsn.replace("/postgres?", "/census_loop?")
    assert dsn != pg_dsn
    await migrate(dsn)
    yield dsn
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("DROP DATABASE census_loop WITH (FORCE)")
    await admin.close()


async def test_the_loop_reclusters_when_due_and_only_then(census_db):
    vectors, owner, _ = synthetic_gallery(60, 64, 12, 1, seed=3, rank=8)
    pool = await create_pool(census_db, max_size=2)
    worker = CensusWorker(pool, Settings(database_url=census_db, census_after_decisions=50, census_every_s=3600))
    try:
        await _load(pool, vectors, owner)  # 60 detections, each founded its own individual: 60 decisions
        await pool.execute("INSERT INTO calibrations (artifact, created_by) VALUES ($1, 'test')",
                           fitted_artifact(vectors, owner))

        async def runs() -> list:
            return await pool.fetch("SELECT id, state, requested_by FROM census_runs WHERE property = $1 ORDER BY id",
                                    PROPERTY)

        await worker.step()
        first = await runs()
        assert [(r["state"], r["requested_by"].startswith("schedule")) for r in first] == [("done", True)]
        assert await pool.fetchval("SELECT count(*) FROM detections WHERE decided_by = 'recluster'") > 0
        await worker.step()  # its own moves are not new decisions: nothing is due
        assert len(await runs()) == 1

        # held: new decisions wait until the property lets the census run on its own again
        await pool.execute("UPDATE properties SET census_auto = false WHERE name = $1", PROPERTY)
        await pool.execute("INSERT INTO decisions (detection_id, decided_by, state, individual_id) "
                           "SELECT id, 'fusion', state, individual_id FROM detections WHERE property = $1", PROPERTY)
        await worker.step()
        assert len(await runs()) == 1
        await pool.execute("UPDATE properties SET census_auto = true WHERE name = $1", PROPERTY)
        await worker.step()
        assert [r["state"] for r in await runs()] == ["done", "done"]

        # a run left `running` by a process that died: abandoned, and the work done by a new run
        dead = await pool.fetchval("INSERT INTO census_runs (property, state, started_at) "
                                   "VALUES ($1, 'running', now()) RETURNING id", PROPERTY)
        await worker.step()
        after = {r["id"]: r["state"] for r in await runs()}
        assert after[dead] == "abandoned" and list(after.values())[-1] == "done" and len(after) == 4
    finally:
        await pool.close()
