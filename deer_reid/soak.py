"""`deer-reid soak N --photos DIR`: drive the running stack with N detections and account for every one.

The images are distinct (each a seeded crop and shift of one of the real photos, so each is a new image
to the API), for volume only: a soak measures flow, never accuracy. They go in at `--rate` per second or
all at once as one backlog, one image per request as `deer-reid ingest` sends them. With `--faults`, each
service is killed with SIGKILL once and the broker is killed (the supervisor of `deer-reid up` restarts it
empty), spread over the submissions. The report:

- submitted, terminal, failed, lost (submitted minus terminal when the wait ends);
- decided_twice: detections with more than one machine decision (each must be decided exactly once);
- republished: the reconciler's re-publications of the run's detections (their attempts);
- re_embedded: crops the body's models ran on beyond one per detection (its events answered from recent
  embeddings are not), from the body service's own counter polled twice a second (restarts are followed
  like Prometheus' increase(); increments between the last poll and a kill are missed, so this can only
  undercount);
- wall_s, det_per_s; p50_ms and p99_ms from upload to decision;
- mode (`--mode`, None: the stack's switches as they were) and pipelines: the switches the run's detections
  ran under, with how many ran under each;
- states: the run's detections by state; degraded: those decided without a component they expected, and
  degraded_by: why, per component ("coat not arrived": no answer by the join deadline, "coat failed": the
  component answered that it failed); degraded_by_timeout: those missing a component that never arrived.

With `--mode`, the stack's switches are set for the run and put back after it, whatever ends it.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import random
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import asyncpg
import httpx
import numpy as np
from PIL import Image

from deer_reid.client import switch_pipeline
from deer_reid.ingest import Item, find_files, upload_all, wait_terminal
from deer_reid.stack import read_state
from shared.archives import IMAGE_SUFFIXES
from shared.observability import metric_samples
from shared.states import TERMINAL

FAULT_ORDER = ("body", "fusion", "coat", "antler", "pose", "reconciler", "api", "broker", "postgres")

# The run-time switches `--mode` sets for the run: enhanced runs every enhancement (coat, pose, antler and
# temporal priors), fast the one body model with temporal priors (the SPEC's modes). The body ensemble is
# left as the stack has it: the same soak is run with it on and off.
MODE_SWITCHES = {"enhanced": {"mode": "enhanced", "coat": True, "pose": True, "antler": True, "temporal": True},
                 "fast": {"mode": "fast", "temporal": True}}


def distinct_image(photo: bytes, k: int) -> bytes:
    """Image k made from `photo`: a crop of 80-95% of each side at a seeded place and a slight brightness
    shift, as a JPEG. Distinct bytes for every k: a new image to the API, the same animal to the eye."""
    rng = random.Random(k)
    with Image.open(io.BytesIO(photo)) as im:
        im = im.convert("RGB")
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.8, 0.95)), int(h * rng.uniform(0.8, 0.95))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = im.crop((x, y, x + cw, y + ch)).point(lambda v, d=rng.randint(-6, 6): max(0, min(255, v + d)))
        out = io.BytesIO()
        crop.save(out, format="JPEG", quality=88)
    return out.getvalue()


def fault_plan(n: int, targets: tuple[str, ...] = FAULT_ORDER) -> dict[int, str]:
    """Submission index -> what is killed then: spread evenly between 10% and 70% of the submissions."""
    if not targets:
        return {}
    first, last = int(n * 0.1), int(n * 0.7)
    step = max(1, (last - first) // max(1, len(targets) - 1))
    return {min(n - 1, first + i * step): t for i, t in enumerate(targets)}


class CounterTotal:
    """The total increase of a counter sampled now and then, across restarts of the process that owns it
    (a sample below the last one means it restarted from zero)."""

    def __init__(self):
        self.total = 0.0
        self.last: float | None = None

    def add(self, sample: float) -> None:
        if self.last is not None:
            self.total += sample - self.last if sample >= self.last else sample
        self.last = sample


def kill(home: Path, target: str) -> int | None:
    """SIGKILL the service (or the broker, or the embedded PostgreSQL) named, by the pid the supervisor's
    state file gives now."""
    state = read_state(home) or {}
    entry = state.get(target) if target in ("broker", "postgres") else state.get("services", {}).get(target)
    pid = (entry or {}).get("pid")
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
    return pid


def submissions(photos: list[Path], n: int, *, seed: int, rate: float | None, faults: dict[int, str],
                on_fault: Callable[[str], None]) -> Iterator[Item]:
    """The n images, paced at `rate` per second (None: as fast as they are taken), with each planned fault
    injected as its turn comes. Runs on upload_all's drawing thread: sleeping here paces the uploads."""
    order = np.random.default_rng(seed).permutation(n) % len(photos)
    cache: dict[int, bytes] = {}
    started = time.monotonic()
    for k in range(n):
        if rate:
            time.sleep(max(0.0, started + k / rate - time.monotonic()))
        if k in faults:
            on_fault(faults[k])
        i = int(order[k])
        if i not in cache:
            cache[i] = photos[i].read_bytes()
        yield Item(f"soak-{k}", f"soak-{seed}-{k}.jpg", distinct_image(cache[i], seed * 1_000_003 + k))


def body_events(exposition: str, outcome: str = "embedded") -> float:
    """The body service's deer_events_total{outcome=...} from its /metrics text (0 before its first):
    "embedded" counts crops the models ran on, "cached" events answered from recent embeddings."""
    return sum(value for name, labels, value in metric_samples(exposition, "deer_events")
               if name == "deer_events_total" and labels == {"service": "body", "outcome": outcome})


async def _poll_body(url: str, total: CounterTotal, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=2) as client:
        while not stop.is_set():
            try:
                total.add(body_events((await client.get(url)).text))
            except httpx.HTTPError:
                pass  # restarting: the next sample after it comes back counts from zero
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass


def degraded_reasons(result: dict) -> list[str]:
    """Why a decision is `degraded`: each component it expected and decided without, as "<component> not
    arrived" (no answer by the join deadline) or "<component> <status>" (it answered, failed)."""
    arrived = result.get("arrived") or {}
    return [f"{c} {arrived.get(c, 'not arrived')}" for c in result.get("missing") or []]


def decisions_report(rows: list[dict]) -> dict:
    """The run's detections by state, by the switches they ran under (`pipeline`), and the degraded ones
    by why (`degraded_reasons`); each row has `state`, `pipeline` and `result` (None until decided)."""
    states = Counter(r["state"] for r in rows)
    pipelines = Counter(json.dumps(r["pipeline"], sort_keys=True) for r in rows)
    reasons = [degraded_reasons(r["result"]) for r in rows if "degraded" in (r["result"] or {}).get("flags", [])]
    degraded = sum(1 for why in reasons if why)
    timed_out = sum(1 for why in reasons if any(w.endswith(" not arrived") for w in why))
    degraded_by = Counter(w for why in reasons for w in why)
    return {"states": dict(states), "degraded": degraded, "degraded_by": dict(degraded_by),
            "degraded_by_timeout": timed_out,
            "pipelines": [{**json.loads(k), "detections": n} for k, n in sorted(pipelines.items())]}


async def soak(home: Path, photos_dir: Path, n: int, *, dsn: str | None = None, rate: float | None = None,
               faults: bool = False, concurrency: int = 4, timeout: float = 86400, seed: int | None = None,
               headers: dict[str, str] | None = None, progress: bool = True, mode: str | None = None) -> dict:
    """The soak (module docstring); with `mode` (a key of MODE_SWITCHES) the stack's switches are set for
    the run and put back after it, also when it fails or is interrupted."""
    state = read_state(home)
    if not state:
        raise RuntimeError(f"no running stack in {home}: start it with `deer-reid up`")
    photos = [p for p in find_files(photos_dir) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not photos:
        raise RuntimeError(f"no photos under {photos_dir}")
    before = switch_pipeline(state["api_url"], headers or {}, **MODE_SWITCHES[mode]) if mode else {}
    try:
        report = await _soak(home, state, photos, n, dsn=dsn, rate=rate, faults=faults, concurrency=concurrency,
                             timeout=timeout, seed=seed, headers=headers, progress=progress)
    finally:
        if before:
            switch_pipeline(state["api_url"], headers or {}, **before)
    return {**report, "mode": mode}


async def _soak(home: Path, state: dict, photos: list[Path], n: int, *, dsn: str | None, rate: float | None,
                faults: bool, concurrency: int, timeout: float, seed: int | None, headers: dict[str, str] | None,
                progress: bool) -> dict:
    seed = seed if seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    site = f"soak-{uuid.uuid4().hex[:8]}"
    plan = fault_plan(n) if faults else {}
    injected: list[dict] = []

    def on_fault(target: str) -> None:
        injected.append({"target": target, "pid": kill(home, target), "at_s": round(time.monotonic() - started, 1)})

    body = CounterTotal()
    stop = asyncio.Event()
    poller = asyncio.create_task(_poll_body(
        f"http://127.0.0.1:{state['services']['body']['metrics_port']}/metrics", body, stop))
    await asyncio.sleep(0.6)  # a first sample before anything is sent
    started = time.monotonic()
    results = await upload_all(state["api_url"], submissions(photos, n, seed=seed, rate=rate, faults=plan,
                                                             on_fault=on_fault),
                               {"site": site, "camera": "soak", "fallback_captured_at": "2025-11-01T06:00:00Z"},
                               concurrency=concurrency, progress=progress, headers=headers)
    ids = [d["id"] for r in results if "detections" in r for d in r["detections"]]
    states = await wait_terminal(state["api_url"], ids, timeout=timeout, progress=progress, headers=headers)
    wall = time.monotonic() - started
    await asyncio.sleep(1.0)  # the body's last events into the count
    stop.set()
    await poller
    conn = await asyncpg.connect(dsn or state["database_url"])
    try:
        rows = await conn.fetch(
            """SELECT d.id, d.state, d.attempts, d.pipeline::text AS pipeline, d.result::text AS result,
                      extract(epoch FROM (SELECT min(x.decided_at) FROM decisions x
                                          WHERE x.detection_id = d.id AND x.decided_by = 'fusion') - d.created_at)
                        AS decided_after_s,
                      (SELECT count(*) FROM decisions x WHERE x.detection_id = d.id AND x.decided_by = 'fusion')
                        AS decisions
               FROM detections d WHERE d.site = $1""", site)
    finally:
        await conn.close()
    decided = decisions_report([{"state": r["state"], "pipeline": json.loads(r["pipeline"] or "null"),
                                 "result": json.loads(r["result"] or "null")} for r in rows])
    latencies = [1000 * float(r["decided_after_s"]) for r in rows if r["decided_after_s"] is not None]
    terminal = sum(1 for i in ids if states.get(i) in TERMINAL)
    return {
        "submitted": len(ids), "terminal": terminal,
        "failed": sum(1 for r in rows if r["state"] == "failed"),
        "lost": len(ids) - terminal,
        "decided_twice": sum(1 for r in rows if r["decisions"] > 1),
        "republished": int(sum(r["attempts"] for r in rows)),
        "re_embedded": max(0, int(round(body.total)) - len(ids)),
        "wall_s": round(wall, 1), "det_per_s": round(len(ids) / wall, 2) if wall else None,
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
        "rejected": [r for r in results if "error" in r][:10],
        "faults": injected, "site": site, "seed": seed, "pacing": "rate" if rate else "backlog", "rate": rate,
        **decided,
    }


def exit_status(report: dict) -> int:
    """`deer-reid soak`'s exit status: a soak that lost, doubled or failed any detection is a failed soak,
    whatever faults it injected (the faults must cost time, never a decision). An enhanced soak without
    faults fails as well when a detection was decided without a component that never came: under load
    alone the join deadlines must wait for a component that flows."""
    timed_out = report.get("mode") == "enhanced" and not report.get("faults") and report.get("degraded_by_timeout")
    return 0 if report["lost"] == 0 and report["decided_twice"] == 0 and report["failed"] == 0 \
        and not timed_out else 1
