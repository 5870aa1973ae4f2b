"""Migrations carry existing data over: a database of the old shape gains properties without losing anything."""
from __future__ import annotations

import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared import db as shared_db


async def test_properties_migration_keeps_existing_individuals_and_detections(pg_dsn, monkeypatch):
    admin = await asyncpg.connect(pg_dsn)
    name = f"mig_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    dsn = urlunsplit(urlsplit(pg_dsn)._replace(path=f"/{name}"))
    every = shared_db.migrations()
    monkeypatch.setattr(shared_db, "migrations", lambda: [m for m in every if m[0] < 3])
    await shared_db.migrate(dsn)
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
