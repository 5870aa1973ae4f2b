"""Fusion service: joins every extractor's output by detection id, scores candidates, decides identity.

Per batch of events (features of any component, or join deadlines from the reconciler):
1. Join (one transaction, `join.py`): each feature is validated (`validation.py`) and recorded; a detection
   whose components are in, or whose deadline has passed, is due.
2. Decide (one transaction per property): the gallery search (`search.py`) runs before the property lock;
   the lock then guards only the decision, after re-checking individuals founded meanwhile: the rules
   (`policy.py`), the decision (`decision.py`), and what it records (`result.py`, `store.py`).

Idempotent: a detection already decided is not decided again; its stored result is re-published
(the first publication may have been lost in a crash between the commit and the produce).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import asyncpg

from services.fusion import store
from services.fusion.calibration import CalibrationSource
from services.fusion.decision import Decision, Thresholds, decide
from services.fusion.join import Join
from services.fusion.policy import (
    antler_flags,
    body_only_score,
    identity_scores,
    pose_verdict,
    sighting_decision,
    sighting_link,
    temporal_priors,
)
from services.fusion.result import graph_edges, result_document, result_output
from services.fusion.scoring import Candidate, FusionModel, score_candidates
from services.fusion.search import GallerySearch, Scored, add_founded_meanwhile
from services.fusion.store import expected_of
from services.fusion.temporal import TemporalRules
from shared.broker import Handled, Output
from shared.config import Settings
from shared.db import create_pool
from shared.service import one_blas_thread
from shared.observability import STAGE_SECONDS
from shared.schemas import Features, FusionInput, JoinDeadline
from shared.states import is_terminal
from shared.topics import FEATURES_ANTLER, FEATURES_BODY, FEATURES_COAT, FEATURES_POSE, JOIN_DEADLINES


class FusionHandler:
    name = "fusion"
    input_topics = (FEATURES_BODY, FEATURES_COAT, FEATURES_POSE, FEATURES_ANTLER, JOIN_DEADLINES)
    input_schema = FusionInput
    dead_letter_fails_detection = False  # a refused feature is a missing component, not a failed detection

    def __init__(self, pool: asyncpg.Pool, settings: Settings):
        self.pool = pool
        self.settings = settings
        self.calibration = CalibrationSource(Thresholds(match=settings.match_threshold, new=settings.new_threshold))
        self.spec_weights = settings.weights()
        self.rules = TemporalRules(rut_months=tuple(settings.rut_months))
        self.join = Join(settings.join_timeout_s)
        self.gallery = GallerySearch(settings, self.name)

    async def close(self) -> None:
        await self.pool.close()

    def health(self) -> dict:
        return {"calibration": self.calibration.id, "join_timeout_s": self.settings.join_timeout_s}

    async def handle(self, events: Sequence[Features | JoinDeadline]) -> list[Handled]:
        """A failing event rolls its transaction back; the runner then retries the events one by one,
        so only the bad one is dead-lettered."""
        out = [Handled() for _ in events]
        due: dict = {}  # detection id -> (index of the event that made it due: its outputs go there, its row)
        async with self.pool.acquire() as conn:
            await self.calibration.refresh(conn)
            with STAGE_SECONDS.labels(self.name, "join").time():
                async with conn.transaction():
                    for i, event in enumerate(events):
                        out[i], row = await self.join.record(conn, event)
                        if row is not None:
                            due[event.detection_id] = (i, row)
            if due:
                with STAGE_SECONDS.labels(self.name, "decide").time():
                    for det_id, outputs in (await self._decide(conn, [row for _, row in due.values()])).items():
                        out[due[det_id][0]].outputs.extend(outputs)
        return out

    async def _decide(self, conn: asyncpg.Connection, detections: list[asyncpg.Record]) -> dict:
        """Score the due detections, then decide each property's under its lock. {detection id: outputs}."""
        outputs: dict = {}
        by_property: dict[str, list[Scored]] = defaultdict(list)
        async with conn.transaction():
            await store.prepare_search(conn, self.settings.candidates_k)
            for det in detections:
                scored = await self.gallery.search(conn, det)
                by_property[scored.detection["property"]].append(scored)
        for prop in sorted(by_property):  # sorted: two workers never wait on each other in a cycle
            async with conn.transaction():
                await store.lock_property(conn, prop)
                for scored in by_property[prop]:
                    outputs[scored.detection["id"]] = await self._decide_one(conn, scored)
        return outputs

    async def _decide_one(self, conn: asyncpg.Connection, scored: Scored) -> list[Output]:
        """Decide one scored detection under its property's lock: its result, or a pose request first."""
        det = await store.lock_detection(conn, scored.detection["id"])
        if det is None or is_terminal(det["state"]):
            return [result_output(det["property"], det["result"])] if det is not None and det["result"] else []
        await add_founded_meanwhile(conn, det, scored)
        versions = {model: version for model, version, _, _ in scored.body_vectors}
        thresholds, model = self.calibration.for_versions(versions, det["property"])
        aggregation = model.aggregation if model else self.settings.identity_aggregation
        excluded = await store.cannot_link(conn, det["id"], det["image_sha256"])
        # an individual merged away since the search (by a person or the census) takes no detection
        excluded |= await store.merged_away(conn, sorted({ind for by_ind in scored.exemplar_scores.values()
                                                          for ind in by_ind}))
        per_component = identity_scores(scored.exemplar_scores, excluded, aggregation, model,
                                        (scored.coat or {}).get("version"), (scored.antler or {}).get("version"))
        candidates = score_candidates(per_component, model, self.spec_weights)
        if scored.config.temporal and candidates:
            candidates = await temporal_priors(conn, det, candidates, self.rules)
        if scored.antler is not None and candidates:
            candidates = self._antler_flags(scored.antler, candidates, thresholds.new)
        linked = await sighting_link(conn, det, scored.sex, excluded)
        pose_expected = "pose" in expected_of(det)
        body_only = None if pose_expected else body_only_score(per_component, model, self.spec_weights)
        ask, scored.pose = pose_verdict(scored.pose, pose_expected, body_only, scored.config, linked is not None)
        if ask:
            return [await self.join.ask_for_pose(conn, det, scored.config)]
        if linked is not None:
            decision = sighting_decision(linked, candidates)
        else:
            decision = decide(candidates, thresholds, calibrated=model is not None)
        result = result_document(det, scored, decision, thresholds, model, versions, excluded, aggregation)
        individual = await store.apply_decision(
            conn, detection=det, sex=scored.sex, decision=decision, result=result,
            exemplars_per_individual=self.settings.exemplars_per_individual)
        await self._record_graph_edges(conn, det, scored, decision, model)
        result["individual_id"] = individual
        return [result_output(det["property"], result)]

    def _antler_flags(self, antler: dict, candidates: list[Candidate], new_threshold: float) -> list[Candidate]:
        """The antler season rules (`policy.antler_flags`) with this service's conflict threshold."""
        return antler_flags(antler, candidates, new_threshold, self.settings.antler_conflict_below)

    @staticmethod
    async def _record_graph_edges(conn: asyncpg.Connection, det: asyncpg.Record, scored: Scored,
                                  decision: Decision, model: FusionModel | None) -> None:
        """The identity graph's edges of the decision (`result.graph_edges`), from its top candidates' photos."""
        photos = await store.exemplar_photos(conn, [ex for ind, ex in scored.closest_exemplars.items()
                                                    if any(c.individual_id == ind for c in decision.candidates)])
        edges = graph_edges(det["id"], decision.candidates, scored.closest_exemplars, photos, model)
        await store.add_edges(conn, det["property"], det["id"], edges)


async def make_handler(settings: Settings) -> FusionHandler:
    one_blas_thread()  # numpy's products (colour, markings, scores) too; keypoint matching is one ORT thread
    return FusionHandler(await create_pool(settings.database_url), settings)
