"""Fusion's gallery lookup on the real PostgreSQL + pgvector: the HNSW index orders the exemplars, an
incompatible sex never comes back and never leaves the answer short, and `bench --gallery` reports."""
from __future__ import annotations

import asyncpg
import numpy as np
import pytest

from deer_reid import gallery_bench as gb
from services.fusion import store
from shared.db import create_pool


@pytest.fixture
async def pool(pg_dsn):
    async def clean():
        conn = await asyncpg.connect(pg_dsn)
        await conn.execute("TRUNCATE images, detections, outbox, embeddings, individuals CASCADE")
        await conn.close()

    await clean()
    p = await create_pool(pg_dsn, max_size=2)
    yield p
    await p.close()
    await clean()


async def test_the_nearest_compatible_exemplars_come_back_however_many_incompatible_ones_are_nearer(pool):
    vectors, owner, asked = gb.synthetic_gallery(2400, 1280, 8, 5, seed=3)
    ids, _ = await gb._load(pool, vectors, owner)
    query = asked[0]
    order = gb.exact_top_k(gb.unit_rows(vectors), query, len(vectors))  # every exemplar, nearest first
    # the 200 nearest exemplars' individuals become female: a buck's query must look past all of them
    near_individuals = sorted({int(i) for i in owner[order[:200]]})
    async with pool.acquire() as conn:
        ind_ids = [r["individual_id"] for r in await conn.fetch(
            "SELECT individual_id FROM embeddings WHERE id = ANY($1::bigint[])", [int(ids[i]) for i in order[:200]])]
        await conn.execute("UPDATE individuals SET sex = 'female' WHERE id = ANY($1::bigint[])", ind_ids)
        await conn.execute("UPDATE individuals SET sex = 'male' WHERE NOT (id = ANY($1::bigint[]))", ind_ids)
        sex_of = {r["id"]: r["sex"] for r in await conn.fetch("SELECT id, sex FROM individuals")}
        async with conn.transaction():
            await store.prepare_search(conn, 50)
            found = await store.nearest_exemplars(conn, query.astype(np.float32), gb.VERSION, gb.PROPERTY,
                                                  "male", 50)
            as_doe = await store.nearest_exemplars(conn, query.astype(np.float32), gb.VERSION, gb.PROPERTY,
                                                   "female", 50)
    assert len(near_individuals) > 1
    assert len(found) == 50 and all(sex_of[ind] == "male" for ind, _, _ in found)
    sims = [s for _, s, _ in found]
    assert sims == sorted(sims, reverse=True)
    # the same 50 as exact search over the male exemplars (an HNSW search may miss one)
    males = {r["id"] for r in await pool.fetch(
        "SELECT e.id FROM embeddings e JOIN individuals i ON i.id = e.individual_id WHERE i.sex = 'male'")}
    exact = [int(ids[i]) for i in order if int(ids[i]) in males][:50]
    assert len(set(exact) & {e for _, _, e in found}) >= 49
    # and a doe's query is answered by the nearest (female) ones
    assert len(as_doe) == 50 and all(sex_of[ind] == "female" for ind, _, _ in as_doe)


def test_bench_gallery_reports_latency_recall_and_the_index():
    result = gb.gallery_bench(3000, queries=30, k=20)
    assert result["exemplars"] == 3000 and result["k"] == 20
    assert result["queries"] == 30 and result["warm_up_queries"] == 30 and result["ef_search"] == 40
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert 0.9 <= result["recall_at_k"] <= 1.0
    c = result["cosines"]
    assert c["within_individual_median"] > c["between_individuals_median"] + 0.2


async def test_the_peer_baseline_embeds_and_queries_one_detection_at_a_time(pool, pg_dsn, nyala_paths):
    from deer_reid.bench import peer_throughput

    vectors, owner, _ = gb.synthetic_gallery(400, 1280, 8, 1)
    await gb._load(pool, vectors, owner)
    crops = [p.read_bytes() for p in nyala_paths[:3]]
    result = await peer_throughput(crops, pg_dsn)
    assert result["gallery_version"] == gb.VERSION  # it queried the gallery that is there
    assert result["det_per_s"] > 0 and result["ms_per_det"] == pytest.approx(1000 / result["det_per_s"], rel=0.05)


async def test_the_gallery_indexes_are_built_wide_and_searched_at_twice_k(pool, pg_dsn):
    conn = await asyncpg.connect(pg_dsn)
    try:
        definitions = [r["indexdef"] for r in await conn.fetch(
            "SELECT indexdef FROM pg_indexes WHERE indexname LIKE 'embeddings_gallery_%'")]
        assert len(definitions) == 4
        assert all("ef_construction='128'" in d and "hnsw" in d for d in definitions), definitions
        async with conn.transaction():
            await store.prepare_search(conn, 50)
            assert await conn.fetchval("SHOW hnsw.ef_search") == "100"
            assert await conn.fetchval("SHOW hnsw.iterative_scan") == "relaxed_order"
        assert await conn.fetchval("SHOW hnsw.ef_search") == "40"  # SET LOCAL: gone with the transaction
        async with conn.transaction():
            await store.prepare_search(conn, 3)  # never under pgvector's own default
            assert await conn.fetchval("SHOW hnsw.ef_search") == "40"
    finally:
        await conn.close()


def test_the_embedded_database_holds_a_quarter_of_memory_in_shared_buffers(tmp_path):
    from shared.embedded import postgres_settings, write_settings

    assert postgres_settings(24 * 2**30) == {"shared_buffers": "2048MB"}
    assert postgres_settings(4 * 2**30) == {"shared_buffers": "1024MB"}
    assert postgres_settings(256 * 2**20) == {"shared_buffers": "128MB"}
    (tmp_path / "postgresql.conf").write_text("# initdb's\n")
    write_settings(tmp_path, {"shared_buffers": "1024MB"})
    write_settings(tmp_path, {"shared_buffers": "512MB"})  # every start rewrites ours, includes once
    assert (tmp_path / "postgresql.conf").read_text().count("include_if_exists = 'deer-reid.conf'") == 1
    assert (tmp_path / "deer-reid.conf").read_text() == "shared_buffers = '512MB'\n"


async def test_the_embedded_database_runs_with_those_settings(pg_dsn):
    from shared.embedded import physical_memory, postgres_settings

    conn = await asyncpg.connect(pg_dsn)
    try:
        shown = await conn.fetchval(
            "SELECT setting::bigint * 8192 / 1048576 FROM pg_settings WHERE name = 'shared_buffers'")
    finally:
        await conn.close()
    assert f"{shown}MB" == postgres_settings(physical_memory())["shared_buffers"]
