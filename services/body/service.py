"""Body service: consumes detections, publishes body-appearance features keyed by site."""
from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from services.body.extractor import BodyExtractor
from shared.broker import Handled, Output
from shared.config import Settings
from shared.models import load_model
from shared.observability import STAGE_SECONDS
from shared.pipeline import body_models_for
from shared.schemas import DetectionEvent, Features, PipelineConfig

SWITCHES = set(PipelineConfig.model_fields) - {"mode"}
from shared.topics import DETECTIONS, FEATURES_BODY


class BodyHandler:
    name = "body"
    input_topics = (DETECTIONS,)
    input_schema = DetectionEvent

    def __init__(self, extractor: BodyExtractor, fast: list[str], enhanced: list[str]):
        self.extractor = extractor
        self.fast, self.ensemble = fast, enhanced
        # One inference thread, always the same: each thread that calls into torch gets its own
        # OpenMP team, and several teams spinning on two cores starve each other.
        self._infer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="body-infer")

    async def close(self) -> None:
        self._infer.shutdown(wait=True)

    def health(self) -> dict:
        return {"models": [m.version for m in self.extractor.models], "random_weights": self.extractor.random_weights,
                "precision": [m.precision for m in self.extractor.models]}

    async def handle(self, events: Sequence[DetectionEvent]) -> list[Handled]:
        out: list[Handled | None] = [None] * len(events)
        # Each event runs the models of the mode and switches it was published with.
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, e in enumerate(events):
            config = PipelineConfig(mode=e.mode, **{k: v for k, v in e.switches.items() if k in SWITCHES})
            groups.setdefault(tuple(body_models_for(config, self.fast, self.ensemble)), []).append(i)
        for names, index in groups.items():
            started = time.perf_counter()
            # Decoding and inference leave the event loop free (torch releases the GIL).
            embeddings = await asyncio.get_running_loop().run_in_executor(
                self._infer, self.extractor.embed, [events[i].crop_jpeg for i in index], list(names))
            elapsed = time.perf_counter() - started
            STAGE_SECONDS.labels(self.name, "embed").observe(elapsed)
            per_event_ms = round(1000 * elapsed / len(index), 3)
            for i, result in zip(index, embeddings):
                event = events[i]
                if isinstance(result, str):
                    out[i] = Handled(error=result)
                    continue
                features = Features(
                    component="body", detection_id=event.detection_id, site=event.site, property=event.property,
                    camera=event.camera, captured_at=event.captured_at, cls=event.cls, embeddings=result,
                    timings_ms={"body": per_event_ms}, attempt=event.attempt,
                )
                # keyed by property: one fusion worker sees a property's features in order
                out[i] = Handled([Output(FEATURES_BODY, event.property.encode(), features.to_bytes())])
        return out


async def make_handler(settings: Settings) -> BodyHandler:
    import torch

    torch.set_num_threads(settings.torch_threads or len(os.sched_getaffinity(0)))
    models = [load_model(name, settings.model_cache, allow_random=settings.allow_random_weights,
                         device=settings.device, precision=settings.precision, fetch=settings.fetch_weights)
              for name in settings.body_models]
    handler = BodyHandler(BodyExtractor(models, batch=settings.batch_max), [settings.body_model], settings.ensemble)
    # Set the thread count in the inference thread itself: OpenMP settings are per thread.
    await asyncio.get_running_loop().run_in_executor(handler._infer, torch.set_num_threads,
                                                     settings.torch_threads or len(os.sched_getaffinity(0)))
    return handler
