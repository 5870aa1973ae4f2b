"""The gallery search of a due detection: every component's scores of its candidates, gathered before the
property lock from the database (pgvector's nearest exemplars, the joined pose, coat and antler features, the
shortlisted candidates' stored ones) and the pure components of `shared.components`.

The sighting is the query: each exemplar scores its best similarity to any frame of the detection's sighting.
The first body model is the fast one: its nearest exemplars are the shortlist that pose and coat compare.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass

import asyncpg
import numpy as np

from services.fusion import store
from services.fusion.scoring import shortlist_scores
from services.fusion.store import expected_of
from shared.components import best_over_queries, body_component, component, component_of, reading
from shared.components import antler as antler_rules
from shared.components.coat import COAT, coat_view
from shared.components.pose import POSE, Seen
from shared.coat import PatternCache
from shared.config import Settings
from shared.observability import STAGE_SECONDS
from shared.schemas import Embedding, PipelineConfig, sex_of
from shared.viewpoints import known

ANSWERED = ("ok", "no-evidence")  # a component that ran, with evidence or without


@dataclass
class Scored:
    """A due detection, scored before the property lock."""

    detection: asyncpg.Record
    sex: str
    config: PipelineConfig
    body_vectors: list[tuple]  # (model, version, vector, random_weights) of its body embeddings
    sighting_vectors: list[tuple]  # (model, version, vector) of the other frames of its sighting
    exemplar_scores: dict[str, dict[int, list[float]]]  # component -> individual -> its exemplars' scores
    searched_up_to: int  # the largest individual id the search could have seen
    missing: list[str]
    arrived: dict[str, str]
    coat: dict | None  # what coat matching did: shortlist, exemplars matched, milliseconds, flags
    antler: dict | None  # the antler query, the shortlisted candidates' season archives, its flags
    pose: dict | None  # what pose said (viewpoint, flags) and how many exemplars shared its viewpoint
    closest_exemplars: dict[int, int]  # individual -> its exemplar closest by the fast model (the graph's edge)


class GallerySearch:
    """Scores a due detection against its property's gallery, within the shortlists `settings` size."""

    def __init__(self, settings: Settings, service: str):
        self.settings = settings
        self.service = service  # the stage timings' label
        self.patterns = PatternCache(settings.fusion_pattern_cache_mb << 20)  # the gallery's, between detections

    async def search(self, conn: asyncpg.Connection, det: asyncpg.Record) -> Scored:
        """The gallery search for a due detection (its row as the join locked it), before the property lock.
        Whether it is still undecided is checked again under the lock."""
        det_id = det["id"]
        sex = sex_of(det["cls"])
        config = PipelineConfig(**(det["pipeline"] or {}))
        arrived = await store.arrived(conn, det_id)
        missing = [c for c in expected_of(det) if arrived.get(c) not in ANSWERED]
        searched_up_to = await store.max_individual(conn, det["property"])
        body_vectors = await store.body_embeddings(conn, det_id)
        frames = await store.sighting_vectors(conn, det_id, det["sighting"])
        exemplar_scores: dict[str, dict[int, list[float]]] = {}
        # (individual, exemplar) -> similarity by the fast model: the first, or the first after it that found any
        fast_best: dict[tuple[int, int], float] = {}
        for model, version, vec, _ in body_vectors:
            best: dict[tuple[int, int], float] = {}  # (individual, exemplar) -> best similarity to a frame
            for q in sighting_queries(vec, version, frames):
                for ind, sim, exemplar in await store.nearest_exemplars(
                        conn, q, version, det["property"], sex, self.settings.candidates_k):
                    best[(ind, exemplar)] = max(best.get((ind, exemplar), -1.0), sim)
            sims: dict[int, list[float]] = defaultdict(list)
            for (ind, _), sim in best.items():
                sims[ind].append(sim)
            exemplar_scores[body_component(model)] = dict(sims)
            if not fast_best:
                fast_best = best
        fast_queries = sighting_queries(body_vectors[0][2], body_vectors[0][1], frames) if body_vectors else []
        pose = await self._pose(conn, det, fast_best, fast_queries, exemplar_scores) \
            if arrived.get("pose") in ANSWERED else None
        coat = await self._coat(conn, det, sex, body_vectors, exemplar_scores) if arrived.get("coat") in ANSWERED \
            else None
        antler = await self._antler(conn, det, exemplar_scores) if arrived.get("antler") in ANSWERED else None
        return Scored(det, sex, config, body_vectors, frames, exemplar_scores, searched_up_to, missing, arrived, coat,
                      antler, pose, closest_exemplars(fast_best))

    async def _pose(self, conn: asyncpg.Connection, det: asyncpg.Record, fast_best: dict[tuple[int, int], float],
                    query_vectors: list[np.ndarray], exemplar_scores: dict) -> dict:
        """Pose's answer, and the pose-aware component (added to `exemplar_scores`): each candidate of the fast
        model's search (`fast_best`) scored by its best body similarity among its exemplars seen from the
        detection's viewpoint."""
        features = await store.joined_features(conn, det["id"], "pose")
        a = features.get("attributes", {})
        view = a.get("viewpoint")
        out = {"ran": True, "viewpoint": view, "angle": a.get("angle"), "confidence": a.get("confidence"),
               "source": a.get("source"), "why_unknown": a.get("why"), "flags": features.get("flags", []),
               "keypoint_confidence": a.get("keypoint_confidence"), "versions": a.get("versions"),
               "same_viewpoint_exemplars": 0}
        if not known(view):
            return out
        seen = await store.exemplars_seen(conn, sorted({ex for _, ex in fast_best}))
        exemplars = [(ind, ex) for ind, ex in fast_best if ex in seen]
        queries = [Seen(view, vec) for vec in query_vectors]
        best = best_over_queries(component(POSE).similarity(queries, [seen[ex] for _, ex in exemplars]))
        sims: dict[int, list[float]] = {ind: [] for ind, _ in fast_best}  # none from its viewpoint: no evidence
        for (ind, _), sim in zip(exemplars, best):
            if not np.isnan(sim):
                sims[ind].append(float(sim))
        exemplar_scores[POSE] = sims
        out["same_viewpoint_exemplars"] = sum(len(v) for v in sims.values())
        return out

    async def _antler(self, conn: asyncpg.Connection, det: asyncpg.Record, exemplar_scores: dict) -> dict:
        """Antler scores of the best candidates by body, within the query's season (added to
        `exemplar_scores`)."""
        features = await store.joined_features(conn, det["id"], "antler")
        a = features.get("attributes", {})
        emb = (features.get("embeddings") or [None])[0]
        fp = None
        if emb is not None:
            fp = Embedding.model_validate(emb).array()
        query = antler_rules.AntlerQuery(a["season"], a.get("casting_window"), a.get("present"),
                                         a.get("fingerprint_version"), fp, det["captured_at"])
        shortlist = best_by_body(exemplar_scores, self.settings.antler_shortlist)
        stored = await store.antler_archive(conn, shortlist, query.season, query.casting_window)
        archives = {ind: [antler_rules.Archived(*r) for r in rows] for ind, rows in stored.items()}
        scores = {ind: antler_rules.candidate_scores(query, archives.get(ind, [])) for ind in shortlist}
        exemplar_scores[antler_rules.ANTLER] = {ind: sims for ind, sims in scores.items() if sims}
        return {"query": query, "archives": archives, "scores": scores, "flags": features.get("flags", []),
                "geometry": a.get("geometry"), "version": query.version}

    async def _coat(self, conn: asyncpg.Connection, det: asyncpg.Record, sex: str, body_vectors: list,
                    exemplar_scores: dict) -> dict:
        """Coat scores against the `coat_shortlist` gallery photos closest to the detection by the fast body
        model (its nearest exemplars; the keypoint matchers against the first `coat_pattern_shortlist`, the
        costlier against `coat_cascade_shortlist` of them by the cheaper one's matches), each
        individual scored by its photos on that shortlist (added to `exemplar_scores`). The closest photos,
        not an individual's newest: the photo that ranks an animal first by body is the one whose coat must
        confirm it (`eval --coat` measures the shortlist's size)."""
        started = time.perf_counter()
        nearest = []
        if body_vectors:
            _, body_version, vec, _ = body_vectors[0]  # the fast model's, as for pose
            nearest = await store.nearest_exemplars(conn, vec, body_version, det["property"], sex,
                                                    self.settings.coat_shortlist)
        photos = await store.exemplar_photos(conn, [exemplar for _, _, exemplar in nearest])
        shortlist = [(ind, photos[exemplar]) for ind, _, exemplar in nearest if exemplar in photos]
        stored = await store.coat_of(conn, [det["id"], *(d for _, d in shortlist)], self.patterns)
        query = stored[det["id"]]
        flags = query["features"].get("flags", [])
        version = query["features"].get("attributes", {}).get("version")
        facing = query["features"].get("attributes", {}).get("facing")  # the profile's viewpoint without pose
        if query["status"] != "ok":  # no coat evidence: nothing to compare, the reason is flagged
            return {"shortlist": 0, "exemplars_matched": 0, "matching_ms": 0.0, "flags": flags, "version": version,
                    "facing": facing}
        views = {d: coat_view(v) for d, v in stored.items() if v["status"] == "ok"}
        gallery = [(ind, views[d]) for ind, d in shortlist if d in views and d != det["id"]]
        # every registered component of the coat's features; CPU work (OpenCV releases the GIL): off the loop
        matched = await asyncio.get_running_loop().run_in_executor(
            None, shortlist_scores, reading(COAT), views[det["id"]], gallery, self.settings.coat_pattern_shortlist,
            self.settings.coat_cascade_shortlist)
        exemplar_scores.update(matched)
        STAGE_SECONDS.labels(self.service, "coat-match").observe(time.perf_counter() - started)
        return {"version": version, "shortlist": len({ind for ind, _ in shortlist}),
                "exemplars_matched": len(shortlist),
                "matching_ms": round(1000 * (time.perf_counter() - started), 2),
                "flags": flags, "facing": facing,
                "marks": query["features"].get("attributes", {}).get("marks", [])[:16]}


async def add_founded_meanwhile(conn: asyncpg.Connection, det: asyncpg.Record, scored: Scored) -> None:
    """Individuals founded since the search (read under the property lock) become candidates too: each body
    model's scores of their exemplars, and the fast model's closest exemplar of each, join `scored`."""
    for n, (model, version, vec, _) in enumerate(scored.body_vectors):
        scores = scored.exemplar_scores.setdefault(body_component(model), {})
        founded_best: dict[tuple[int, int], float] = {}  # (individual, exemplar) -> best similarity to a frame
        founded = await store.exemplars_founded_after(conn, version, det["property"], scored.sex,
                                                      scored.searched_up_to)
        if founded:
            queries = sighting_queries(vec, version, scored.sighting_vectors)
            sims = component(body_component(model)).similarity(queries, [ex for _, ex, _ in founded])
            for (ind, _, exemplar), best in zip(founded, best_over_queries(sims)):
                if not np.isnan(best):
                    scores.setdefault(ind, []).append(float(best))
                    founded_best[(ind, exemplar)] = float(best)
        if n == 0:  # the fast model's closest exemplars of the newly founded ones, for the graph's edges
            scored.closest_exemplars.update(closest_exemplars(founded_best))


def sighting_queries(vector: np.ndarray, version: str, frames: list[tuple]) -> list[np.ndarray]:
    """The query of a body model: the detection's vector and those of the other frames of its sighting that
    the same model version embedded."""
    return [vector] + [v for _, frame_version, v in frames if frame_version == version]


def closest_exemplars(best: dict[tuple[int, int], float]) -> dict[int, int]:
    """{individual: its exemplar (embedding id) most similar to the query} of a search's (individual, exemplar)
    similarities."""
    out: dict[int, tuple[float, int]] = {}
    for (ind, exemplar), sim in best.items():
        if ind not in out or sim > out[ind][0]:
            out[ind] = (sim, exemplar)
    return {ind: exemplar for ind, (_, exemplar) in out.items()}


def best_by_body(exemplar_scores: dict, k: int) -> list[int]:
    """The k candidates with the best body similarity (the shortlist the costlier components compare)."""
    best: dict[int, float] = {}
    for name, by_ind in exemplar_scores.items():
        if component_of(name) != "body":
            continue  # coat and antler scores are added for the shortlist itself
        for ind, sims in by_ind.items():
            if sims:
                best[ind] = max(best.get(ind, -1.0), max(sims))
    return sorted(best, key=lambda i: (-best[i], i))[:k]
