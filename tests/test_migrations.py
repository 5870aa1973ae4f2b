"""Migrations carry existing data over: a database of the old shape gains properties without losing anything."""
from __future__ import annotations

import json
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared import db as shared_db


async def new_database_migrated_before(pg_dsn: str, monkeypatch, number: int) -> tuple[str, list]:
    """A new database of the shape before migration `number`: its address, and every migration (to apply the
    rest with `migrate` once `shared_db.migrations` is given them back)."""
    admin = await asyncpg.connect(pg_dsn)
    name = f"mig_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    dsn = urlunsplit(urlsplit(pg_dsn)._replace(path=f"/{name}"))
    every = shared_db.migrations()
    monkeypatch.setattr(shared_db, "migrations", lambda: [m for m in every if m[0] < number])
    await shared_db.migrate(dsn)
    return dsn, every


async def test_properties_migration_keeps_existing_individuals_and_detections(pg_dsn, monkeypatch):
    dsn, every = await new_database_migrated_before(pg_dsn, monkeypatch, 3)
    conn = await asyncpg.connect(dsn)
    try:
        det = uuid.uuid4()
        sha = "ab" * 32
        await conn.execute("""INSERT INTO images (sha256, byte_size, width, height, format, original_name, site, camera,
                                                  captured_at, time_source)
                              VALUES ($1, 1, 8, 8, 'JPEG', 'a.jpg', 'old-cam', 'c', now(), 'request')""", sha)
        ind = await conn.fetchval("""INSERT INTO individuals (site, sex, first_seen, last_seen, sightings)
                                     VALUES ('old-cam', 'female', now(), now(), 1) RETURNING id""")
        await conn.execute("""INSERT INTO detections (id, image_sha256, ordinal, box, cls, site, camera, captured_at,
                                                      crop, state, individual_id)
                              VALUES ($1, $2, 0, '{0,0,8,8}', 'doe', 'old-cam', 'c', now(), '\\x00', 'new', $3)""",
                           det, sha, ind)
        await conn.execute("""INSERT INTO embeddings (detection_id, version, model, dim, random_weights, vec, site,
                                                      individual_id, exemplar)
                              VALUES ($1, 'v', 'm', 3, false, '[1,0,0]', 'old-cam', $2, true)""", det, ind)
        monkeypatch.setattr(shared_db, "migrations", lambda: every)
        applied = await shared_db.migrate(dsn)
        assert applied == [m[1] for m in every if m[0] >= 3]
        assert await conn.fetchval("SELECT property FROM sites WHERE name = 'old-cam'") == "default"
        assert await conn.fetchval("SELECT property FROM individuals WHERE id = $1", ind) == "default"
        assert await conn.fetchval("SELECT property FROM detections WHERE id = $1", det) == "default"
        assert await conn.fetchval("SELECT property FROM embeddings WHERE detection_id = $1", det) == "default"
        switches = await conn.fetchval("SELECT value::text FROM runtime_config WHERE key = 'pipeline'")
        assert '"temporal": true' in switches and '"mode": "fast"' in switches
    finally:
        await conn.close()


async def test_the_xfeat_pattern_component_is_renamed_where_later_decisions_read_it(pg_dsn, monkeypatch):
    dsn, every = await new_database_migrated_before(pg_dsn, monkeypatch, 15)
    conn = await asyncpg.connect(dsn)
    try:
        sha = "cd" * 32
        await conn.execute("""INSERT INTO images (sha256, byte_size, width, height, format, original_name, site, camera,
                                                  captured_at, time_source)
                              VALUES ($1, 1, 8, 8, 'JPEG', 'a.jpg', 'cam', 'c', now(), 'request')""", sha)
        a, b = sorted([uuid.uuid4(), uuid.uuid4()])
        for ordinal, det in enumerate((a, b)):
            await conn.execute("""INSERT INTO detections (id, image_sha256, ordinal, box, cls, site, camera, captured_at,
                                                          crop, state, property)
                                  VALUES ($1, $2, $3, '{0,0,8,8}', 'doe', 'cam', 'c', now(), '\\x00', 'new', 'default')""",
                               det, sha, ordinal)
        await conn.execute("""INSERT INTO identity_edges (property, a, b, components, source)
                              VALUES ('default', $1, $2, '{"coat:pattern-xfeat": 0.4, "body:m": 0.8}', 'fusion')""", a, b)
        old = {"fusion": {"calibrations": {"coat:pattern-xfeat": {"x": [0, 1], "y": [0.1, 0.9], "prior": 0.2},
                                           "body:m": {"x": [0, 1], "y": [0.1, 0.9], "prior": 0.2}},
                          "weights": {"coat:pattern-xfeat": 0.5, "body:m": 1.0}, "intercept": 0.0}}
        cal = await conn.fetchval("INSERT INTO calibrations (artifact) VALUES ($1::jsonb) RETURNING id", json.dumps(old))
        monkeypatch.setattr(shared_db, "migrations", lambda: every)
        await shared_db.migrate(dsn)
        edge = json.loads(await conn.fetchval("SELECT components::text FROM identity_edges WHERE a = $1", a))
        assert edge == {"coat:pattern-xfeat": 0.4, "body:m": 0.8}
        fusion = json.loads(await conn.fetchval("SELECT artifact::text FROM calibrations WHERE id = $1", cal))["fusion"]
        assert fusion["calibrations"] == {"coat:pattern-xfeat": old["fusion"]["calibrations"]["coat:pattern-xfeat"],
                                          "body:m": old["fusion"]["calibrations"]["body:m"]}
        assert fusion["weights"] == {"coat:pattern-xfeat": 0.5, "body:m": 1.0}
    finally:
        await conn.close()
