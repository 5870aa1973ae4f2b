"""Fusion's database side: the gallery lookup and the assignment transaction."""
from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg
import numpy as np

from services.fusion.decision import ASSIGNED, COMPATIBLE_SEXES, NEW, Decision
from shared.schemas import Embedding


async def lock_site(conn: asyncpg.Connection, site: str) -> None:
    """Serialize identity assignment per site for the rest of the transaction."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", site)


async def lock_detection(conn: asyncpg.Connection, detection_id: UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT state, individual_id, score, result FROM detections WHERE id = $1 FOR UPDATE", detection_id)


async def prepare_search(conn: asyncpg.Connection) -> None:
    """Index search settings for this transaction: a wide candidate list, and iterative scans so
    that the site and sex filters cannot starve the HNSW result."""
    await conn.execute("SET LOCAL hnsw.ef_search = 200")
    await conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")


async def nearest_exemplars(conn: asyncpg.Connection, emb: Embedding, site: str, sex: str,
                            k: int) -> list[tuple[int, float]]:
    """The k nearest gallery exemplars of the same embedding version, site and a compatible sex."""
    dim = int(emb.dim)  # an int from a validated event: safe to put in the SQL text
    rows = await conn.fetch(
        f"""SELECT e.individual_id, 1 - (e.vec::halfvec({dim}) <=> $1::halfvec({dim})) AS sim
            FROM embeddings e JOIN individuals i ON i.id = e.individual_id
            WHERE e.exemplar AND e.dim = {dim} AND e.version = $2 AND e.site = $3 AND i.sex = ANY($4::text[])
            ORDER BY e.vec::halfvec({dim}) <=> $1::halfvec({dim})
            LIMIT $5""",
        emb.array(), emb.version, site, list(COMPATIBLE_SEXES[sex]), k,
    )
    return [(r["individual_id"], float(r["sim"])) for r in rows]


async def store_embeddings(conn: asyncpg.Connection, detection_id: UUID, site: str,
                           embeddings: list[Embedding]) -> None:
    await conn.executemany(
        """INSERT INTO embeddings (detection_id, version, model, dim, random_weights, vec, site)
           VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (detection_id, version) DO NOTHING""",
        [(detection_id, e.version, e.model, e.dim, e.random_weights, e.array().astype(np.float32), site)
         for e in embeddings],
    )


async def apply_decision(conn: asyncpg.Connection, *, detection_id: UUID, site: str, sex: str,
                         captured_at: datetime, decision: Decision, result: dict,
                         exemplars_per_individual: int) -> int | None:
    """Found or update the individual, link the embeddings, and set the detection's terminal state."""
    individual = decision.individual_id
    if decision.state == NEW:
        individual = await conn.fetchval(
            """INSERT INTO individuals (site, sex, first_seen, last_seen, sightings, founded_by)
               VALUES ($1, $2, $3, $3, 1, $4) RETURNING id""", site, sex, captured_at, detection_id)
    elif decision.state == ASSIGNED:
        await conn.execute(
            """UPDATE individuals SET sightings = sightings + 1,
                   first_seen = least(first_seen, $2), last_seen = greatest(last_seen, $2),
                   sex = CASE WHEN sex = 'unknown' THEN $3 ELSE sex END
               WHERE id = $1""", individual, captured_at, sex)
    if individual is not None:
        # Keep a few exemplars per individual (several views, not one vector); the rest stay searchable rows.
        await conn.execute(
            """UPDATE embeddings e SET individual_id = $2,
                   exemplar = (SELECT count(*) FROM embeddings x
                               WHERE x.individual_id = $2 AND x.exemplar AND x.version = e.version) < $3
               WHERE e.detection_id = $1""", detection_id, individual, exemplars_per_individual)
    result = {**result, "individual_id": individual}
    await conn.execute(
        """UPDATE detections SET state = $2, individual_id = $3, score = $4, result = $5,
               decided_by = 'fusion', state_reason = NULL, updated_at = now()
           WHERE id = $1""", detection_id, decision.state, individual, decision.score, result)
    return individual
