"""`deer-reid bench`: body throughput, bare models against the whole pipeline, in one run.

1. matmul peak of this machine (fp32 and bf16), the yardstick for achieved GFLOP/s;
2. bare: the body extractor alone on the crops (JPEG decode, resize, models), batch 16;
3. end to end: a fresh embedded stack (broker, database, services); detection rows are
   written as the API writes them, the events are produced to the detections topic
   and the bench waits for every result on the results topic. A burst measures
   throughput; a paced run at half that rate measures latency (p50/p99);
4. the peer: the way the system we replace worked, on the same crops and the same database (eager fp32
   ResNet50 at batch 1, one gallery query per detection, nothing pipelined), and our end-to-end
   throughput over it (`ratio_to_peer`).
Speed does not depend on weights, so models without weights run on random ones
(and the report says so).
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import numpy as np

from shared.config import Settings

MODES = {"fast": "resnet50", "enhanced": "resnet50,efficientnet_b3,vit_base_patch16_224"}


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 1.0) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
    return 2 * n ** 3 * runs / (time.perf_counter() - start) / 1e9


def gflop_per_image(model) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, model.spec.input_size, model.spec.input_size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.module(x)
    return counter.get_total_flops() / 1e9


def synthetic_crops(n: int, seed: int = 0, size: tuple[int, int] = (480, 360)) -> list[bytes]:
    """Smooth random pictures as JPEG crops: the decoder and models do the same work as on photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=90)
        crops.append(out.getvalue())
    return crops


def bare_throughput(extractor, crops: list[bytes], batch: int = 16) -> float:
    extractor.embed(crops[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(crops), batch):
        extractor.embed(crops[i:i + batch])
    return len(crops) / (time.perf_counter() - start)


def _scrape(port: int) -> dict[tuple[str, str], tuple[float, float]]:
    """(stage, service) -> (sum seconds, count) of deer_stage_seconds on a service's /metrics."""
    import urllib.request

    from shared.observability import metric_samples

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, str], list[float]] = {}
    for name, labels, value in metric_samples(text, "deer_stage_seconds"):
        slot = out.setdefault((labels["service"], labels["stage"]), [0.0, 0.0])
        if name.endswith("_sum"):
            slot[0] = value
        elif name.endswith("_count"):
            slot[1] = value
    return {k: (v[0], v[1]) for k, v in out.items()}


def _cpu_seconds(stack) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each process of the stack and by the bench itself."""
    import psutil

    def tree(pid: int) -> float:
        try:
            root = psutil.Process(pid)
            total = 0.0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    t = proc.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return 0.0

    out = {name: tree(child.process.pid) for name, child in stack.children.items()}
    if stack.broker is not None:
        out["broker"] = tree(stack.broker.process.pid)
    if stack.postgres is not None:
        out["postgres"] = tree(stack.postgres.pid)
    me = psutil.Process().cpu_times()
    out["bench client"] = me.user + me.system
    return out


async def _insert_detections(dsn: str, crops: list[bytes], site: str, pipeline: dict,
                             expected: list[str]) -> list[tuple[uuid.UUID, bytes]]:
    import asyncpg

    from shared.db import _init_connection

    conn = await asyncpg.connect(dsn)
    await _init_connection(conn)
    rows = []
    now = datetime.now(timezone.utc)
    try:
        async with conn.transaction():
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
    finally:
        await conn.close()
    return rows


async def _round_trip(stack, rows: list, crops: list[bytes], site: str, *, cls: str, config, expected: list[str],
                      send_to, answers_on, answer_id, rate: float | None = None) -> dict:
    """One detection event per (row, crop) onto `send_to` (paced at `rate`/s, or all at once), timed until
    each detection's answer appears on `answers_on` (`answer_id` decodes an answer to its detection id)."""
    from aiokafka import AIOKafkaConsumer

    from shared.broker import MAX_MESSAGE_BYTES, producer_for, refuse_topic_auto_creation
    from shared.schemas import Box, DetectionEvent

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
    for n, ((det, sha), crop) in enumerate(zip(rows, crops)):
        if rate:
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        event = DetectionEvent(detection_id=det, site=site, camera="bench", captured_at=now, cls=cls,
                               box=Box(x0=0, y0=0, x1=480, y1=360), image_sha256=sha, crop_jpeg=crop,
                               mode=config.mode, switches=config.switches(), expected=expected)
        sent[str(det)] = time.perf_counter()
        await producer.send(send_to.name, event.to_bytes(), key=str(det).encode())
    await producer.flush()
    await asyncio.wait_for(collector, timeout=600)
    elapsed = max(done.values()) - start
    await producer.stop()
    await consumer.stop()
    latencies = np.array([1000 * (done[k] - sent[k]) for k in sent])
    return {"det_per_s": len(rows) / elapsed, "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)), "seconds": elapsed, "answers": answers}


async def _run_events(stack, crops: list[bytes], site: str, rate: float | None, mode: str = "fast") -> dict:
    """Produce one detection event per crop (paced at `rate`/s, or all at once) and wait for every result."""
    from shared.pipeline import expected_components
    from shared.schemas import DetectionResult, PipelineConfig
    from shared.topics import DETECTIONS, RESULTS

    # the enhanced bench includes the coat, antler and (selective) pose services (its detections are bucks)
    enhanced = mode == "enhanced"
    config = PipelineConfig(mode=mode, coat=enhanced, antler=enhanced, pose=enhanced)
    cls = "buck" if enhanced else "doe"
    expected = expected_components(config, cls)
    rows = await _insert_detections(stack.dsn, crops, site, {"mode": mode, **config.switches()}, expected)
    timed = await _round_trip(stack, rows, crops, site, cls=cls, config=config, expected=expected,
                              send_to=DETECTIONS, answers_on=RESULTS, rate=rate,
                              answer_id=lambda raw: str(DetectionResult.from_bytes(raw).detection_id))
    timed.pop("answers")
    return timed


async def _run_pose_requests(stack, crops: list[bytes], site: str) -> dict:
    """Pose requests straight to the pose service (the bench's look-alike crops never leave fusion uncertain,
    so fusion itself asks for none): its throughput and latency, request to published features."""
    from shared.schemas import Features, PipelineConfig
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


def run_bench(mode: str, detections: int, settings: Settings, body_model: str | None = None,
              progress=print) -> dict:
    import torch

    from deer_reid.stack import Stack
    from services.body.extractor import BodyExtractor
    from shared.embedded import free_port
    from shared.models import load_model, weights_available

    names = [n.strip() for n in (body_model or MODES[mode]).split(",") if n.strip()]
    allow_random = not all(weights_available(n, settings.model_cache) for n in names)
    threads = settings.torch_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    result: dict = {"mode": mode, "detections": detections, "body_models": names, "threads": threads}
    progress("measuring matmul peak ...")
    result["matmul_peak_gflops"] = {p: round(matmul_peak(p), 1) for p in ("fp32", "bf16")}

    crops = synthetic_crops(detections)
    models = [load_model(n, settings.model_cache, allow_random=allow_random, device=settings.device,
                         precision=settings.precision) for n in names]
    result["weights_real"] = not any(m.random_weights for m in models)
    result["precision"] = {m.spec.name: m.precision for m in models}
    gflop = sum(gflop_per_image(m) for m in models)
    result["gflop_per_det"] = round(gflop, 2)
    progress(f"bare models on {detections} crops ...")
    per_model = {m.spec.name: round(bare_throughput(BodyExtractor([m], batch=settings.batch_max),
                                                    crops[: max(64, detections // 4)], settings.batch_max), 1)
                 for m in models}
    result["bare_per_model_det_per_s"] = per_model
    # This machine's speed wanders from minute to minute: the baseline is the best of three runs,
    # which makes the e2e/bare ratio conservative.
    bare_crops = crops[: min(len(crops), 256)]
    runs = [bare_throughput(BodyExtractor(models, batch=settings.batch_max), bare_crops, settings.batch_max)
            for _ in range(3)]
    result["bare_runs_det_per_s"] = [round(r, 2) for r in runs]
    result["bare_det_per_s"] = round(max(runs), 2)
    del models
    if mode == "enhanced":
        progress("coat extraction and matching, bare ...")
        result["coat_bare"] = coat_costs(crops[:32], settings)
        progress("antler geometry and fingerprint, bare ...")
        result["antler_bare"] = antler_costs(crops[:32], settings)
        progress("pose keypoints and viewpoint, bare ...")
        result["pose_bare"] = pose_costs(crops[:32], settings)

    import tempfile

    home = Path(tempfile.mkdtemp(prefix="deer-bench-"))
    stack_settings = settings.model_copy(update={
        "home": home, "body_model": names[0], "body_ensemble": ",".join(names) if mode == "enhanced" else "",
        # enhanced: the pose service runs the AP-10K keypoint model even without its weights (speed and plumbing
        # only: its keypoints are flagged random-weights and never trusted); body models keep their own rule
        "allow_random_weights": allow_random or mode == "enhanced", "api_port": free_port(),
        "database_url": "", "calibration": home / "none.json"})
    stack = Stack(stack_settings, env={"DEER_PRECISION": settings.precision, "DEER_STUCK_AFTER_S": "600"})
    progress("starting the stack ...")
    stack.start()
    try:
        asyncio.run(_run_events(stack, crops[:32], "bench-warmup", None, mode))
        before = {name: _scrape(stack.children[name].port) for name in ("body", "coat", "antler", "fusion")}
        cpu_before = _cpu_seconds(stack)
        progress(f"end to end: burst of {detections} detections ...")
        burst = asyncio.run(_run_events(stack, crops, "bench-burst", None, mode))
        cpu_after = _cpu_seconds(stack)
        after = {name: _scrape(stack.children[name].port) for name in ("body", "coat", "antler", "fusion")}
        paced_n = max(64, detections // 2)
        rate = burst["det_per_s"] / 2
        progress(f"end to end: {paced_n} detections paced at {rate:.1f}/s for latency ...")
        paced = asyncio.run(_run_events(stack, crops[:paced_n], "bench-paced", rate, mode))
        progress(f"the system we replace on the same {detections} crops: eager fp32 ResNet50 at batch 1, "
                 "a query per detection ...")
        result["peer"] = asyncio.run(peer_throughput(crops, stack.dsn))
        if mode == "enhanced":
            result["coat_stored_bytes_per_detection"] = asyncio.run(_coat_bytes(stack.dsn))
            result["pose_requested"] = asyncio.run(_pose_share(stack.dsn))
            progress("pose requests straight to the pose service ...")
            result["pose_service"] = asyncio.run(_run_pose_requests(stack, crops[:64], "bench-pose"))
    finally:
        stack.stop()
    stages = {}
    for name in before:
        for key, (total, count) in after[name].items():
            b_total, b_count = before[name].get(key, (0.0, 0.0))
            if count > b_count:
                stages[f"{key[0]}/{key[1]}"] = {"ms_per_det": round(1000 * (total - b_total) / detections, 3),
                                               "calls": int(count - b_count)}
    result.update({
        "e2e_det_per_s": round(burst["det_per_s"], 2),
        "ratio": round(burst["det_per_s"] / result["bare_det_per_s"], 3),
        "p50_ms": round(paced["p50_ms"], 1), "p99_ms": round(paced["p99_ms"], 1),
        "latency_rate_det_per_s": round(rate, 1),
        # our end-to-end throughput over the peer's, measured in this run on the same crops
        "ratio_to_peer": round(burst["det_per_s"] / result["peer"]["det_per_s"], 2),
        "burst_p50_ms": round(burst["p50_ms"], 1), "burst_p99_ms": round(burst["p99_ms"], 1),
        "stages": stages,
        # Where the two cores went during the burst: CPU milliseconds per detection, by process.
        "cpu_ms_per_det": {name: round(1000 * (cpu_after[name] - cpu_before.get(name, 0.0)) / detections, 2)
                           for name in cpu_after},
        "cpu_ms_per_det_available": round(1000 * result["threads"] * burst["seconds"] / detections, 2),
    })
    peak = result["matmul_peak_gflops"]["bf16" if "bf16" in result["precision"].values() else "fp32"]
    result["achieved_gflops_bare"] = round(gflop * result["bare_det_per_s"], 1)
    result["achieved_gflops_e2e"] = round(gflop * result["e2e_det_per_s"], 1)
    result["achieved_share_of_matmul_peak"] = round(result["achieved_gflops_e2e"] / peak, 3)
    return result


async def peer_throughput(crops: list[bytes], dsn: str, k: int = 50) -> dict:
    """The way the system we replace worked, on the same crops and database: eager fp32 ResNet50 at batch 1
    (no tracing, no bf16, no micro-batches), then one gallery query per detection, one after the other
    (no pipelining). The weights are left random: they do not change the speed."""
    import timm
    import torch

    from services.fusion import store
    from shared.db import _init_connection
    from shared.images import model_input

    model = timm.create_model("resnet50", pretrained=False, num_classes=0).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    conn = await asyncpg.connect(dsn)
    await _init_connection(conn)
    try:
        # the gallery the pipeline built: the peer's vectors are cut to its size, for the cost of the query
        row = await conn.fetchrow("SELECT version, dim, property FROM embeddings WHERE exemplar LIMIT 1")
        version, dim, prop = (row["version"], row["dim"], row["property"]) if row else ("none", 2048, "default")
        started = time.perf_counter()
        for crop in crops:
            x = torch.from_numpy(model_input(crop, 224)).permute(2, 0, 1).unsqueeze(0).float().div(255)
            with torch.inference_mode():
                vec = model((x - mean) / std)[0].numpy()[:dim].astype(np.float32)
            async with conn.transaction():
                await store.prepare_search(conn, k)
                await store.nearest_exemplars(conn, vec / (np.linalg.norm(vec) or 1.0), version, prop, "unknown", k)
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return {"det_per_s": round(len(crops) / elapsed, 2), "ms_per_det": round(1000 * elapsed / len(crops), 1),
            "gallery_version": version}


async def _coat_bytes(dsn: str) -> dict:
    """Mean stored bytes per detection of the coat: the packed pattern, and the join row's jsonb."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """SELECT (SELECT sum(octet_length(pattern)) FROM coat_patterns) / count(*) AS pattern,
                      avg(pg_column_size(f.features)) AS features, count(*) AS detections
               FROM detection_features f WHERE f.component = 'coat'""")
    finally:
        await conn.close()
    return {k: (round(float(v), 1) if v is not None else None) for k, v in row.items()}


async def _pose_share(dsn: str) -> dict:
    """How many detections of the burst and the paced run asked for pose (the selective rule), and why not."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT site, coalesce(result->'pose'->>'ran', 'null') AS ran, count(*) AS n,
                      min(result->'pose'->>'why') AS why
               FROM detections WHERE site IN ('bench-burst', 'bench-paced') GROUP BY 1, 2""")
    finally:
        await conn.close()
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


def pose_costs(crops: list[bytes], settings: Settings) -> dict:
    """Milliseconds of the pose service per crop: the AP-10K keypoint network (random weights where its
    weights are missing: speed only) one crop at a time and in batches of 8, and the viewpoint classifier."""
    from services.pose.classifier import ViewpointClassifier
    from services.pose.keypoints import KeypointModel
    from shared.images import decode_crop
    from shared.models import MissingWeights

    out: dict = {"crops": len(crops)}
    rgb = [decode_crop(c) for c in crops]
    model = KeypointModel(settings.pose_keypoint_model, settings.model_cache, allow_random=True,
                          flip_test=settings.pose_flip_test)
    out["keypoint_model"] = model.version
    out["flip_test"] = settings.pose_flip_test
    model.predict(rgb[:2])  # warm-up
    for batch in (1, 8):
        started = time.perf_counter()
        for k in range(0, len(rgb), batch):
            model.predict(rgb[k:k + batch])
        out[f"keypoints_ms_per_crop_batch{batch}"] = round(1000 * (time.perf_counter() - started) / len(rgb), 1)
    out["keypoint_parameters_m"] = round(sum(p.numel() for p in model.model.parameters()) / 1e6, 2)
    try:
        classifier = ViewpointClassifier(settings.pose_viewpoint_model, settings.model_cache,
                                         precision=settings.precision)
    except MissingWeights as exc:
        out["viewpoint_classifier"] = f"not measured: {exc}"
        return out
    classifier.predict(crops[:2])
    started = time.perf_counter()
    for k in range(0, len(crops), 16):
        classifier.predict(crops[k:k + 16])
    out["viewpoint_classifier"] = classifier.version
    out["viewpoint_ms_per_crop_batch16"] = round(1000 * (time.perf_counter() - started) / len(crops), 2)
    return out


def antler_costs(crops: list[bytes], settings: Settings) -> dict:
    """Milliseconds of the antler service per crop: geometry (one thread), and the fingerprint network on the
    head-top regions in batches of 16 (as the service runs a micro-batch)."""
    from services.antler.extractor import measure
    from services.antler.fingerprint import Fingerprinter
    from services.antler.seasons import SeasonCalendar
    from shared.images import model_input
    from shared.models import load_model

    calendar = SeasonCalendar()
    now = datetime.now(timezone.utc)
    times = []
    for crop in crops:
        started = time.perf_counter()
        measure(crop, "buck", 40, now, calendar)
        times.append(1000 * (time.perf_counter() - started))
    model = load_model(settings.antler_model, settings.model_cache, allow_random=True, precision=settings.precision)
    fingerprinter = Fingerprinter(model)
    regions = [model_input(c, 224)[: round(224 * 0.3)] for c in crops]  # every head-top region, antlers or not
    fingerprinter(regions[:16])  # warm-up
    started = time.perf_counter()
    for k in range(0, len(regions), 16):
        fingerprinter(regions[k:k + 16])
    return {"geometry_ms_per_crop": round(float(np.median(times)), 1),
            "fingerprint_ms_per_crop": round(1000 * (time.perf_counter() - started) / len(regions), 2),
            "model": model.version, "crops": len(crops)}


def coat_costs(crops: list[bytes], settings: Settings) -> dict:
    """Milliseconds of the coat extractor per crop (one thread) and of one pattern match per matcher, median."""
    from services.coat.extractor import CoatExtractor
    from shared.components.coat import pattern_similarity

    extractor = CoatExtractor.from_settings(settings)
    extractor.extract(crops[0])  # warm-up: ONNX session
    features, times = [], []
    for crop in crops:
        started = time.perf_counter()
        features.append(extractor.extract(crop))
        times.append(1000 * (time.perf_counter() - started))
    match, patterns = {}, {}
    for method in extractor.patterns:
        patterns[method] = [f.patterns[method] for f in features if method in f.patterns]
        times_of = []
        for a, b in zip(patterns[method], patterns[method][1:] + patterns[method][:1]):
            started = time.perf_counter()
            pattern_similarity(a, b)
            times_of.append(1000 * (time.perf_counter() - started))
        match[method] = round(float(np.median(times_of)), 2) if times_of else None
    steps = sorted({k for f in features for k in f.timings_ms if k != "total"})
    return {"extract_ms_per_crop": round(float(np.median(times)), 1),
            "steps_ms": {k: round(float(np.median([f.timings_ms[k] for f in features if k in f.timings_ms])), 1)
                         for k in steps},
            "match_ms_per_pair": match,
            "pattern_bytes_median": {m: int(np.median([len(p) for p in ps])) if ps else None
                                     for m, ps in patterns.items()},
            "crops": len(crops), "patterns": {m: len(ps) for m, ps in patterns.items()}}


def precision_check(data_dir: Path, names: list[str], settings: Settings, limit: int | None = None,
                    progress: bool = True) -> dict:
    """Cosine between fp32 and bf16 embeddings of the same real images, per model."""
    from deer_reid.evaluation.dataset import load_dataset
    from deer_reid.evaluation.features import embed_samples

    samples = load_dataset(data_dir)[:limit] if limit else load_dataset(data_dir)
    out = {}
    embedded = {}
    for precision in ("fp32", "bf16"):
        s = settings.model_copy(update={"precision": precision})
        embedded[precision], _ = embed_samples(samples, names, s, progress=progress)
    for name in names:
        cos = np.sum(embedded["fp32"][name] * embedded["bf16"][name], axis=1)
        out[name] = {"images": len(samples), "cosine_min": round(float(cos.min()), 5),
                     "cosine_p1": round(float(np.percentile(cos, 1)), 5), "cosine_mean": round(float(cos.mean()), 5),
                     "passes_0.99": bool(cos.min() >= 0.99)}
    return out
