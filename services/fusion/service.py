"""Fusion service: joins a detection's features, finds candidates, decides its identity.

Idempotent: a detection already in a terminal state is not decided again; its
stored result is re-published instead (the first publication may have been lost
in a crash between the database commit and the produce).
"""
from __future__ import annotations

from typing import Sequence

import asyncpg

from services.fusion import store
from services.fusion.calibration import CalibrationSource, p_same
from services.fusion.decision import Thresholds, best_per_individual, combine, decide
from shared.broker import Handled, Output
from shared.config import Settings
from shared.db import create_pool
from shared.schemas import BodyFeatures, DetectionResult, sex_of
from shared.states import FAILED, is_terminal
from shared.topics import FEATURES_BODY, RESULTS


class FusionHandler:
    name = "fusion"
    input_topics = (FEATURES_BODY,)
    input_schema = BodyFeatures

    def __init__(self, pool: asyncpg.Pool, settings: Settings):
        self.pool = pool
        self.settings = settings
        self.calibration = CalibrationSource(
            settings.calibration_path, Thresholds(match=settings.match_threshold, new=settings.new_threshold))
        self.weights = settings.weights()

    async def close(self) -> None:
        await self.pool.close()

    async def handle(self, events: Sequence[BodyFeatures]) -> list[Handled]:
        """One transaction per batch: one commit instead of one per detection.

        A failing event rolls the batch back; the runner then retries the events one by
        one, so only the bad one is dead-lettered.
        """
        self.calibration.refresh()
        async with self.pool.acquire() as conn, conn.transaction():
            for site in sorted({e.site for e in events}):  # sorted: two workers never wait on each other in a cycle
                await store.lock_site(conn, site)
            await store.prepare_search(conn)
            return [await self._fuse(conn, event) for event in events]

    async def _fuse(self, conn: asyncpg.Connection, event: BodyFeatures) -> Handled:
        sex = sex_of(event.cls)
        row = await store.lock_detection(conn, event.detection_id)
        if row is None:
            return Handled(error=f"unknown detection {event.detection_id}")
        if is_terminal(row["state"]):
            if row["state"] == FAILED or row["result"] is None:
                return Handled()
            return Handled([self._output(event.site, row["result"])])
        await store.store_embeddings(conn, event.detection_id, event.site, event.embeddings)
        per_model = {
            emb.model: best_per_individual(
                await store.nearest_exemplars(conn, emb, event.site, sex, self.settings.candidates_k))
            for emb in event.embeddings
        }
        versions = {e.model: e.version for e in event.embeddings}
        thresholds, artifact = self.calibration.for_versions(versions)
        decision = decide(combine(per_model, self.weights), thresholds)
        random_weights = any(e.random_weights for e in event.embeddings)
        flags = list(decision.flags) + (["random-weights"] if random_weights else [])
        result = {
            "detection_id": str(event.detection_id),
            "site": event.site,
            "state": decision.state,
            "score": decision.score,
            "flags": flags,
            "mode": "fast" if len(event.embeddings) == 1 else "enhanced",
            "weights": {m: self.weights.get(m, 1.0) for m in per_model},
            "candidates": [{"individual_id": c.individual_id, "score": round(c.score, 5),
                            "components": {k: round(v, 5) for k, v in c.components.items()}}
                           for c in decision.candidates],
            "components": dict(decision.candidates[0].components) if decision.candidates else {},
            "versions": versions,
            "random_weights": random_weights,
            "thresholds": {"match": thresholds.match, "new": thresholds.new,
                           "source": "calibrated" if artifact else "default"},
            "p_same": round(p_same(artifact, decision.score), 4)
            if artifact and decision.score is not None else None,
            "timings_ms": event.timings_ms,
        }
        individual = await store.apply_decision(
            conn, detection_id=event.detection_id, site=event.site, sex=sex, captured_at=event.captured_at,
            decision=decision, result=result, exemplars_per_individual=self.settings.exemplars_per_individual)
        result["individual_id"] = individual
        return Handled([self._output(event.site, result)])

    @staticmethod
    def _output(site: str, result: dict) -> Output:
        message = DetectionResult(
            detection_id=result["detection_id"], site=site, state=result["state"],
            individual_id=result.get("individual_id"), score=result.get("score"), flags=result.get("flags", []),
            components=result.get("components", {}), versions=result.get("versions", {}),
        )
        return Output(RESULTS, site.encode(), message.to_bytes())


async def make_handler(settings: Settings) -> FusionHandler:
    return FusionHandler(await create_pool(settings.database_url), settings)
