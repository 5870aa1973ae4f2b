"""Helpers of the tests that drive the whole stack: sites, uploads, and the exactly-once checks."""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import time

from deer_reid.ingest import upload_all, wait_terminal
from shared.states import TERMINAL

WAIT_S = 300


async def register(stack, site: str, prop: str | None = None, lat=None, lon=None) -> None:
    """Put a test's site in a property of its own (by default named after it): tests never share individuals."""
    import httpx

    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth) as client:
        r = await client.put(f"/v1/sites/{site}", json={"property": prop or site, "lat": lat, "lon": lon})
        assert r.status_code == 200, r.text


async def ingest(stack, paths, site, cls="doe", fallback_captured_at="2025-11-01T06:00:00Z", prop: str | None = None):
    """Upload paths one per request as the CLI does; returns the detection ids."""
    await register(stack, site, prop)
    # a fallback time, as `deer-reid ingest --captured-at` sends: photos without a real time of their own
    # (one shared instant) are never grouped into one sighting
    fields = {"site": site, "camera": "cam1", "fallback_captured_at": fallback_captured_at, "cls": cls}
    results = await upload_all(stack.api_url, paths, fields, concurrency=4, progress=False, headers=stack.auth)
    rejected = [r for r in results if "error" in r]
    assert not rejected, rejected[:3]
    return [d["id"] for r in results for d in r["detections"]]


@contextlib.contextmanager
def paused(stack, service: str):
    """The service stops answering (SIGSTOP: alive, so the supervisor leaves it be) until the block ends."""
    pid = stack.children[service].process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def throttled(stack, service: str, run_s: float, stop_s: float):
    """The service runs `run_s` of every `run_s + stop_s` seconds (SIGSTOP, SIGCONT) until the block ends:
    slow, yet its queue flows."""
    pid = stack.children[service].process.pid

    async def cycle():
        while True:
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(stop_s)
            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(run_s)

    task = asyncio.create_task(cycle())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        os.kill(pid, signal.SIGCONT)


async def assert_exactly_once(db, ids: list[str], prop: str) -> dict[str, int]:
    """Every detection terminal and not failed; decided once; the property's individuals' sightings add up."""
    rows = await db.fetch("SELECT id, state, state_reason FROM detections WHERE id = ANY($1::uuid[])", ids)
    assert len(rows) == len(ids)
    states = {}
    for r in rows:
        assert r["state"] in TERMINAL
        assert r["state"] != "failed", r["state_reason"]
        states[r["state"]] = states.get(r["state"], 0) + 1
    per_detection = await db.fetch(
        "SELECT detection_id, count(*) AS n, count(DISTINCT version) AS versions FROM embeddings "
        "WHERE detection_id = ANY($1::uuid[]) GROUP BY 1", ids)
    assert len(per_detection) == len(ids) and all(r["n"] == r["versions"] >= 1 for r in per_detection)
    decided = await db.fetch(
        "SELECT detection_id, count(*) AS n FROM decisions WHERE detection_id = ANY($1::uuid[]) GROUP BY 1", ids)
    assert len(decided) == len(ids) and all(r["n"] == 1 for r in decided), "a detection was decided twice"
    sightings = await db.fetchval("SELECT coalesce(sum(sightings), 0) FROM individuals WHERE property = $1", prop)
    placed = await db.fetchval(
        "SELECT count(*) FROM detections WHERE property = $1 AND state IN ('assigned', 'new')", prop)
    assert sightings == placed
    founded = await db.fetchval("SELECT count(*) FROM individuals WHERE property = $1", prop)
    assert founded == states.get("new", 0), (founded, states)
    return states


async def fault_when_started(db, site: str, fault) -> int:
    """Inject `fault` once the site's first detection is decided; returns how many were terminal then."""
    done = await until(lambda: db.fetchval(
        "SELECT count(*) FROM detections WHERE site = $1 AND state IN ('assigned', 'new', 'review', 'failed')", site),
        timeout=120, what=f"anything of {site} to be processed", every=0.02)  # soon: the fault must come mid-ingest
    fault()
    return done


async def ingest_through_fault(stack, db, paths, site: str, fault, recover=None, wait_s: float = WAIT_S) -> dict:
    """Ingest `paths` with `fault` injected mid-way (and `recover` after it); asserts nothing is lost."""
    upload = asyncio.create_task(ingest(stack, paths, site))
    done_at_fault = await fault_when_started(db, site, fault)
    if recover is not None:
        await recover()
    ids = await upload
    assert done_at_fault < len(paths), "the fault came after the ingest, not in the middle of it"
    states = await wait_terminal(stack.api_url, ids, timeout=wait_s, progress=False)
    waiting = [i for i in ids if states.get(i) not in TERMINAL]
    if waiting:  # say where the stragglers stand (state, since when, why) before failing
        rows = await db.fetch("SELECT state, state_reason, updated_at, now() - updated_at AS idle FROM detections "
                              "WHERE id = ANY($1::uuid[]) ORDER BY updated_at LIMIT 5", waiting)
        raise AssertionError(f"{len(waiting)} of {len(ids)} not terminal after {wait_s} s: "
                             f"{[dict(r) for r in rows]}")
    assert len(ids) == len(paths)
    counts = await assert_exactly_once(db, ids, site)
    print(f"\nFAULT {site}: submitted {len(ids)}, decided before the fault {done_at_fault}, lost 0, states {counts}")
    return counts


async def until(read, ok=bool, timeout: float = 60.0, what: str = "the database", every: float = 0.2):
    """Poll `read()` (awaited when it returns an awaitable) every `every` seconds until `ok(value)`; the
    value, or AssertionError naming `what` and the last value at the timeout."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = read()
        if inspect.isawaitable(value):
            value = await value
        if ok(value):
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {value!r})")


@contextlib.asynccontextmanager
async def results_from_now(stack):
    """A reader of the results topic from its end as it is now: what is published after this point and
    nothing before. No consumer group, so no rebalance to wait for: the partitions are assigned and placed
    at their end offsets before the block runs."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from shared.topics import RESULTS

    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(RESULTS.name, p) for p in range(RESULTS.partitions)]
        consumer.assign(partitions)
        for tp, offset in (await consumer.end_offsets(partitions)).items():
            consumer.seek(tp, offset)
        yield consumer
    finally:
        await consumer.stop()


async def results_for(consumer, ids, timeout: float = 120.0) -> set[str]:
    """The detection ids among `ids` whose result the reader sees within `timeout` seconds."""
    from shared.schemas import DetectionResult

    wanted, seen = {str(i) for i in ids}, set()
    deadline = time.monotonic() + timeout
    while not wanted <= seen and time.monotonic() < deadline:
        for records in (await consumer.getmany(timeout_ms=500)).values():
            seen.update(str(DetectionResult.from_bytes(r.value).detection_id) for r in records)
    return seen & wanted


@contextlib.contextmanager
def supervised(stack):
    """The supervisor's loop (a crashed service restarted, the broker and PostgreSQL brought back) in a thread,
    as `deer-reid up` runs it, until the block ends."""
    import threading

    stop = threading.Event()

    def supervise():
        while not stop.is_set():
            stack.supervise_once()
            time.sleep(0.3)

    thread = threading.Thread(target=supervise, daemon=True)
    thread.start()
    try:
        yield stack
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def api_on_new_database(server_dsn: str, home, owner: str = "tester", **settings):
    """A deer-reid API served over HTTP on a new, migrated database of the server at `server_dsn` (no broker,
    no services): an empty stack's front door. Yields {url, dsn, key (an admin key), blobs}."""
    import threading
    import urllib.parse

    import asyncpg
    import uvicorn

    from services.api.app import create_app
    from services.api.auth import create_key
    from shared.config import Settings
    from shared.db import create_pool, migrate
    from shared.embedded import free_port

    name = f"api_{int(time.time() * 1000)}"
    dsn = urllib.parse.urlunsplit(urllib.parse.urlsplit(server_dsn)._replace(path=f"/{name}"))

    async def prepare() -> str:
        conn = await asyncpg.connect(server_dsn)
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()
        await migrate(dsn)
        pool = await create_pool(dsn, max_size=1)
        try:
            return (await create_key(pool, owner, "admin"))[1]
        finally:
            await pool.close()

    key = asyncio.run(prepare())
    port = free_port()
    config = Settings(home=home, database_url=dsn, api_port=port, **settings)
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.1)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "dsn": dsn, "key": key, "blobs": config.blobs}
    finally:
        server.should_exit = True
        thread.join(timeout=15)


async def row_counts(dsn: str, tables: tuple[str, ...]) -> dict[str, int]:
    """{table: rows} of the database at `dsn` (what a refused request must leave as it was)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in tables}
    finally:
        await conn.close()
