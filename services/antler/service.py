"""Antler service: consumes detections that expect antler features, publishes them keyed by property.

Only antlered classes expect antlers (`shared.pipeline`); anything else is acknowledged and skipped, and
a doe event that does ask for antlers (a hostile or stale event) is answered "no antler evidence".
Geometry runs on a thread per core; the fingerprints of a micro-batch run as one network batch.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Sequence

from services.antler.extractor import AntlerFeatures, fingerprint, measure
from services.antler.fingerprint import Fingerprinter
from services.antler.seasons import SeasonCalendar
from shared.broker import Handled, Output
from shared.config import Settings
from shared.models import load_configured
from shared.observability import STAGE_SECONDS
from shared.schemas import DetectionEvent, Features
from shared.service import CropExtractorHandler
from shared.topics import FEATURES_ANTLER


class AntlerHandler(CropExtractorHandler):
    name = "antler"

    def __init__(self, fingerprinter: Fingerprinter, calendar: SeasonCalendar, workers: int):
        super().__init__(workers)
        self.fingerprinter = fingerprinter
        self.calendar = calendar

    def health(self) -> dict:
        return {"fingerprint_version": self.fingerprinter.version}

    async def handle(self, events: Sequence[DetectionEvent]) -> list[Handled]:
        out = [Handled() for _ in events]
        todo = self.expecting(events)
        if not todo:
            return out
        started = time.perf_counter()
        found = await self.on_threads(measure, *((events[i].crop_jpeg, events[i].cls, events[i].box.y0,
                                                   events[i].captured_at, self.calendar) for i in todo))
        STAGE_SECONDS.labels(self.name, "geometry").observe(time.perf_counter() - started)
        started = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, fingerprint, found, self.fingerprinter)
        STAGE_SECONDS.labels(self.name, "fingerprint").observe(time.perf_counter() - started)
        for i, result in zip(todo, found):
            event = events[i]
            out[i] = Handled([Output(FEATURES_ANTLER, event.property.encode(),
                                     antler_features(event, result).to_bytes())])
        return out


def antler_features(event: DetectionEvent, result: AntlerFeatures) -> Features:
    return Features(
        component="antler", detection_id=event.detection_id, site=event.site, property=event.property,
        camera=event.camera, captured_at=event.captured_at, cls=event.cls, status=result.status,
        embeddings=result.embeddings, attributes=result.attributes, flags=result.flags,
        timings_ms={f"antler_{k}": v for k, v in result.timings_ms.items()}, attempt=event.attempt)


async def make_handler(settings: Settings) -> AntlerHandler:
    model = load_configured(settings.antler_model, settings)
    calendar = SeasonCalendar.parse(settings.antler_season_start, settings.antler_season_end,
                                    settings.antler_casting_months)
    return AntlerHandler(Fingerprinter(model), calendar, settings.antler_workers or len(os.sched_getaffinity(0)))
