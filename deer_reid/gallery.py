"""`deer-reid gallery rebuild`: re-choose every individual's exemplars (and so refresh the HNSW indexes).

Fusion re-chooses an individual's exemplars each time it is seen; a rebuild does it for all of them
at once, e.g. after changing DEER_EXEMPLARS_PER_INDIVIDUAL or after human merges and splits.
"""
from __future__ import annotations

import asyncpg
from tqdm import tqdm

from services.fusion import store
from shared.db import create_pool


async def rebuild(dsn: str, exemplars_per_individual: int, *, prop: str | None = None, progress: bool = True) -> dict:
    pool = await create_pool(dsn, max_size=2)
    try:
        ids = [r["id"] for r in await pool.fetch(
            "SELECT id FROM individuals WHERE $1::text IS NULL OR property = $1 ORDER BY id", prop)]
        before = await pool.fetchval("SELECT count(*) FROM embeddings WHERE exemplar")
        for ind in tqdm(ids, desc="gallery", unit="individual", disable=not progress):
            async with pool.acquire() as conn, conn.transaction():
                await _lock(conn, ind)
                await store.rechoose_exemplars(conn, ind, exemplars_per_individual)
        after = await pool.fetchval("SELECT count(*) FROM embeddings WHERE exemplar")
        return {"individuals": len(ids), "exemplars_before": before, "exemplars_after": after,
                "exemplars_per_individual": exemplars_per_individual}
    finally:
        await pool.close()


async def _lock(conn: asyncpg.Connection, individual: int) -> None:
    """Take the individual's property lock, so a rebuild never races a decision about it."""
    prop = await conn.fetchval("SELECT property FROM individuals WHERE id = $1", individual)
    await store.lock_property(conn, prop)
