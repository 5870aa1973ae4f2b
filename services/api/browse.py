"""What people read: individuals and their profiles, the review queue, photos, the audit log, statistics.

Every query here is read-only; what changes identities is in `curation`.
"""
from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg
import numpy as np

from shared.viewpoints import viewpoint_of as detection_viewpoint
from shared.states import STATES

QUEUE_FLAGS = ("temporal-conflict", "degraded")  # fusion placed these, but a person should look


def _iso(value):
    return value.isoformat() if isinstance(value, datetime) else value


def individual_summary(r) -> dict:
    return {"id": r["id"], "name": r["name"], "tags": list(r["tags"]), "property": r["property"], "sex": r["sex"],
            "sightings": r["sightings"], "first_seen": _iso(r["first_seen"]), "last_seen": _iso(r["last_seen"]),
            "merged_into": r["merged_into"], "created_by": r["created_by"]}


def viewpoint_of(result: dict | None) -> str:
    """Pose's viewpoint where pose ran and knew; else the coat service's facing of a profile; else unknown
    (fusion's own rule, so the page's best photo per viewpoint is what fusion compares like with like)."""
    return detection_viewpoint(result) or "unknown"


async def list_individuals(pool: asyncpg.Pool, *, prop: str | None, site: str | None, sex: str | None,
                           cls: str | None, seen_from: datetime | None, seen_to: datetime | None, min_sightings: int,
                           flag: str | None, q: str | None, include_merged: bool, limit: int, offset: int) -> dict:
    where, args = ["($1::bool OR i.merged_into IS NULL AND i.sightings > 0)"], [include_merged]

    def arg(value) -> str:
        args.append(value)
        return f"${len(args)}"

    # (condition, value): a filter applies when its value is given
    on_individual = (("i.property = {}", prop), ("i.sex = {}", sex), ("i.sightings >= {}", min_sightings or None),
                     ("i.last_seen >= {}", seen_from), ("i.first_seen <= {}", seen_to))
    where += [sql.format(arg(value)) for sql, value in on_individual if value is not None]
    if q:
        pattern = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        p = arg(pattern)
        where.append(f"(i.name ILIKE {p} OR i.notes ILIKE {p} OR EXISTS (SELECT 1 FROM unnest(i.tags) t WHERE t ILIKE {p})"
                     f" OR i.id::text = {arg(q.strip())})")
    on_detections = (("d.site = {}", site), ("d.cls = {}", cls), ("d.result->'flags' ? {}", flag))
    detection_filters = [sql.format(arg(value)) for sql, value in on_detections if value is not None]
    if detection_filters:
        where.append("EXISTS (SELECT 1 FROM detections d WHERE d.individual_id = i.id AND "
                     + " AND ".join(detection_filters) + ")")
    sql_where = " AND ".join(where)
    total = await pool.fetchval(f"SELECT count(*) FROM individuals i WHERE {sql_where}", *args)
    rows = await pool.fetch(
        f"""SELECT i.*, (SELECT array_agg(DISTINCT d.site) FROM detections d WHERE d.individual_id = i.id) AS sites,
                   (SELECT d.id FROM detections d WHERE d.individual_id = i.id AND d.state IN ('assigned', 'new')
                    ORDER BY d.score DESC NULLS LAST, d.captured_at DESC LIMIT 1) AS cover
            FROM individuals i WHERE {sql_where}
            ORDER BY i.last_seen DESC, i.id DESC LIMIT {arg(limit)} OFFSET {arg(offset)}""", *args)
    return {"total": total, "limit": limit, "offset": offset,
            "individuals": [{**individual_summary(r), "sites": sorted(r["sites"] or []),
                             "cover_detection": str(r["cover"]) if r["cover"] else None} for r in rows]}


async def profile(pool: asyncpg.Pool, individual_id: int, similar_k: int = 5) -> dict | None:
    ind = await pool.fetchrow("SELECT * FROM individuals WHERE id = $1", individual_id)
    if ind is None:
        return None
    rows = await pool.fetch(
        """SELECT id, captured_at, site, camera, cls, state, decided_by, score, detector_confidence, result,
                  image_sha256
           FROM detections WHERE individual_id = $1 AND state IN ('assigned', 'new')
           ORDER BY captured_at DESC, id""", individual_id)
    hours = [0] * 24
    sites: dict[str, dict] = {}
    best: dict[str, tuple] = {}
    timeline = []
    for r in rows:
        hours[r["captured_at"].hour] += 1
        s = sites.setdefault(r["site"], {"site": r["site"], "sightings": 0, "first": r["captured_at"],
                                         "last": r["captured_at"]})
        s["sightings"] += 1
        s["first"], s["last"] = min(s["first"], r["captured_at"]), max(s["last"], r["captured_at"])
        view = viewpoint_of(r["result"])
        quality = ((r["score"] or 0.0), (r["detector_confidence"] or 0.0))
        if view not in best or quality > best[view][0]:
            best[view] = (quality, str(r["id"]))
        timeline.append({"detection": str(r["id"]), "captured_at": _iso(r["captured_at"]), "site": r["site"],
                         "camera": r["camera"], "cls": r["cls"], "state": r["state"], "decided_by": r["decided_by"],
                         "score": r["score"], "viewpoint": view, "image": r["image_sha256"]})
    return {
        **individual_summary(ind), "notes": ind["notes"],
        "timeline": timeline,
        "sites": [{**s, "first": _iso(s["first"]), "last": _iso(s["last"])}
                  for s in sorted(sites.values(), key=lambda s: -s["sightings"])],
        "hours": hours,
        "best_photos": {view: det for view, (_, det) in sorted(best.items())},
        "antler_history": await antler_history(pool, individual_id),
        "similar": await similar_individuals(pool, ind, similar_k),
    }


async def antler_history(pool: asyncpg.Pool, individual_id: int) -> list[dict]:
    """Per season: sightings with antlers read, the median points, spread and symmetry, the best photo."""
    rows = await pool.fetch(
        """SELECT a.season, a.present, a.geometry, a.detection_id FROM antler_fingerprints a
           JOIN detections d ON d.id = a.detection_id
           WHERE d.individual_id = $1 AND d.state IN ('assigned', 'new') ORDER BY a.season, a.captured_at""",
        individual_id)
    seasons: dict[str, list] = {}
    for r in rows:
        seasons.setdefault(r["season"], []).append(r)
    out = []
    for season, items in seasons.items():
        seen = [r for r in items if r["present"]]

        def median(key: str, rows=seen):
            values = [r["geometry"][key] for r in rows if r["geometry"].get(key) is not None]
            return round(float(np.median(values)), 3) if values else None

        best = max(seen, key=lambda r: r["geometry"].get("quality") or 0.0, default=None)
        out.append({"season": season, "sightings": len(items), "with_antlers": len(seen),
                    "points_left": median("points_left"), "points_right": median("points_right"),
                    "spread_ratio": median("spread_ratio"), "symmetry": median("symmetry"),
                    "formations": sorted({f for r in seen for f in r["geometry"].get("formations", [])}),
                    "best_photo": str(best["detection_id"]) if best else None})
    return out


async def similar_individuals(pool: asyncpg.Pool, ind, k: int) -> list[dict]:
    """The individuals whose gallery lies nearest this one's, with the similarity per body model.

    For each of this individual's exemplars, the nearest other exemplars of its property are looked up
    (the same HNSW index fusion searches); an individual's similarity per model is its best exemplar pair.
    The component breakdown is the body models' cosines: what fusion's first stage saw.
    """
    mine = await pool.fetch("SELECT version, model, dim, vec FROM embeddings WHERE individual_id = $1 AND exemplar",
                            ind["id"])
    best: dict[int, dict[str, float]] = {}
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL hnsw.ef_search = 100")
        await conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        for e in mine:
            dim = int(e["dim"])  # from the database's own rows: safe in the SQL text
            hits = await conn.fetch(
                f"""SELECT individual_id, 1 - (vec::halfvec({dim}) <=> $1::halfvec({dim})) AS sim FROM embeddings
                    WHERE exemplar AND dim = {dim} AND version = $2 AND property = $3 AND individual_id <> $4
                    ORDER BY vec::halfvec({dim}) <=> $1::halfvec({dim}) LIMIT 20""",
                np.asarray(e["vec"].to_numpy(), dtype=np.float32), e["version"], ind["property"], ind["id"])
            for h in hits:
                per = best.setdefault(h["individual_id"], {})
                key = f"body:{e['model']}"
                per[key] = max(per.get(key, -1.0), round(float(h["sim"]), 4))
    ranked = sorted(best.items(), key=lambda kv: -float(np.mean(list(kv[1].values()))))[:k]
    names = {r["id"]: r for r in await pool.fetch("SELECT id, name, sightings FROM individuals WHERE id = ANY($1)",
                                                  [i for i, _ in ranked])}
    return [{"individual_id": i, "name": names[i]["name"], "sightings": names[i]["sightings"],
             "score": round(float(np.mean(list(parts.values()))), 4), "components": parts} for i, parts in ranked]


async def review_queue(pool: asyncpg.Pool, *, prop: str | None, order: str, flagged: bool, limit: int, offset: int,
                       candidates: int = 3, photos: int = 3) -> dict:
    """Detections waiting for a person, each with its best candidates, their scores and photos."""
    where = "(d.state = 'review'" + (" OR d.decided_by = 'fusion' AND d.result->'flags' ?| $2::text[])" if flagged
                                     else ")")
    where += " AND ($1::text IS NULL OR d.property = $1)"
    # "uncertain": the smallest margin between the two best candidates first
    margin = ("coalesce((d.result->'candidates'->0->>'score')::float8, 0) - "
              "coalesce((d.result->'candidates'->1->>'score')::float8, 0)")
    order_by = f"{margin}, d.created_at" if order == "uncertain" else "d.created_at, d.id"
    args = [prop] + ([list(QUEUE_FLAGS)] if flagged else [])
    total = await pool.fetchval(f"SELECT count(*) FROM detections d WHERE {where}", *args)
    rows = await pool.fetch(
        f"""SELECT d.id, d.captured_at, d.site, d.camera, d.cls, d.state, d.score, d.result, d.property,
                   d.individual_id, d.image_sha256, d.created_at
            FROM detections d WHERE {where} ORDER BY {order_by} LIMIT {int(limit)} OFFSET {int(offset)}""", *args)
    wanted = {c["individual_id"] for r in rows for c in (r["result"] or {}).get("candidates", [])[:candidates]}
    info = await _candidate_info(pool, sorted(wanted), photos)
    items = []
    for r in rows:
        result = r["result"] or {}
        cands = [{**c, **info.get(c["individual_id"], {"missing": True})}
                 for c in result.get("candidates", [])[:candidates]]
        items.append({"detection": str(r["id"]), "captured_at": _iso(r["captured_at"]), "site": r["site"],
                      "camera": r["camera"], "cls": r["cls"], "state": r["state"], "score": r["score"],
                      "individual_id": r["individual_id"], "image": r["image_sha256"],
                      "flags": result.get("flags", []), "thresholds": result.get("thresholds"),
                      "candidates": cands})
    return {"total": total, "order": order, "items": items}


async def _candidate_info(pool: asyncpg.Pool, individuals: list[int], photos: int) -> dict[int, dict]:
    """Name, sightings and best photos of each candidate (a merged one points at where it went)."""
    rows = await pool.fetch("SELECT id, name, sightings, merged_into, tags FROM individuals WHERE id = ANY($1)",
                            individuals)
    shots = await pool.fetch(
        """SELECT individual_id, id FROM (
               SELECT individual_id, id, row_number() OVER (PARTITION BY individual_id
                                                            ORDER BY score DESC NULLS LAST, captured_at DESC) AS n
               FROM detections WHERE individual_id = ANY($1) AND state IN ('assigned', 'new')) x
           WHERE n <= $2""", individuals, photos)
    out = {r["id"]: {"name": r["name"], "sightings": r["sightings"], "merged_into": r["merged_into"],
                     "tags": list(r["tags"]), "photos": []} for r in rows}
    for s in shots:
        out[s["individual_id"]]["photos"].append(str(s["id"]))
    return out


async def statistics(pool: asyncpg.Pool) -> dict:
    states = {r["state"]: r["n"] for r in await pool.fetch("SELECT state, count(*) AS n FROM detections GROUP BY 1")}
    decided = sum(states.get(s, 0) for s in ("assigned", "new", "review"))
    coverage_rows = await pool.fetch(
        """SELECT f.component, f.status, count(*) AS n FROM detection_features f
           JOIN detections d ON d.id = f.detection_id WHERE d.state IN ('assigned', 'new', 'review')
           GROUP BY 1, 2""")
    coverage: dict[str, dict] = {}
    for r in coverage_rows:
        c = coverage.setdefault(r["component"], {"ok": 0, "no-evidence": 0, "failed": 0})
        c[r["status"]] = r["n"]
    for c in coverage.values():
        c["with_evidence"] = round(c["ok"] / decided, 4) if decided else None
    stage_rows = await pool.fetch(
        """SELECT f.component || '/' || t.key AS stage, count(*) AS n,
                  percentile_cont(0.5) WITHIN GROUP (ORDER BY t.value::float8) AS p50,
                  percentile_cont(0.95) WITHIN GROUP (ORDER BY t.value::float8) AS p95
           FROM (SELECT component, features FROM detection_features ORDER BY arrived_at DESC LIMIT 20000) f,
                jsonb_each_text(coalesce(f.features->'timings_ms', '{}'::jsonb)) t
           GROUP BY 1 ORDER BY 1""")
    latency = await pool.fetchrow(
        """SELECT count(*) AS n,
                  percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM x.decided_at - d.created_at)) AS p50,
                  percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM x.decided_at - d.created_at)) AS p95
           FROM (SELECT detection_id, min(decided_at) AS decided_at FROM decisions WHERE decided_by = 'fusion'
                 GROUP BY 1 ORDER BY 2 DESC LIMIT 20000) x JOIN detections d ON d.id = x.detection_id""")
    humans = await pool.fetchrow(
        """SELECT count(*) FILTER (WHERE undone_by IS NULL AND action <> 'undo') AS changes,
                  count(*) FILTER (WHERE action = 'undo') AS undos FROM audit_log""")
    return {
        "detections": {s: states.get(s, 0) for s in STATES},
        "coverage": coverage,
        "timings_ms": {r["stage"]: {"n": r["n"], "p50": round(r["p50"], 1), "p95": round(r["p95"], 1)}
                       for r in stage_rows},
        "upload_to_decision_s": {"n": latency["n"], "p50": latency["p50"] and round(float(latency["p50"]), 2),
                                 "p95": latency["p95"] and round(float(latency["p95"]), 2)},
        "individuals": await pool.fetchval("SELECT count(*) FROM individuals WHERE merged_into IS NULL AND sightings > 0"),
        "human_changes": dict(humans),
    }


async def audit(pool: asyncpg.Pool, *, limit: int, offset: int, detection: UUID | None = None,
                individual: int | None = None) -> list[dict]:
    where, args = "TRUE", []
    if detection is not None:
        args.append(str(detection))
        where = "(before->'detections' ? $1 OR after->'detections' ? $1)"
    elif individual is not None:
        args += [str(individual), individual]
        where = ("(before->'individuals' ? $1 OR after->'individuals' ? $1 OR "
                 "EXISTS (SELECT 1 FROM jsonb_each(before->'detections') b WHERE (b.value->>'individual_id')::bigint = $2)"
                 " OR EXISTS (SELECT 1 FROM jsonb_each(after->'detections') a WHERE (a.value->>'individual_id')::bigint = $2)"
                 " OR (after->>'founded')::bigint = $2)")
    rows = await pool.fetch(f"SELECT * FROM audit_log WHERE {where} ORDER BY id DESC LIMIT {int(limit)} "
                            f"OFFSET {int(offset)}", *args)
    return [{**dict(r), "at": _iso(r["at"])} for r in rows]
