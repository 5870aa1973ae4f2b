"""Body service: consumes detections, publishes body-appearance features keyed by site."""
from __future__ import annotations

import asyncio
import os
import time
from typing import Sequence

from services.body.extractor import BodyExtractor
from shared.broker import Handled, Output
from shared.config import Settings
from shared.models import load_model
from shared.observability import STAGE_SECONDS
from shared.schemas import BodyFeatures, DetectionEvent
from shared.topics import DETECTIONS, FEATURES_BODY


def body_model_names(settings: Settings) -> list[str]:
    """The configured body models: one name for fast mode, a comma-separated ensemble otherwise."""
    return [n.strip() for n in settings.body_model.split(",") if n.strip()]


class BodyHandler:
    name = "body"
    input_topics = (DETECTIONS,)
    input_schema = DetectionEvent

    def __init__(self, extractor: BodyExtractor):
        self.extractor = extractor

    def health(self) -> dict:
        return {"models": [m.version for m in self.extractor.models], "random_weights": self.extractor.random_weights,
                "precision": [m.precision for m in self.extractor.models]}

    async def handle(self, events: Sequence[DetectionEvent]) -> list[Handled]:
        started = time.perf_counter()
        # Decoding and inference leave the event loop free (torch releases the GIL).
        embeddings = await asyncio.to_thread(self.extractor.embed, [e.crop_jpeg for e in events])
        elapsed = time.perf_counter() - started
        STAGE_SECONDS.labels(self.name, "embed").observe(elapsed)
        per_event_ms = 1000 * elapsed / len(events)
        out = []
        for event, result in zip(events, embeddings):
            if isinstance(result, str):
                out.append(Handled(error=result))
                continue
            features = BodyFeatures(
                detection_id=event.detection_id, site=event.site, camera=event.camera,
                captured_at=event.captured_at, cls=event.cls, embeddings=result,
                timings_ms={"body": round(per_event_ms, 3)}, attempt=event.attempt,
            )
            out.append(Handled([Output(FEATURES_BODY, event.site.encode(), features.to_bytes())]))
        return out


async def make_handler(settings: Settings) -> BodyHandler:
    import torch

    torch.set_num_threads(settings.torch_threads or len(os.sched_getaffinity(0)))
    models = [
        await asyncio.to_thread(load_model, name, settings.model_cache, allow_random=settings.allow_random_weights,
                                device=settings.device, precision=settings.precision)
        for name in body_model_names(settings)
    ]
    return BodyHandler(BodyExtractor(models, batch=settings.batch_max))
