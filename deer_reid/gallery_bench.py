"""`deer-reid bench --gallery N`: fusion's nearest-exemplar search against a gallery of N exemplars.

The gallery lives where fusion's does (PostgreSQL + pgvector, the migrations' HNSW index, halfvec), in a
fresh embedded database, and every query is fusion's own (`store.prepare_search` then
`store.nearest_exemplars`, k = DEER_CANDIDATES_K): the latency is that of a candidate lookup as fusion
makes it, over one connection, measured at the client. Recall is against exact search: the same
similarities computed over every exemplar in NumPy (from the same half-precision vectors).

The vectors are synthetic, for scale only: no labelled set here has 100,000 exemplars. They are shaped
like re-identification embeddings rather than isotropic noise: all share a mean direction (animals of
one species look alike), individuals differ within a low-rank subspace, and each exemplar is its
individual's centre plus noise. The report gives the cosines this produced, within and between
individuals, so the difficulty can be read next to real galleries'.
"""
from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pgvector import HalfVector

from services.fusion import store
from shared.db import create_pool, migrate
from shared.embedded import EmbeddedPostgres

PROPERTY = "gallery-bench"
VERSION = "gallery-bench:synthetic"


def synthetic_gallery(n: int, dim: int, per_individual: int, queries: int, seed: int = 0, rank: int = 64
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exemplars float16 [n, dim], their individual [n], queries float16 [q, dim]); queries are new
    sightings of individuals in the gallery."""
    rng = np.random.default_rng(seed)
    individuals = max(1, n // per_individual)
    mean = rng.standard_normal(dim).astype(np.float32)
    basis = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    centres = unit(0.8 * unit(mean) + unit(rng.standard_normal((individuals, rank)).astype(np.float32) @ basis))

    def sightings(owner: np.ndarray) -> np.ndarray:
        noise = unit(rng.standard_normal((len(owner), dim)).astype(np.float32))
        return unit(centres[owner] + 0.6 * noise).astype(np.float16)

    owner = np.arange(n) % individuals
    return sightings(owner), owner, sightings(rng.integers(0, individuals, queries))


def cosines(vectors: np.ndarray, owner: np.ndarray, seed: int = 1, pairs: int = 20000) -> dict:
    """Median cosine of pairs of exemplars of one individual, and of two individuals. The pairs within are
    drawn as such: at 100,000 exemplars two random ones almost never share an individual."""
    rng = np.random.default_rng(seed)
    v, n = unit_rows(vectors), len(vectors)
    individuals = int(owner.max()) + 1
    ind = rng.integers(0, individuals, pairs)
    count = (n - ind + individuals - 1) // individuals  # owner is index % individuals: its exemplars
    ind, count = ind[count >= 2], count[count >= 2]
    first = rng.integers(0, count)
    second = (first + rng.integers(1, count)) % count
    within = np.einsum("ij,ij->i", v[ind + first * individuals], v[ind + second * individuals])
    a, b = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    other = owner[a] != owner[b]
    between = np.einsum("ij,ij->i", v[a[other]], v[b[other]])
    return {"within_individual_median": round(float(np.median(within)), 3) if len(within) else None,
            "between_individuals_median": round(float(np.median(between)), 3)}


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (from the stored half-precision values): cosine is then a dot product."""
    v = vectors.astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def exact_top_k(gallery: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Indexes of the k rows nearest `query` by cosine, nearest first; `gallery` as unit_rows gives it."""
    sims = gallery @ unit_rows(query[None])[0]
    top = np.argpartition(-sims, min(k, len(sims) - 1))[:k]
    return top[np.argsort(-sims[top])]


def percentile_ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values) * 1000, q)), 2)


async def _load(pool, vectors: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, float]:
    """Insert the gallery as fusion leaves it (images, detections, individuals, exemplar embeddings);
    returns the embedding ids in row order and the seconds the HNSW index took to build."""
    dim = vectors.shape[1]
    now = datetime.now(timezone.utc)
    individuals = int(owner.max()) + 1
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO properties (name) VALUES ($1) ON CONFLICT DO NOTHING", PROPERTY)
        ind_ids = await conn.fetch(
            """INSERT INTO individuals (site, sex, first_seen, last_seen, property)
               SELECT 'bench', 'unknown', $1, $1, $2 FROM generate_series(1, $3) RETURNING id""",
            now, PROPERTY, individuals)
        ind_of = np.array([r["id"] for r in ind_ids], dtype=np.int64)
        shas = [hashlib.sha256(f"gallery-bench-{i}".encode()).hexdigest() for i in range(len(vectors))]
        det_ids = [uuid.uuid5(uuid.NAMESPACE_OID, s) for s in shas]
        await conn.copy_records_to_table(
            "images", columns=["sha256", "byte_size", "width", "height", "format", "original_name", "site",
                               "camera", "captured_at", "time_source"],
            records=[(s, 0, 1, 1, "JPEG", f"{i}.jpg", "bench", "cam", now, "request") for i, s in enumerate(shas)])
        await conn.copy_records_to_table(
            "detections", columns=["id", "image_sha256", "ordinal", "box", "cls", "site", "camera", "captured_at",
                                   "crop", "state", "individual_id", "property"],
            records=[(d, s, 0, [0, 0, 1, 1], "unknown", "bench", "cam", now, b"", "assigned",
                      int(ind_of[owner[i]]), PROPERTY) for i, (d, s) in enumerate(zip(det_ids, shas))])
        # The gallery index is built once over the loaded rows (as a restore or `gallery rebuild` would),
        # from the migration's own definition; inserting row by row into it would only be slower.
        index = f"embeddings_gallery_{dim}"
        definition = await conn.fetchval("SELECT indexdef FROM pg_indexes WHERE indexname = $1", index)
        if definition is None:
            raise ValueError(f"no gallery index for {dim}-dimensional embeddings ({index})")
        await conn.execute(f"DROP INDEX {index}")
        await conn.copy_records_to_table(
            "embeddings", columns=["detection_id", "version", "model", "dim", "random_weights", "vec", "site",
                                   "individual_id", "exemplar", "property"],
            records=[(d, VERSION, "synthetic", dim, False, HalfVector(v), "bench", int(ind_of[owner[i]]), True,
                      PROPERTY) for i, (d, v) in enumerate(zip(det_ids, vectors))])
        started = time.perf_counter()
        await conn.execute("SET maintenance_work_mem = '1GB'")
        await conn.execute(definition, timeout=3600)  # minutes at 100,000, past the pool's 60 s
        build_s = time.perf_counter() - started
        await conn.execute("ANALYZE")  # as autovacuum would have, in a database that grew to this size
        rows = await conn.fetch("SELECT id, detection_id FROM embeddings WHERE version = $1", VERSION)
    by_detection = {r["detection_id"]: r["id"] for r in rows}
    return np.array([by_detection[d] for d in det_ids], dtype=np.int64), build_s


async def _measure(dsn: str, n: int, dim: int, k: int, queries: int, per_individual: int, seed: int,
                   progress) -> dict:
    # Warm-up queries of their own, then the timed ones: a running fusion's index lives in shared buffers,
    # kept there by the lookups it makes all day; a freshly built one is read in by the first lookups.
    vectors, owner, asked = synthetic_gallery(n, dim, per_individual, 2 * queries, seed)
    warm, asked = asked[:queries], asked[queries:]
    exact_gallery = unit_rows(vectors)  # once: 100,000 x 1280 is half a gigabyte in float32
    progress(f"gallery: {n} exemplars of {n // per_individual} individuals, {dim}-d; loading")
    pool = await create_pool(dsn, max_size=2)
    try:
        started = time.perf_counter()
        ids, build_s = await _load(pool, vectors, owner)
        load_s = time.perf_counter() - started
        # the exact answers before any lookup, not between timed ones, where sweeping half a gigabyte
        # would evict the CPU caches the lookups use
        exact = [set(ids[exact_top_k(exact_gallery, q, k)].tolist()) for q in asked]
        del exact_gallery
        progress(f"gallery: loaded in {load_s:.1f} s (index {build_s:.1f} s); {queries} warm-up and {queries} "
                 "timed queries")
        latencies, recalls = [], []
        async with pool.acquire() as conn:
            for timed, batch in ((False, warm), (True, asked)):
                for i, q in enumerate(batch):
                    async with conn.transaction():
                        t0 = time.perf_counter()
                        await store.prepare_search(conn, k)
                        found = await store.nearest_exemplars(conn, q.astype(np.float32), VERSION, PROPERTY,
                                                              "unknown", k)
                        elapsed = time.perf_counter() - t0
                    if timed:
                        latencies.append(elapsed)
                        recalls.append(len(exact[i] & {e for _, _, e in found}) / len(exact[i]))
            plan = "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN " + store.nearest_sql(dim), asked[0].astype(np.float32), VERSION, PROPERTY, k,
                ["male", "female", "unknown"]))
    finally:
        await pool.close()
    return {"exemplars": n, "individuals": n // per_individual, "dim": dim, "k": k, "queries": len(latencies),
            "warm_up_queries": len(warm), "ef_search": store.ef_search_for(k),
            "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
            "mean_ms": round(1000 * float(np.mean(latencies)), 2),
            "recall_at_k": round(float(np.mean(recalls)), 4), "min_recall": round(float(np.min(recalls)), 3),
            "uses_hnsw_index": f"embeddings_gallery_{dim}" in plan,
            "load_s": round(load_s, 1), "index_build_s": round(build_s, 1), "cosines": cosines(vectors, owner)}


def gallery_bench(n: int, *, dim: int = 1280, k: int = 50, queries: int = 500, per_individual: int = 8,
                  seed: int = 0, progress=lambda _: None) -> dict:
    """Start a fresh embedded PostgreSQL, apply the migrations, load and measure; nothing else is touched."""
    with tempfile.TemporaryDirectory(prefix="deer-gallery-bench-") as home:
        pg = EmbeddedPostgres(Path(home) / "pg")
        dsn = pg.start()
        try:
            asyncio.run(migrate(dsn))
            return asyncio.run(_measure(dsn, n, dim, k, queries, per_individual, seed, progress))
        finally:
            pg.stop()
