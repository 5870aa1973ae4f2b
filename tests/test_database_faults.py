"""The database as a fault: PostgreSQL killed with SIGKILL under the API (503 with Retry-After, never a
500, nothing half-stored, back by itself), under the running stack (the supervisor restarts it, every
service reconnects without a restart of its own, and detections are decided again), and a full image
store (507 with the reason)."""
from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from deer_reid.ingest import wait_terminal
from shared.states import TERMINAL
from tests.stack_helpers import WAIT_S, ingest, row_counts, until
from tests.megadetector_tool import reencoded

UPLOADED = ("images", "detections", "outbox")
FIELDS = {"site": "db-fault", "camera": "c", "captured_at": "2025-11-04T06:00:00Z"}


def jpeg(seed: int, side: int = 64) -> bytes:
    out = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype="uint8")).save(out, format="JPEG", quality=95)
    return out.getvalue()


@pytest.fixture
async def own_database(tmp_path_factory):
    """A PostgreSQL of this test's own, to kill (in a short folder: its unix socket lives there, and a long
    path would put it in a folder other servers share)."""
    from shared.db import migrate
    from shared.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pgf") / "pg")
    dsn = await asyncio.to_thread(pg.start)
    await migrate(dsn)
    yield pg, dsn
    if pg.alive():
        await asyncio.to_thread(pg.stop)


async def restarted(pg) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            await asyncio.to_thread(pg.restart)
            return
        except Exception:  # noqa: BLE001 - the dead server's backends are still exiting
            assert time.monotonic() < deadline, "PostgreSQL did not start again"
            await asyncio.sleep(0.5)


async def test_uploads_while_the_database_is_down_answer_503_and_store_nothing(own_database, tmp_path):
    from services.api.app import create_app
    from services.api.auth import create_key
    from shared.config import Settings
    from shared.db import create_pool

    pg, dsn = own_database
    app = create_app(Settings(home=tmp_path / "home", database_url=dsn))
    app.state.pool = await create_pool(dsn)
    _, key = await create_key(app.state.pool, "ranger", "admin")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api",
                                 headers={"Authorization": f"Bearer {key}"}) as api:
        def upload(seed):
            return api.post("/v1/uploads", data=FIELDS, files=[("files", (f"{seed}.jpg", jpeg(seed), "image/jpeg"))])

        assert (await upload(1)).status_code == 201
        os.kill(pg.pid, signal.SIGKILL)
        await until(lambda: not pg.alive(), timeout=30, what="the postmaster to die")
        for seed in (2, 3):
            r = await upload(seed)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "5" and "database" in r.json()["error"]
        health = await api.get("/healthz")
        assert health.status_code == 503 and health.json()["ready"] is False
        await restarted(pg)
        # the pool reconnects by itself: the API process is never restarted
        r = await until(lambda: upload(4), lambda r: r.status_code != 503, timeout=30, every=0.5,
                        what="the API to take uploads again")
        assert r.status_code == 201, r.text
        assert (await api.get("/healthz")).status_code == 200
        metrics = (await api.get("/metrics")).text
        assert 'deer_errors_total{kind="database-away",service="api"}' in metrics
    await app.state.pool.close()
    assert await row_counts(dsn, UPLOADED) == {"images": 2, "detections": 2, "outbox": 2}  # 1 and 4; nothing of 2 and 3


async def test_a_full_image_store_refuses_uploads_507_and_nothing_else(own_database, tmp_path):
    from services.api.app import create_app
    from services.api.auth import create_key
    from shared.config import Settings
    from shared.db import create_pool

    _, dsn = own_database
    store = tmp_path / "small-disk"
    store.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(store)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"a full disk needs a small tmpfs (run the tests as root): {mounted.stderr}"
    try:
        app = create_app(Settings(home=tmp_path / "home", database_url=dsn, blob_dir=store))
        app.state.pool = await create_pool(dsn)
        _, key = await create_key(app.state.pool, "ranger", "admin")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api",
                                     headers={"Authorization": f"Bearer {key}"}) as api:
            big = jpeg(7, side=700)  # over 500 KB of noise: more than the store holds
            assert len(big) > 300 * 1024
            r = await api.post("/v1/uploads", data=FIELDS, files=[("files", ("big.jpg", big, "image/jpeg"))])
            assert r.status_code == 507 and "full" in r.json()["error"], r.text
            assert [p for p in store.rglob("*") if p.is_file()] == []  # no partial file stays behind
            assert await row_counts(dsn, UPLOADED) == {"images": 0, "detections": 0, "outbox": 0}
            small = await api.post("/v1/uploads", data=FIELDS, files=[("files", ("s.jpg", jpeg(8), "image/jpeg"))])
            assert small.status_code == 201  # the rest of the API is undisturbed
        await app.state.pool.close()
    finally:
        subprocess.run(["umount", str(store)], check=True)


@pytest.mark.stack
async def test_the_stack_brings_postgres_back_and_every_service_reconnects_on_its_own(stack, db, nyala_paths,
                                                                                      tmp_path):
    restarts = {name: child.restarts for name, child in stack.children.items()}
    before = stack.postgres_restarts
    os.kill(stack.postgres.pid, signal.SIGKILL)
    await until(lambda: stack.postgres_restarts, lambda n: n > before, timeout=90,
                what="the supervisor to restart PostgreSQL")

    async def api_ready():
        async with httpx.AsyncClient(base_url=stack.api_url) as client:
            try:
                return (await client.get("/healthz")).status_code
            except httpx.HTTPError:
                return None

    await until(api_ready, lambda status: status == 200, timeout=60, what="the API to be ready again")
    paths = []
    for i in range(3):
        p = tmp_path / f"after-{i}.jpg"
        p.write_bytes(reencoded(nyala_paths[80 + i], f"db-fault/{i}"))
        paths.append(p)
    ids = await ingest(stack, paths, "db-fault-cam")
    states = await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False)
    assert all(states[i] in TERMINAL and states[i] != "failed" for i in ids), states
    assert {name: child.restarts for name, child in stack.children.items()} == restarts
