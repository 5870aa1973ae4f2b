"""Fusion service: joins every extractor's output by detection id, scores candidates, decides identity.

Per batch of events (features of any component, or join deadlines from the reconciler):
1. Join (one transaction): each feature is validated and recorded in `detection_features`; a
   detection is due when every component it expects has arrived (or failed), or when its join
   deadline has passed and the anchoring body features are in. Features arriving after the decision
   are stored and reopen nothing. A restart or a rebalance mid-join loses nothing: the join is rows.
2. Decide (one transaction per property): scoring (the gallery search) runs before the property
   lock; the lock then guards only the decision, after re-checking individuals founded meanwhile.

Idempotent: a detection already decided is not decided again; its stored result is re-published
(the first publication may have been lost in a crash between the commit and the produce).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Sequence

import asyncpg

from services.fusion import store
from services.fusion.store import expected_of
from services.fusion.calibration import CalibrationSource
from services.fusion.decision import Decision, Thresholds, decide
from services.fusion.scoring import Candidate, FusionModel, score_candidates
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
from services.fusion.search import GallerySearch, Scored, add_founded_meanwhile
from services.fusion.temporal import TemporalRules
from services.fusion.validation import Refused, validate
from shared.broker import Handled, Output
from shared.config import Settings
from shared.db import create_pool
from shared.observability import STAGE_SECONDS
from shared.pipeline import detection_event
from shared.schemas import (
    Features,
    FusionInput,
    JoinDeadline,
    PipelineConfig,
)
from shared.states import FAILED, is_terminal
from shared.topics import (
    FEATURES_ANTLER,
    FEATURES_BODY,
    FEATURES_COAT,
    FEATURES_POSE,
    JOIN_DEADLINES,
    POSE_REQUESTS,
)

log = logging.getLogger(__name__)


POSE_RESENDS = 1  # a pose request with no answer by its deadline is sent again this many times


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
        self.gallery = GallerySearch(settings, self.name)
        self._dims: dict[str, int] = {}

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
                        out[i], row = await self._join(conn, event)
                        if row is not None:
                            due[event.detection_id] = (i, row)
            if due:
                with STAGE_SECONDS.labels(self.name, "decide").time():
                    for det_id, outputs in (await self._decide(conn, [row for _, row in due.values()])).items():
                        out[due[det_id][0]].outputs.extend(outputs)
        return out

    # -- the join ---------------------------------------------------------------------------------

    async def _join(self, conn: asyncpg.Connection,
                    event: Features | JoinDeadline) -> tuple[Handled, asyncpg.Record | None]:
        """Record the event in the join; the detection's row when it is now due for a decision."""
        det = await store.lock_detection(conn, event.detection_id)
        if det is None:
            return Handled(error=f"unknown detection {event.detection_id}"), None
        if isinstance(event, JoinDeadline):
            if is_terminal(det["state"]):
                return Handled(), None
            arrived = await store.arrived(conn, det["id"])
            if arrived.get("body") != "ok":
                return Handled(), None
            if "pose" in expected_of(det) and "pose" not in arrived and det["requests_resent"] < POSE_RESENDS:
                # The pose request leaves after the transaction that expects it commits: a crash (or a failed
                # later property) between the two lost it. Sent again once, with a fresh deadline.
                await store.expect_again(conn, det["id"], self.settings.join_timeout_s)
                config = PipelineConfig(**(det["pipeline"] or {}))
                return Handled([pose_request(det, await store.crop_of(conn, det["id"]), config)]), None
            # Due with what arrived, as long as the anchoring body did (the shortlist comes from it).
            return Handled(), det
        dims = {e.version: await self._known_dim(conn, e.version) for e in event.embeddings}
        try:
            coat_patterns = validate(event, det, dims)
        except Refused as exc:
            if not is_terminal(det["state"]) and event.component in expected_of(det) \
                    and event.property == det["property"]:
                # The component failed on bad input: missing for the join, never a blocker.
                await store.add_feature(conn, det["id"], event.component, "failed", {"reason": str(exc)})
                if event.component == "body":
                    await store.fail(conn, det["id"], f"fusion: body features refused: {exc}")
                    return Handled(error=str(exc)), None
                return Handled(error=str(exc)), await self._complete(conn, det)
            return Handled(error=str(exc)), None
        if is_terminal(det["state"]):
            # Late or redelivered: stored, never reopens the decision; a body redelivery re-publishes the result.
            await store.add_feature(conn, det["id"], event.component, event.status, _stored(event), late=True)
            if event.component == "body" and det["state"] != FAILED and det["result"] is not None:
                return Handled([result_output(det["property"], det["result"])]), None
            return Handled(), None
        await store.add_feature(conn, det["id"], event.component, event.status, _stored(event))
        if coat_patterns:
            await store.store_coat_patterns(conn, det["id"], coat_patterns)
        if event.component == "antler" and event.attributes.get("present") is not None:
            fp = event.embeddings[0] if event.embeddings else None
            await store.store_antler(conn, det["id"], event.attributes, None if fp is None else fp.array(),
                                     None if fp is None else fp.version, det["captured_at"])
        if event.component == "body":
            await store.store_embeddings(conn, det["id"], det["site"], det["property"], event.embeddings)
            await store.start_fusing(conn, det["id"], self.settings.join_timeout_s)
        else:
            await store.start_fusing(conn, det["id"], None)
        return Handled(), await self._complete(conn, det)

    async def _known_dim(self, conn: asyncpg.Connection, version: str) -> int | None:
        """The dimension vectors of `version` have (a version's dimension never changes: cached)."""
        if version not in self._dims:
            dim = await store.known_dim(conn, version)
            if dim is None:
                return None
            self._dims[version] = dim
        return self._dims[version]

    @staticmethod
    async def _complete(conn: asyncpg.Connection, det: asyncpg.Record) -> asyncpg.Record | None:
        """The row when every expected component is in (body among them, as evidence), else None."""
        got = await store.arrived(conn, det["id"])
        return det if got.get("body") == "ok" and all(c in got for c in expected_of(det)) else None

    # -- the decision -----------------------------------------------------------------------------

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

    async def _decide_one(self, conn: asyncpg.Connection, s: Scored) -> list[Output]:
        det = await store.lock_detection(conn, s.detection["id"])
        if det is None or is_terminal(det["state"]):
            return [result_output(det["property"], det["result"])] if det is not None and det["result"] else []
        await add_founded_meanwhile(conn, det, s)
        versions = {model: version for model, version, _, _ in s.body_vectors}
        thresholds, model = self.calibration.for_versions(versions, det["property"])
        aggregation = model.aggregation if model else self.settings.identity_aggregation
        excluded = await store.cannot_link(conn, det["id"], det["image_sha256"])
        # an individual merged away since the search (by a person or the census) takes no detection
        excluded |= await store.merged_away(conn, sorted({ind for by_ind in s.exemplar_scores.values()
                                                          for ind in by_ind}))
        per_component = identity_scores(s.exemplar_scores, excluded, aggregation, model,
                                        (s.coat or {}).get("version"), (s.antler or {}).get("version"))
        candidates = score_candidates(per_component, model, self.spec_weights)
        if s.config.temporal and candidates:
            candidates = await temporal_priors(conn, det, candidates, self.rules)
        if s.antler is not None and candidates:
            candidates = self._antler_flags(s.antler, candidates, thresholds.new)
        linked = await sighting_link(conn, det, s.sex, excluded)
        pose_expected = "pose" in expected_of(det)
        body_only = None if pose_expected else body_only_score(per_component, model, self.spec_weights)
        ask, s.pose = pose_verdict(s.pose, pose_expected, body_only, s.config, linked is not None)
        if ask:
            await store.expect_more(conn, det["id"], "pose", self.settings.join_timeout_s)
            return [pose_request(det, await store.crop_of(conn, det["id"]), s.config)]
        if linked is not None:
            decision = sighting_decision(linked, candidates)
        else:
            decision = decide(candidates, thresholds, calibrated=model is not None)
        result = result_document(det, s, decision, thresholds, model, versions, excluded, aggregation)
        individual = await store.apply_decision(
            conn, detection=det, sex=s.sex, decision=decision, result=result,
            exemplars_per_individual=self.settings.exemplars_per_individual)
        await self._record_graph_edges(conn, det, s, decision, model)
        result["individual_id"] = individual
        return [result_output(det["property"], result)]

    @staticmethod
    async def _record_graph_edges(conn: asyncpg.Connection, det: asyncpg.Record, s: Scored, decision: Decision,
                                  model: FusionModel | None) -> None:
        photos = await store.exemplar_photos(conn, [ex for ind, ex in s.closest_exemplars.items()
                                                    if any(c.individual_id == ind for c in decision.candidates)])
        edges = graph_edges(det["id"], decision.candidates, s.closest_exemplars, photos, model)
        await store.add_edges(conn, det["property"], det["id"], edges)

    def _antler_flags(self, antler: dict, candidates: list[Candidate], new_threshold: float) -> list[Candidate]:
        return antler_flags(antler, candidates, new_threshold, self.settings.antler_conflict_below)


def _stored(event: Features) -> dict:
    """What the join keeps of a component's features (body vectors live in `embeddings`, coat patterns in
    `coat_patterns`, as bytes)."""
    stored = event.model_dump(mode="json", exclude={"embeddings"} if event.component == "body" else set())
    if event.component == "coat" and isinstance(stored.get("attributes"), dict):
        stored["attributes"].pop("patterns", None)
    return stored


def pose_request(det: asyncpg.Record, crop: bytes, config: PipelineConfig) -> Output:
    event = detection_event(det, config, list(dict.fromkeys(expected_of(det) + ["pose"])), crop)
    return Output(POSE_REQUESTS, str(det["id"]).encode(), event.to_bytes())


async def make_handler(settings: Settings) -> FusionHandler:
    return FusionHandler(await create_pool(settings.database_url), settings)
