"""Helpers of the tests that drive the whole stack: sites, uploads, and the exactly-once checks."""
from __future__ import annotations

import asyncio
import contextlib
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
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = await db.fetchval(
            "SELECT count(*) FROM detections WHERE site = $1 AND state IN ('assigned', 'new', 'review', 'failed')",
            site)
        if done:
            fault()
            return done
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing of {site} was processed within 120 s")


async def ingest_through_fault(stack, db, paths, site: str, fault, recover=None, wait_s: float = WAIT_S) -> dict:
    """Ingest `paths` with `fault` injected mid-way (and `recover` after it); asserts nothing is lost."""
    upload = asyncio.create_task(ingest(stack, paths, site))
    done_at_fault = await fault_when_started(db, site, fault)
    if recover is not None:
        await recover()
    ids = await upload
    assert done_at_fault < len(paths), "the fault came after the ingest, not in the middle of it"
    states = await wait_terminal(stack.api_url, ids, timeout=wait_s, progress=False)
    assert sum(1 for i in ids if states.get(i) in TERMINAL) == len(ids) == len(paths)
    counts = await assert_exactly_once(db, ids, site)
    print(f"\nFAULT {site}: submitted {len(ids)}, decided before the fault {done_at_fault}, lost 0, states {counts}")
    return counts


async def until(read, ok, timeout: float = 60.0, what: str = "the database"):
    """Poll `await read()` until `ok(value)`; the value, or AssertionError naming `what` at the timeout."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = await read()
        if ok(value):
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
