"""`deer-reid bench --census N`: one re-clustering of an N-detection property, end to end, as the census
service runs it (`services.census.job.recluster`: the neighbour search, the read, the solve, the apply with
its audit entry and the refreshed exemplars, the questions), in a fresh embedded PostgreSQL.

The property is laid out the way the online decisions leave a season that the machine alone could not
sort out (measured on nyala: one individual founded per photo): N detections, each its own individual, of
N / per_individual animals. The embeddings are `gallery_bench`'s synthetic ones (a shared mean direction,
individuals apart in a low-rank subspace, each photo its animal plus noise); the calibration is fitted on
labelled pairs of them, as `deer-reid eval` would fit one on real photos. The figures are for scale: no
labelled set here has 35,000 photos.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from pgvector import HalfVector

from deer_reid.gallery_bench import synthetic_gallery, unit_rows
from shared.calibrated import fit_components
from shared.config import Settings
from shared.db import create_pool, migrate
from shared.embedded import EmbeddedPostgres

PROPERTY = "census-bench"
MODEL = "synthetic"
VERSION = "census-bench:synthetic"


def fitted_artifact(vectors: np.ndarray, owner: np.ndarray, seed: int = 2, pairs: int = 20000) -> dict:
    """A calibration of the synthetic body component, fitted on labelled pairs drawn half same, half not."""
    rng = np.random.default_rng(seed)
    v = unit_rows(vectors)
    a = rng.integers(0, len(v), pairs)
    individuals = int(owner.max()) + 1
    same_b = (a + individuals * rng.integers(1, max(2, len(v) // individuals), pairs)) % len(v)
    other_b = rng.integers(0, len(v), pairs)
    b = np.where(np.arange(pairs) % 2 == 0, same_b, other_b)
    sims = np.einsum("ij,ij->i", v[a], v[b]).astype(np.float64)
    same = owner[a] == owner[b]
    calibrations, weights, intercept = fit_components({f"body:{MODEL}": sims}, same)
    return {"kind": "deer-reid-calibration", "version": 2, "embedding_versions": {MODEL: VERSION},
            "thresholds": {"match": 0.8, "new": 0.6}, "fit": {"synthetic": True},
            "fusion": {"calibrations": calibrations, "weights": weights, "intercept": intercept, "aggregation": "best"}}


async def _load(pool, vectors: np.ndarray, owner: np.ndarray) -> None:
    start = datetime(2025, 9, 1, tzinfo=timezone.utc)
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO properties (name) VALUES ($1) ON CONFLICT DO NOTHING", PROPERTY)
        await conn.execute("INSERT INTO sites (name, property) VALUES ('bench', $1)", PROPERTY)
        n = len(vectors)
        shas = [hashlib.sha256(f"census-bench-{i}".encode()).hexdigest() for i in range(n)]
        det_ids = [uuid.uuid5(uuid.NAMESPACE_OID, s) for s in shas]
        when = [start + timedelta(minutes=17 * i) for i in range(n)]
        ind_ids = [r["id"] for r in await conn.fetch(
            """INSERT INTO individuals (site, sex, first_seen, last_seen, sightings, property, founded_by)
               SELECT 'bench', 'unknown', $1, $1, 1, $2, d FROM unnest($3::uuid[]) AS d RETURNING id""",
            start, PROPERTY, det_ids)]
        await conn.copy_records_to_table(
            "images", columns=["sha256", "byte_size", "width", "height", "format", "original_name", "site",
                               "camera", "captured_at", "time_source"],
            records=[(s, 0, 1, 1, "JPEG", f"{i}.jpg", "bench", "cam", w, "request")
                     for i, (s, w) in enumerate(zip(shas, when))])
        await conn.copy_records_to_table(
            "detections", columns=["id", "image_sha256", "ordinal", "box", "cls", "site", "camera", "captured_at",
                                   "crop", "state", "individual_id", "property", "decided_by"],
            records=[(d, s, 0, [0, 0, 1, 1], "unknown", "bench", "cam", w, b"", "new", ind, PROPERTY, "fusion")
                     for d, s, w, ind in zip(det_ids, shas, when, ind_ids)])
        await conn.copy_records_to_table(
            "decisions", columns=["detection_id", "decided_by", "state", "individual_id"],
            records=[(d, "fusion", "new", ind) for d, ind in zip(det_ids, ind_ids)])
        await conn.copy_records_to_table(
            "embeddings", columns=["detection_id", "version", "model", "dim", "random_weights", "vec", "site",
                                   "individual_id", "exemplar", "property"],
            records=[(d, VERSION, MODEL, vectors.shape[1], False, HalfVector(v), "bench", ind, True, PROPERTY)
                     for d, v, ind in zip(det_ids, vectors, ind_ids)])
        await conn.execute("ANALYZE")


async def _measure(dsn: str, n: int, dim: int, per_individual: int, seed: int, progress) -> dict:
    from deer_reid.evaluation.metrics import clustering_report
    from services.census.job import recluster

    vectors, owner, _ = synthetic_gallery(n, dim, per_individual, 1, seed)
    artifact = fitted_artifact(vectors, owner)
    pool = await create_pool(dsn, max_size=2, command_timeout=Settings().census_statement_timeout_s)
    try:
        started = time.perf_counter()
        await _load(pool, vectors, owner)
        async with pool.acquire() as conn:
            await conn.execute("INSERT INTO calibrations (artifact, created_by) VALUES ($1, 'bench')", artifact)
        progress(f"census: {n} detections of {n // per_individual} animals loaded in "
                 f"{time.perf_counter() - started:.1f} s; re-clustering")
        started = time.perf_counter()
        summary = await recluster(pool, PROPERTY, Settings())
        wall = time.perf_counter() - started
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT e.vec, d.individual_id FROM detections d JOIN embeddings e "
                                    "ON e.detection_id = d.id WHERE d.property = $1 ORDER BY e.id", PROPERTY)
    finally:
        await pool.close()
    placed = [r["individual_id"] for r in rows]
    truth = list(owner)
    report = clustering_report(placed, truth)
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "detections": n,
            "animals": n // per_individual, "dim": dim, "wall_s": round(wall, 1),
            "stages_s": summary["seconds"], "edges": summary["edges"], "units": summary["units"],
            "moved": summary["moved"], "merged": summary["merged"], "questions": summary["questions"],
            "individuals_before": summary["individuals_before"], "individuals_after": summary["individuals_after"],
            "bcubed_f1_after": round(report["bcubed_f1"], 4)}


def cpu_model() -> str:
    """The processor's model name (figures are comparable only within one machine)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def census_bench(n: int, *, dim: int = 1280, per_individual: int = 120, seed: int = 0,
                 progress=lambda _: None) -> dict:
    """Start a fresh embedded PostgreSQL, apply the migrations, load and re-cluster; nothing else is touched."""
    with tempfile.TemporaryDirectory(prefix="deer-census-bench-") as home:
        pg = EmbeddedPostgres(Path(home) / "pg")
        dsn = pg.start()
        try:
            asyncio.run(migrate(dsn))
            return asyncio.run(_measure(dsn, n, dim, per_individual, seed, progress))
        finally:
            pg.stop()
