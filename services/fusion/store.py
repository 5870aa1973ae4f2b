"""Fusion's database side: the join state, the gallery lookup, and the assignment transaction.

Individuals, the gallery and the serialization of identity assignment belong to the property (every
camera site of one population), never to a single site.
"""
from __future__ import annotations

from uuid import UUID

import asyncpg
import numpy as np

from services.fusion.decision import ASSIGNED, COMPATIBLE_SEXES, NEW, Decision
from services.fusion.temporal import Sighting
from shared import coat as coat_features
from shared import exemplars as exemplar_choice
from shared.components.coat import PATTERN_OF
from shared.components.pose import Seen
from shared.identity import lock_property, rechoose_exemplars
from shared.schemas import Embedding
from shared.viewpoints import VIEWPOINT_SQL

__all__ = ["lock_property", "rechoose_exemplars"]  # the identity mechanics fusion shares: shared/identity.py


async def lock_detection(conn: asyncpg.Connection, detection_id: UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """SELECT id, state, individual_id, score, result, property, site, camera, captured_at, cls,
                  image_sha256, expected, pipeline, join_deadline, box, sighting, requests_resent
           FROM detections WHERE id = $1 FOR UPDATE""", detection_id)


def expected_of(detection: asyncpg.Record) -> list[str]:
    """The components a detection waits for (stamped at its first publication; body alone before that)."""
    return list(detection["expected"] or ["body"])


async def joined_features(conn: asyncpg.Connection, detection_id: UUID, component: str) -> dict:
    """The features a component's event brought to the join (as `join.stored_features` kept them)."""
    return await conn.fetchval("SELECT features FROM detection_features WHERE detection_id = $1 AND component = $2",
                               detection_id, component)


async def arrived(conn: asyncpg.Connection, detection_id: UUID) -> dict[str, str]:
    """{component: status} of what has joined so far."""
    rows = await conn.fetch("SELECT component, status FROM detection_features WHERE detection_id = $1",
                            detection_id)
    return {r["component"]: r["status"] for r in rows}


async def add_feature(conn: asyncpg.Connection, detection_id: UUID, component: str, status: str, features: dict,
                      *, late: bool = False) -> bool:
    """Record a component's arrival; False when it had arrived before (a redelivery)."""
    return bool(await conn.fetchval(
        """INSERT INTO detection_features (detection_id, component, status, features, late)
           VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING true""",
        detection_id, component, status, features, late))


async def start_fusing(conn: asyncpg.Connection, detection_id: UUID, deadline_s: float | None) -> None:
    """The detection is joining; with `deadline_s`, the anchoring body arrived and the join clock starts."""
    await conn.execute(
        """UPDATE detections SET state = 'fusing', updated_at = now(),
               join_deadline = CASE WHEN $2::float8 IS NULL THEN join_deadline
                                    ELSE coalesce(join_deadline, now() + make_interval(secs => $2::float8)) END
           WHERE id = $1 AND state IN ('received', 'extracting', 'fusing')""", detection_id, deadline_s)


async def expect_more(conn: asyncpg.Connection, detection_id: UUID, component: str, deadline_s: float) -> None:
    """Wait for one more component (a selective pose request) and give the join a fresh deadline.

    The deadline counts from this statement (clock_timestamp), not from the transaction's start (now()):
    the scoring before it may take a while on a busy machine, and the request only leaves after commit."""
    await conn.execute(
        """UPDATE detections SET expected = array_append(coalesce(expected, ARRAY['body']), $2),
               join_deadline = clock_timestamp() + make_interval(secs => $3::float8), updated_at = now()
           WHERE id = $1 AND NOT ($2 = ANY(coalesce(expected, ARRAY['body'])))""", detection_id, component, deadline_s)


async def expect_again(conn: asyncpg.Connection, detection_id: UUID, deadline_s: float) -> None:
    """A selective request is sent again: counted, and the join gets a fresh deadline for its answer."""
    await conn.execute(
        """UPDATE detections SET requests_resent = requests_resent + 1, updated_at = now(),
               join_deadline = clock_timestamp() + make_interval(secs => $2::float8) WHERE id = $1""",
        detection_id, deadline_s)


async def fail(conn: asyncpg.Connection, detection_id: UUID, reason: str) -> None:
    await conn.execute(
        """UPDATE detections SET state = 'failed', state_reason = $2, updated_at = now()
           WHERE id = $1 AND state IN ('received', 'extracting', 'fusing')""", detection_id, reason[:2000])


async def known_dim(conn: asyncpg.Connection, version: str) -> int | None:
    return await conn.fetchval("SELECT dim FROM embeddings WHERE version = $1 LIMIT 1", version)


async def store_embeddings(conn: asyncpg.Connection, detection_id: UUID, site: str, prop: str,
                           embeddings: list[Embedding]) -> None:
    await conn.executemany(
        """INSERT INTO embeddings (detection_id, version, model, dim, random_weights, vec, site, property)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (detection_id, version) DO NOTHING""",
        [(detection_id, e.version, e.model, e.dim, e.random_weights, e.array().astype(np.float32), site, prop)
         for e in embeddings],
    )


async def body_embeddings(conn: asyncpg.Connection, detection_id: UUID) -> list[tuple[str, str, np.ndarray, bool]]:
    """(model, version, vector, random_weights) of the detection's stored body embeddings."""
    rows = await conn.fetch(
        "SELECT model, version, vec, random_weights FROM embeddings WHERE detection_id = $1 ORDER BY model",
        detection_id)
    return [(r["model"], r["version"], np.asarray(r["vec"].to_numpy(), dtype=np.float32), r["random_weights"])
            for r in rows]


# hnsw.ef_search per candidate asked for. Measured with `deer-reid bench --gallery 100000` (k = 50,
# ef_construction 128): twice k gave recall@50 0.989 at p99 7 ms; four times k 0.997 at 12 ms.
EF_SEARCH_PER_CANDIDATE = 2


def ef_search_for(k: int) -> int:
    """The HNSW candidate list for k candidates: EF_SEARCH_PER_CANDIDATE x k, within pgvector's 40..1000."""
    return min(1000, max(40, EF_SEARCH_PER_CANDIDATE * int(k)))


async def prepare_search(conn: asyncpg.Connection, k: int) -> None:
    """Index search settings for this transaction, for k candidates a lookup: the candidate list, and
    iterative scans so that the property and sex filters cannot starve the HNSW result. One round trip."""
    await conn.execute(f"SET LOCAL hnsw.ef_search = {ef_search_for(k)}; "
                       "SET LOCAL hnsw.iterative_scan = relaxed_order")


async def max_individual(conn: asyncpg.Connection, prop: str) -> int:
    return await conn.fetchval("SELECT coalesce(max(id), 0) FROM individuals WHERE property = $1", prop)


async def exemplars_seen(conn: asyncpg.Connection, exemplar_ids: list[int]) -> dict[int, Seen]:
    """{embedding id: its detection's viewpoint (None: not known, the pose component's rule) and its vector}."""
    rows = await conn.fetch(f"""SELECT e.id, e.vec, {VIEWPOINT_SQL} AS viewpoint FROM embeddings e
                                JOIN detections d ON d.id = e.detection_id WHERE e.id = ANY($1::bigint[])""",
                            exemplar_ids)
    return {r["id"]: Seen(r["viewpoint"], np.asarray(r["vec"].to_numpy(), dtype=np.float32)) for r in rows}


def nearest_sql(dim: int) -> str:
    """The gallery lookup: the HNSW index alone orders the exemplars (a CTE, so that no join can talk the
    planner out of the index), then their individuals' sexes are looked up for the few it returned.
    Parameters: vector, version, property, how many to fetch, the compatible sexes."""
    return f"""WITH near AS MATERIALIZED (
                   SELECT e.id, e.individual_id, e.vec::halfvec({dim}) <=> $1::halfvec({dim}) AS distance
                   FROM embeddings e
                   WHERE e.exemplar AND e.dim = {dim} AND e.version = $2 AND e.property = $3
                   ORDER BY e.vec::halfvec({dim}) <=> $1::halfvec({dim})
                   LIMIT $4)
               SELECT near.id, near.individual_id, 1 - near.distance AS sim,
                      i.sex = ANY($5::text[]) AS compatible
               FROM near JOIN individuals i ON i.id = near.individual_id
               ORDER BY near.distance"""


async def nearest_exemplars(conn: asyncpg.Connection, vector: np.ndarray, version: str, prop: str, sex: str,
                            k: int) -> list[tuple[int, float, int]]:
    """(individual, similarity, exemplar id) of the k nearest gallery exemplars of the same embedding
    version, property and a compatible sex. Exemplars of an incompatible sex are dropped after the index
    search; while they leave fewer than k, the search is widened (x4) until the gallery runs out."""
    dim = int(vector.shape[0])  # from a validated embedding: safe to put in the SQL text
    sexes = list(COMPATIBLE_SEXES[sex])
    fetch = k
    while True:
        rows = await conn.fetch(nearest_sql(dim), vector, version, prop, fetch, sexes)
        hits = [r for r in rows if r["compatible"]]
        if len(hits) >= k or len(rows) < fetch:
            return [(r["individual_id"], float(r["sim"]), r["id"]) for r in hits[:k]]
        fetch *= 4


async def exemplars_founded_after(conn: asyncpg.Connection, version: str, prop: str, sex: str,
                                  after_id: int) -> list[tuple[int, np.ndarray, int]]:
    """(individual, vector, exemplar id) of the exemplars of individuals founded after the search (under the
    lock: nothing is founded meanwhile)."""
    rows = await conn.fetch(
        """SELECT e.individual_id, e.vec, e.id FROM embeddings e JOIN individuals i ON i.id = e.individual_id
           WHERE e.exemplar AND e.version = $1 AND i.property = $2 AND i.id > $3 AND i.sex = ANY($4::text[])""",
        version, prop, after_id, list(COMPATIBLE_SEXES[sex]))
    return [(r["individual_id"], np.asarray(r["vec"].to_numpy(), dtype=np.float32), r["id"]) for r in rows]


async def sighting_vectors(conn: asyncpg.Connection, detection_id: UUID, sighting: UUID | None,
                           limit: int = 4) -> list[tuple[str, str, np.ndarray]]:
    """(model, version, vector) of the other frames of the detection's sighting already embedded (the
    newest `limit`): the sighting is the query, not one frame of it."""
    if sighting is None:
        return []
    rows = await conn.fetch(
        """SELECT e.model, e.version, e.vec FROM embeddings e
           WHERE e.detection_id IN (SELECT id FROM detections WHERE sighting = $1 AND id <> $2
                                    ORDER BY captured_at DESC LIMIT $3)""", sighting, detection_id, limit)
    return [(r["model"], r["version"], np.asarray(r["vec"].to_numpy(), dtype=np.float32)) for r in rows]


async def sighting_individual(conn: asyncpg.Connection, detection_id: UUID, sighting: UUID | None) -> int | None:
    """The individual the detection's sighting was already placed in (its earliest placed frame)."""
    if sighting is None:
        return None
    return await conn.fetchval(
        """SELECT individual_id FROM detections WHERE sighting = $1 AND id <> $2 AND individual_id IS NOT NULL
           AND state IN ('assigned', 'new') ORDER BY captured_at, id LIMIT 1""", sighting, detection_id)


async def unmerged_sex(conn: asyncpg.Connection, individual: int) -> str | None:
    """The individual's sex; None when it was merged into another."""
    return await conn.fetchval("SELECT sex FROM individuals WHERE id = $1 AND merged_into IS NULL", individual)


async def cannot_link(conn: asyncpg.Connection, detection_id: UUID, image_sha256: str) -> set[int]:
    """Individuals of the other animals in the same image: two boxes of one frame are two deer."""
    rows = await conn.fetch(
        """SELECT DISTINCT individual_id FROM detections
           WHERE image_sha256 = $1 AND id <> $2 AND individual_id IS NOT NULL""", image_sha256, detection_id)
    return {r["individual_id"] for r in rows}


async def merged_away(conn: asyncpg.Connection, individuals: list[int]) -> set[int]:
    """Those of `individuals` that were merged into another (read under the property lock)."""
    rows = await conn.fetch("SELECT id FROM individuals WHERE id = ANY($1::bigint[]) AND merged_into IS NOT NULL",
                            individuals)
    return {r["id"] for r in rows}


async def sightings(conn: asyncpg.Connection, individuals: list[int], limit_each: int = 500) -> dict[int, list[Sighting]]:
    """The newest placed sightings of each individual (temporal priors)."""
    rows = await conn.fetch(
        """SELECT individual_id, site, captured_at FROM (
               SELECT individual_id, site, captured_at,
                      row_number() OVER (PARTITION BY individual_id ORDER BY captured_at DESC) AS n
               FROM detections WHERE individual_id = ANY($1::bigint[]) AND state IN ('assigned', 'new')) s
           WHERE n <= $2""", individuals, limit_each)
    out: dict[int, list[Sighting]] = {i: [] for i in individuals}
    for r in rows:
        out[r["individual_id"]].append(Sighting(r["site"], r["captured_at"]))
    return out


async def site_coordinates(conn: asyncpg.Connection, prop: str) -> dict[str, tuple[float, float]]:
    rows = await conn.fetch("SELECT name, lat, lon FROM sites WHERE property = $1 AND lat IS NOT NULL", prop)
    return {r["name"]: (r["lat"], r["lon"]) for r in rows}


async def active_calibration(conn: asyncpg.Connection, known_id: int | None) -> tuple[int | None, dict | None]:
    """(id, artifact) of the newest active calibration; the artifact only when its id differs from `known_id`."""
    row = await conn.fetchrow("SELECT id FROM calibrations WHERE active AND property IS NULL ORDER BY id DESC LIMIT 1")
    if row is None:
        return None, None
    if row["id"] == known_id:
        return known_id, None
    return row["id"], await conn.fetchval("SELECT artifact FROM calibrations WHERE id = $1", row["id"])


async def property_calibrations(conn: asyncpg.Connection, known: dict[str, int]) -> list[tuple[str, int, dict | None]]:
    """(property, id, artifact) of each property's newest active calibration; the artifact only when its id
    differs from `known[property]`."""
    rows = await conn.fetch("SELECT DISTINCT ON (property) property, id FROM calibrations "
                            "WHERE active AND property IS NOT NULL ORDER BY property, id DESC")
    out = []
    for r in rows:
        same = known.get(r["property"]) == r["id"]
        artifact = None if same else await conn.fetchval("SELECT artifact FROM calibrations WHERE id = $1", r["id"])
        out.append((r["property"], r["id"], artifact))
    return out


async def apply_decision(conn: asyncpg.Connection, *, detection: asyncpg.Record, sex: str, decision: Decision,
                         result: dict, exemplars_per_individual: int) -> int | None:
    """Found or update the individual, link the embeddings, re-choose exemplars, set the terminal state."""
    detection_id, prop, captured_at = detection["id"], detection["property"], detection["captured_at"]
    individual = decision.individual_id
    if decision.state == NEW:
        individual = await conn.fetchval(
            """INSERT INTO individuals (site, property, sex, first_seen, last_seen, sightings, founded_by)
               VALUES ($1, $2, $3, $4, $4, 1, $5) RETURNING id""",
            detection["site"], prop, sex, captured_at, detection_id)
    elif decision.state == ASSIGNED:
        live = await conn.fetchval(
            """UPDATE individuals SET sightings = sightings + 1,
                   first_seen = least(first_seen, $2), last_seen = greatest(last_seen, $2),
                   sex = CASE WHEN sex = 'unknown' THEN $3 ELSE sex END
               WHERE id = $1 AND merged_into IS NULL RETURNING id""", individual, captured_at, sex)
        if live is None:  # candidates merged away are excluded under the lock: never store a hidden sighting
            raise RuntimeError(f"individual {individual} was merged away before detection {detection_id} joined it")
    if individual is not None:
        await conn.execute("UPDATE embeddings SET individual_id = $2 WHERE detection_id = $1", detection_id, individual)
        await place_in_gallery(conn, detection_id, individual, exemplars_per_individual)
    result = {**result, "individual_id": individual}
    await conn.execute(
        """UPDATE detections SET state = $2, individual_id = $3, score = $4, result = $5,
               decided_by = 'fusion', state_reason = NULL, join_deadline = NULL, updated_at = now()
           WHERE id = $1""", detection_id, decision.state, individual, decision.score, result)
    await conn.execute(
        "INSERT INTO decisions (detection_id, decided_by, state, individual_id, score) VALUES ($1, 'fusion', $2, $3, $4)",
        detection_id, decision.state, individual, decision.score)
    return individual


async def add_edges(conn: asyncpg.Connection, prop: str, detection_id: UUID,
                    edges: list[tuple[UUID, dict, float | None]]) -> None:
    """The identity graph's edges from a decided detection to other photos: (photo, raw component scores,
    calibrated P(same) or None). Fusion's edge of a pair replaces the census job's body-only one."""
    await conn.executemany(
        """INSERT INTO identity_edges (property, a, b, components, probability, source)
           VALUES ($1, $2, $3, $4, $5, 'fusion')
           ON CONFLICT (a, b) DO UPDATE SET components = EXCLUDED.components, probability = EXCLUDED.probability,
               source = 'fusion', updated_at = now()""",
        [(prop, min(detection_id, photo), max(detection_id, photo), comps, p) for photo, comps, p in edges])


async def place_in_gallery(conn: asyncpg.Connection, detection_id: UUID, individual: int, n: int) -> None:
    """The gallery after a new sighting, by `shared.exemplars.on_new_sighting` (`held`: the individual's
    exemplars of the versions this detection has)."""
    held, sightings = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM embeddings x JOIN embeddings e ON e.version = x.version
                   WHERE e.detection_id = $2 AND x.individual_id = $1 AND x.exemplar),
                  (SELECT sightings FROM individuals WHERE id = $1)""", individual, detection_id)
    step = exemplar_choice.on_new_sighting(held, sightings, n)
    if step == exemplar_choice.JOIN:
        await conn.execute("UPDATE embeddings SET exemplar = true WHERE detection_id = $1", detection_id)
    elif step == exemplar_choice.RECHOOSE:
        await rechoose_exemplars(conn, individual, n)


async def store_coat_patterns(conn: asyncpg.Connection, detection_id: UUID,
                              patterns: dict[str, tuple[str, int, bytes]]) -> None:
    """{matcher: (version, keypoints, packed bytes)} of one detection; a redelivery changes nothing."""
    await conn.executemany(
        """INSERT INTO coat_patterns (detection_id, matcher, version, keypoints, pattern) VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (detection_id, matcher) DO NOTHING""",
        [(detection_id, matcher, *p) for matcher, p in patterns.items()])


async def coat_of(conn: asyncpg.Connection, detection_ids: list[UUID],
                  cache: coat_features.PatternCache | None = None) -> dict[UUID, dict]:
    """{detection: its stored coat features, status and patterns ({matcher: (version, bytes or `Pattern`)})} for
    those whose coat features arrived. With a `cache`, the patterns it holds are not read again: their bytes
    stay in the database and the cached `Pattern` stands in; those read are unpacked into it."""
    held = cache.holding((d, m) for d in detection_ids for m in PATTERN_OF) if cache is not None else {}
    known = [(d, m, v) for (d, m), (v, _) in held.items()]
    rows = await conn.fetch(
        """SELECT f.detection_id, f.status, f.features, p.matcher, p.version AS pattern_version,
                  CASE WHEN (p.detection_id, p.matcher, p.version) IN
                            (SELECT * FROM unnest($2::uuid[], $3::text[], $4::text[])) THEN NULL
                       ELSE p.pattern END AS pattern
           FROM detection_features f LEFT JOIN coat_patterns p ON p.detection_id = f.detection_id
           WHERE f.detection_id = ANY($1::uuid[]) AND f.component = 'coat'""",
        detection_ids, [d for d, _, _ in known], [m for _, m, _ in known], [v for *_, v in known])
    out: dict[UUID, dict] = {}
    for r in rows:
        stored = out.setdefault(r["detection_id"], {"status": r["status"], "features": r["features"], "patterns": {}})
        if r["matcher"] is None:
            continue
        key, version = (r["detection_id"], r["matcher"]), r["pattern_version"]
        if r["pattern"] is None:
            pattern = held[key][1]
        elif cache is not None:
            pattern = cache.put(key, version, coat_features.unpack(bytes(r["pattern"])))
        else:
            pattern = r["pattern"]
        stored["patterns"][r["matcher"]] = (version, pattern)
    return out


async def exemplar_photos(conn: asyncpg.Connection, exemplars: list[int]) -> dict[int, UUID]:
    """{exemplar embedding row: the detection (photo) it embeds}."""
    rows = await conn.fetch("SELECT id, detection_id FROM embeddings WHERE id = ANY($1::bigint[])", exemplars)
    return {r["id"]: r["detection_id"] for r in rows}


async def crop_of(conn: asyncpg.Connection, detection_id: UUID) -> bytes:
    return bytes(await conn.fetchval("SELECT crop FROM detections WHERE id = $1", detection_id))


async def store_antler(conn: asyncpg.Connection, detection_id: UUID, attributes: dict, fingerprint: np.ndarray | None,
                       version: str | None, captured_at) -> None:
    """Archive a readable antler sighting (with antlers, or a readable region without)."""
    await conn.execute(
        """INSERT INTO antler_fingerprints (detection_id, season, casting_window, present, version, fingerprint,
                                            geometry, captured_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (detection_id) DO NOTHING""",
        detection_id, attributes["season"], attributes.get("casting_window"), fingerprint is not None,
        version, None if fingerprint is None else [float(x) for x in fingerprint],
        attributes.get("geometry") or {}, captured_at)


async def antler_archive(conn: asyncpg.Connection, individuals: list[int], season: str,
                         casting_window: str | None) -> dict[int, list]:
    """{individual: [(season, casting_window, present, version, fingerprint, captured_at)]} of its placed
    sightings in the season or the casting window."""
    rows = await conn.fetch(
        """SELECT d.individual_id, a.season, a.casting_window, a.present, a.version, a.fingerprint, a.captured_at
           FROM antler_fingerprints a JOIN detections d ON d.id = a.detection_id
           WHERE d.individual_id = ANY($1::bigint[]) AND d.state IN ('assigned', 'new')
             AND (a.season = $2 OR a.casting_window = $3)""", individuals, season, casting_window)
    out: dict[int, list] = {}
    for r in rows:
        fp = None if r["fingerprint"] is None else np.asarray(r["fingerprint"], dtype=np.float32)
        out.setdefault(r["individual_id"], []).append(
            (r["season"], r["casting_window"], r["present"], r["version"], fp, r["captured_at"]))
    return out
