"""What a decision records: the result document (stored with the detection; the API shows it), its message
on the results topic, and the identity graph's machine edges. Pure: the service reads and writes them."""
from __future__ import annotations

from typing import Sequence
from uuid import UUID

import asyncpg

from services.fusion.decision import Decision, Thresholds
from services.fusion.scoring import Candidate, FusionModel
from services.fusion.search import Scored
from services.fusion.store import expected_of
from shared.broker import Output
from shared.schemas import DetectionResult
from shared.topics import RESULTS


def result_document(det: asyncpg.Record, scored: Scored, decision: Decision, thresholds: Thresholds,
                    model: FusionModel | None, versions: dict, excluded: set[int], aggregation: str) -> dict:
    """The decision with its evidence: every candidate's components, what each extractor did, the calibration
    and thresholds it was made with, and its flags."""
    random_weights = any(random for *_, random in scored.body_vectors)
    flags = list(decision.flags)
    if scored.missing:
        flags.append("degraded")
    if random_weights:
        flags.append("random-weights")
    flags += [f"coat:{f}" for f in (scored.coat or {}).get("flags", [])]
    flags += [f for f in (scored.pose or {}).get("flags", []) if f == "pose-fallback"]
    if scored.antler is not None:
        flags += [f"antler:{f}" for f in scored.antler["flags"]]
        flags += [f for f in scored.antler.get("best_flags", []) if f not in flags]
    return {
        "detection_id": str(det["id"]), "site": det["site"], "property": det["property"],
        "state": decision.state, "score": decision.score, "flags": flags,
        "mode": scored.config.mode, "switches": scored.config.switches(),
        "expected": expected_of(det), "arrived": scored.arrived, "missing": scored.missing,
        "candidates": [c.as_dict() for c in decision.candidates],
        "components": dict(decision.candidates[0].components) if decision.candidates else {},
        "versions": versions, "random_weights": random_weights,
        "fusion": {"source": "fitted" if model else "spec-weighted-mean",
                   "calibration_id": int(model.version) if model else None,
                   "aggregation": aggregation},
        "thresholds": {"match": thresholds.match, "new": thresholds.new,
                       "source": "calibrated" if model else "default"},
        "cannot_link": sorted(excluded),
        "sighting": str(det["sighting"]) if det["sighting"] else None,
        "sighting_vectors_in_query": len(scored.sighting_vectors),  # other frames' embeddings the query used
        "coat": scored.coat,
        "antler": antler_summary(scored.antler),
        "pose": scored.pose,
    }


def antler_summary(antler: dict | None) -> dict | None:
    """What the result shows of the antler search: the query's season, the extractor's flags, how many
    shortlisted candidates had a sighting of that season to compare."""
    if antler is None:
        return None
    q = antler["query"]
    return {"season": q.season, "casting_window": q.casting_window, "present": q.present, "version": q.version,
            "geometry": antler["geometry"], "flags": antler["flags"],
            "candidates_compared": sum(1 for v in antler["scores"].values() if v)}


def result_output(prop: str, result: dict) -> Output:
    """The result document's message on the results topic, keyed by property."""
    message = DetectionResult(
        detection_id=result["detection_id"], site=result["site"], state=result["state"],
        individual_id=result.get("individual_id"), score=result.get("score"), flags=result.get("flags", []),
        components={k: v for k, v in (result.get("components") or {}).items() if isinstance(v, (int, float))},
        versions=result.get("versions", {}),
    )
    return Output(RESULTS, prop.encode(), message.to_bytes())


def graph_edges(detection_id: UUID, candidates: Sequence[Candidate], closest_exemplars: dict[int, int],
                photo_of: dict[int, UUID], model: FusionModel | None) -> list[tuple[UUID, dict, float | None]]:
    """The identity graph's machine edges of a decision: the detection and each top candidate's closest photo
    (`photo_of` its exemplar), with every component's raw score (the census job re-weighs them as calibrations
    change) and the fused calibrated probability without the temporal boost (None without a fitted model)."""
    edges = []
    for c in candidates:
        photo = photo_of.get(closest_exemplars.get(c.individual_id))
        if photo is not None and photo != detection_id:
            edges.append((photo, {k: v for k, v in c.components.items() if v is not None},
                          None if model is None else min(1.0, max(0.0, c.score - c.temporal_boost))))
    return edges
