"""Coat service: consumes detections that expect coat features, publishes them keyed by property.

Detections published without coat in their expected components (fast mode, coat switched off) are
acknowledged and skipped: the service costs nothing then. Crops are processed side by side on a
thread per core (OpenCV and ONNX Runtime release the GIL; each runs single-threaded per crop).
"""
from __future__ import annotations

import base64
import os
import time
from typing import Sequence

from services.coat.extractor import CoatExtractor, CoatFeatures
from shared.broker import Handled, Output
from shared.config import Settings
from shared.observability import STAGE_SECONDS
from shared.schemas import DetectionEvent, Features
from shared.service import CropExtractorHandler
from shared.topics import FEATURES_COAT


class CoatHandler(CropExtractorHandler):
    name = "coat"

    def __init__(self, extractor: CoatExtractor, workers: int):
        super().__init__(workers)
        self.extractor = extractor

    def health(self) -> dict:
        return {"pattern_versions": self.extractor.pattern_versions}

    async def handle(self, events: Sequence[DetectionEvent]) -> list[Handled]:
        out = [Handled() for _ in events]
        todo = self.expecting(events)
        if not todo:
            return out
        started = time.perf_counter()
        results = await self.on_threads(self.extractor.extract, *((events[i].crop_jpeg,) for i in todo))
        STAGE_SECONDS.labels(self.name, "extract").observe(time.perf_counter() - started)
        for i, result in zip(todo, results):
            event = events[i]
            out[i] = Handled([Output(FEATURES_COAT, event.property.encode(), coat_features(event, result).to_bytes())])
        return out


def coat_features(event: DetectionEvent, result: CoatFeatures) -> Features:
    attributes = dict(result.attributes, marks=result.marks)
    if result.patterns:
        attributes["patterns"] = {
            m: {"version": result.pattern_versions[m], "data": base64.b64encode(raw).decode("ascii")}
            for m, raw in result.patterns.items()}
    return Features(
        component="coat", detection_id=event.detection_id, site=event.site, property=event.property,
        camera=event.camera, captured_at=event.captured_at, cls=event.cls, status=result.status,
        embeddings=result.embeddings, attributes=attributes, flags=result.flags,
        timings_ms={f"coat_{k}": v for k, v in result.timings_ms.items()}, attempt=event.attempt)


async def make_handler(settings: Settings) -> CoatHandler:
    extractor = CoatExtractor.from_settings(settings)
    extractor.load()  # fail fast: the pinned XFeat weights are checked at start, not on the first event
    return CoatHandler(extractor, settings.coat_workers or len(os.sched_getaffinity(0)))
