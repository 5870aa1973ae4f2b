"""The end-to-end run: a fresh embedded stack (broker, database, services) fed detection events directly, each
timed from its event to its answer; and what the enhanced pipeline stored while it ran."""
from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from datetime import datetime, timezone

import asyncpg
import numpy as np

from shared.config import Settings
from shared.schemas import PipelineConfig

# the sites of the timed runs: the pose share is read back by them
BURST_SITE = "bench-burst"
PACED_SITE = "bench-paced"


@asynccontextmanager
async def _connected(dsn: str, *, codecs: bool = False):
    """A connection to the measured stack's database, closed on leaving; with the stack's own jsonb codecs when
    `codecs`."""
    conn = await asyncpg.connect(dsn)
    try:
        if codecs:
            from shared.db import _init_connection

            await _init_connection(conn)
        yield conn
    finally:
        await conn.close()


def one_mode_config(mode: str) -> PipelineConfig:
    """The switches of a one-mode run: enhanced runs the coat, antler and (selective) pose services beside
    the ensemble; temporal is on in both (the defaults)."""
    enhanced = mode == "enhanced"
    return PipelineConfig(mode=mode, coat=enhanced, antler=enhanced, pose=enhanced)


def fresh_stack(settings: Settings, names: list[str], mode: str, allow_random: bool):
    """A stack of its own in a new home, running the bench's body models, not yet started."""
    import tempfile
    from pathlib import Path

    from deer_reid.stack import Stack
    from shared.embedded import free_port

    home = Path(tempfile.mkdtemp(prefix="deer-bench-"))
    stack_settings = settings.model_copy(update={
        "home": home, "body_model": names[0], "body_ensemble": ",".join(names) if mode == "enhanced" else "",
        # enhanced: the pose service runs the AP-10K keypoint model even without its weights (speed and plumbing
        # only: its keypoints are flagged random-weights and never trusted); body models keep their own rule
        "allow_random_weights": allow_random or mode == "enhanced", "api_port": free_port(),
        "database_url": "", "calibration": home / "none.json"})
    return Stack(stack_settings, env={"DEER_PRECISION": settings.precision, "DEER_STUCK_AFTER_S": "600"})


async def _insert_detections(dsn: str, crops: list[bytes], site: str, pipeline: dict,
                             expected: list[str]) -> list[tuple[uuid.UUID, bytes]]:
    rows = []
    now = datetime.now(timezone.utc)
    async with _connected(dsn, codecs=True) as conn, conn.transaction():
        for n, crop in enumerate(crops):
            sha = hashlib.sha256(crop + site.encode() + str(n).encode()).hexdigest()
            det = uuid.uuid4()
            await conn.execute(
                """INSERT INTO images (sha256, byte_size, width, height, format, original_name, site, camera,
                                       captured_at, time_source) VALUES ($1,$2,480,360,'JPEG',$3,$4,'bench',$5,'bench')""",
                sha, len(crop), f"bench-{n}.jpg", site, now)
            await conn.execute(
                """INSERT INTO detections (id, image_sha256, ordinal, box, cls, site, camera, captured_at, crop, state,
                                           property, pipeline, expected)
                   VALUES ($1,$2,0,'{0,0,480,360}','doe',$3,'bench',$4,$5,'extracting','default',$6,$7)""",
                det, sha, site, now, crop, pipeline, expected)
            rows.append((det, sha))
    return rows


async def _record_landing(dsn: str, landed: list) -> None:
    """Where the bench's events landed, recorded as the relay records it (the bench publishes without it)."""
    from services.reconciler.relay import record_landing

    async with _connected(dsn) as conn:
        await record_landing(conn, [(det, meta.partition, meta.offset) for det, meta in landed])


async def _round_trip(stack, rows: list, crops: list[bytes], site: str, *, cls: str, config, expected: list[str],
                      send_to, answers_on, answer_id, rate: float | None = None) -> dict:
    """One detection event per (row, crop) onto `send_to` (paced at `rate`/s, or all at once), timed until
    each detection's answer appears on `answers_on` (`answer_id` decodes an answer to its detection id)."""
    from aiokafka import AIOKafkaConsumer

    from shared.broker import MAX_MESSAGE_BYTES, producer_for, refuse_topic_auto_creation
    from shared.schemas import Box, DetectionEvent
    from shared.topics import DETECTIONS

    refuse_topic_auto_creation()
    consumer = AIOKafkaConsumer(answers_on.name, bootstrap_servers=stack.bootstrap,
                                group_id=f"bench-{uuid.uuid4()}", auto_offset_reset="latest",
                                max_partition_fetch_bytes=MAX_MESSAGE_BYTES)
    await consumer.start()
    while not consumer.assignment():
        await asyncio.sleep(0.05)
    await consumer.seek_to_end()
    producer = producer_for(stack.bootstrap, "bench")
    await producer.start()
    sent: dict[str, float] = {}
    done: dict[str, float] = {}
    answers: list[bytes] = []

    async def collect():
        while len(done) < len(rows):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                now = time.perf_counter()
                for r in records:
                    did = answer_id(r.value)
                    if did in sent and did not in done:
                        done[did] = now
                        answers.append(r.value)

    collector = asyncio.create_task(collect())
    now = datetime.now(timezone.utc)
    start = time.perf_counter()
    landing = []
    for n, ((det, sha), crop) in enumerate(zip(rows, crops)):
        if rate:
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        event = DetectionEvent(detection_id=det, site=site, camera="bench", captured_at=now, cls=cls,
                               box=Box(x0=0, y0=0, x1=480, y1=360), image_sha256=sha, crop_jpeg=crop,
                               mode=config.mode, switches=config.switches(), expected=expected)
        sent[str(det)] = time.perf_counter()
        landing.append((det, await producer.send(send_to.name, event.to_bytes(), key=str(det).encode())))
    await producer.flush()
    if send_to.name == DETECTIONS.name:  # where each event landed, recorded as the relay records it
        await _record_landing(stack.dsn, [(det, await future) for det, future in landing])
    await asyncio.wait_for(collector, timeout=600)
    elapsed = max(done.values()) - start
    await producer.stop()
    await consumer.stop()
    latencies = np.array([1000 * (done[k] - sent[k]) for k in sent])
    return {"det_per_s": len(rows) / elapsed, "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)), "seconds": elapsed, "answers": answers}


async def run_detections(stack, crops: list[bytes], site: str, rate: float | None, config: PipelineConfig) -> dict:
    """Produce one detection event per crop under `config`'s switches (paced at `rate`/s, or all at once) and
    wait for every result: the timings, and how many results were of each state and degraded."""
    from shared.pipeline import expected_components
    from shared.schemas import DetectionResult
    from shared.topics import DETECTIONS, RESULTS

    # enhanced detections are bucks: the antler service runs for them when switched on
    cls = "buck" if config.mode == "enhanced" else "doe"
    expected = expected_components(config, cls)
    rows = await _insert_detections(stack.dsn, crops, site, {"mode": config.mode, **config.switches()}, expected)
    timed = await _round_trip(stack, rows, crops, site, cls=cls, config=config, expected=expected,
                              send_to=DETECTIONS, answers_on=RESULTS, rate=rate,
                              answer_id=lambda raw: str(DetectionResult.from_bytes(raw).detection_id))
    results = [DetectionResult.from_bytes(raw) for raw in timed.pop("answers")]
    timed["decided"] = dict(Counter(r.state for r in results))
    # decided without a component that missed the join deadline: not the whole pipeline's answer
    timed["degraded"] = sum("degraded" in r.flags for r in results)
    return timed


async def run_pose_requests(stack, crops: list[bytes], site: str) -> dict:
    """Pose requests straight to the pose service (the bench's look-alike crops never leave fusion uncertain,
    so fusion itself asks for none): its throughput and latency, request to published features."""
    from shared.schemas import Features
    from shared.topics import FEATURES_POSE, POSE_REQUESTS

    config = PipelineConfig(mode="enhanced", pose=True)
    expected = ["body", "pose"]
    rows = await _insert_detections(stack.dsn, crops, site, {"mode": "enhanced", **config.switches()}, expected)
    timed = await _round_trip(stack, rows, crops, site, cls="doe", config=config, expected=expected,
                              send_to=POSE_REQUESTS, answers_on=FEATURES_POSE,
                              answer_id=lambda raw: str(Features.from_bytes(raw).detection_id))
    answers = [Features.from_bytes(raw) for raw in timed["answers"]]
    return {"requests": len(rows), "answers_per_s": round(timed["det_per_s"], 2),
            "p50_ms": round(timed["p50_ms"], 1), "p99_ms": round(timed["p99_ms"], 1),
            "keypoints_in_answers": sum(a.attributes.get("keypoints") is not None for a in answers),
            "viewpoints": {v: sum(a.attributes.get("viewpoint") == v for a in answers)
                           for v in sorted({a.attributes.get("viewpoint") for a in answers})},
            "flags": sorted({f for a in answers for f in a.flags}),
            "versions": answers[0].attributes.get("versions") if answers else None,
            "service_ms_per_crop": {k: round(float(np.median([a.timings_ms[k] for a in answers if k in a.timings_ms])), 1)
                                    for k in sorted({k for a in answers for k in a.timings_ms})}}


async def coat_stored_bytes(dsn: str) -> dict:
    """Mean stored bytes per detection of the coat: the packed pattern, and the join row's jsonb."""
    async with _connected(dsn) as conn:
        row = await conn.fetchrow(
            """SELECT (SELECT sum(octet_length(pattern)) FROM coat_patterns) / count(*) AS pattern,
                      avg(pg_column_size(f.features)) AS features, count(*) AS detections
               FROM detection_features f WHERE f.component = 'coat'""")
    return {k: (round(float(v), 1) if v is not None else None) for k, v in row.items()}


async def coat_photos_matched(dsn: str) -> float:
    """Gallery photos fusion compared each burst detection's coat with, on average (its result's
    `coat.exemplars_matched`). Fusion's coat work grows with it, and it depends on the gallery the burst built,
    which differs from run to run with the order the services finish in: per photo matched, two runs' fusion
    CPU can be compared where per detection it cannot."""
    async with _connected(dsn) as conn:
        value = await conn.fetchval(
            """SELECT avg(coalesce((result->'coat'->>'exemplars_matched')::float8, 0))
               FROM detections WHERE site = $1""", BURST_SITE)
    return round(float(value or 0.0), 2)


async def pose_requested_share(dsn: str) -> dict:
    """How many detections of the burst and the paced run asked for pose (the selective rule), and why not."""
    async with _connected(dsn) as conn:
        rows = await conn.fetch(
            """SELECT site, coalesce(result->'pose'->>'ran', 'null') AS ran, count(*) AS n,
                      min(result->'pose'->>'why') AS why
               FROM detections WHERE site IN ($1, $2) GROUP BY 1, 2""", BURST_SITE, PACED_SITE)
    out: dict = {}
    for r in rows:
        site = out.setdefault(r["site"], {"detections": 0, "pose_ran": 0})
        site["detections"] += r["n"]
        if r["ran"] == "true":
            site["pose_ran"] += r["n"]
        else:
            site["example_reason_not"] = r["why"]
    for site in out.values():
        site["share"] = round(site["pose_ran"] / max(1, site["detections"]), 3)
    return out
