"""Sites on the real stack: coordinates survive a PUT that leaves them out, and an upload racing a move
of its site never leaves the site's detections in two properties."""
from __future__ import annotations

import asyncio
import io

import asyncpg
import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.stack


def jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (seed % 256, 40, 90)).save(out, format="JPEG", comment=f"sites-{seed}".encode())
    return out.getvalue()


async def test_a_site_put_without_coordinates_keeps_the_stored_ones(stack):
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth) as client:
        r = await client.put("/v1/sites/keep-coords", json={"property": "coords-a", "lat": 45.25, "lon": -93.5})
        assert r.status_code == 200, r.text
        r = await client.put("/v1/sites/keep-coords", json={"property": "coords-b"})  # a move, no coordinates
        assert r.status_code == 200 and r.json() == {"name": "keep-coords", "property": "coords-b", "lat": 45.25,
                                                     "lon": -93.5}
        listed = {s["name"]: s for s in (await client.get("/v1/sites")).json()["sites"]}
        assert (listed["keep-coords"]["lat"], listed["keep-coords"]["lon"]) == (45.25, -93.5)
        r = await client.put("/v1/sites/keep-coords", json={"property": "coords-b", "lat": 46.0, "lon": -94.0})
        assert (r.json()["lat"], r.json()["lon"]) == (46.0, -94.0)  # given ones still replace them


async def test_an_upload_racing_a_move_of_its_site_lands_in_one_property(stack, db):
    site = "race-site"
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth, timeout=60) as client:
        assert (await client.put(f"/v1/sites/{site}", json={"property": "race-old"})).status_code == 200
        # A move in flight (what sites.put_site does: lock the row, find no detections, change it), held
        # open while an upload to the site arrives.
        mover = await asyncpg.connect(stack.dsn)
        try:
            tx = mover.transaction()
            await tx.start()
            assert await mover.fetchval("SELECT property FROM sites WHERE name = $1 FOR UPDATE", site) == "race-old"
            assert not await mover.fetchval("SELECT EXISTS (SELECT 1 FROM detections WHERE site = $1)", site)
            upload = asyncio.create_task(client.post(
                "/v1/uploads", data={"site": site, "camera": "c", "captured_at": "2025-11-02T06:00:00Z"},
                files=[("files", ("race.jpg", jpeg(1), "image/jpeg"))]))
            # the upload is in: its image row is being written inside its own transaction
            for _ in range(100):
                if await db.fetchval("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                                     "WHERE NOT l.granted AND a.datname = current_database()"):
                    break
                await asyncio.sleep(0.05)
            await mover.execute("INSERT INTO properties (name) VALUES ('race-new') ON CONFLICT DO NOTHING")
            await mover.execute("UPDATE sites SET property = 'race-new' WHERE name = $1", site)
            await tx.commit()
        finally:
            await mover.close()
        r = await upload
        assert r.status_code == 201, r.text
    site_property = await db.fetchval("SELECT property FROM sites WHERE name = $1", site)
    detection_properties = {r["property"] for r in await db.fetch("SELECT property FROM detections WHERE site = $1", site)}
    assert detection_properties == {site_property} == {"race-new"}
