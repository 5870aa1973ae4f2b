"""Body service: consumes detections, publishes body-appearance features keyed by property (one
property's features reach one fusion partition, in order)."""
from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from services.body.extractor import BodyExtractor
from shared.broker import Handled, Output
from shared.config import Settings
from shared.models import load_configured
from shared.observability import EVENTS, STAGE_SECONDS
from shared.pipeline import body_models_for
from shared.schemas import DetectionEvent, Embedding, Features, PipelineConfig

SWITCHES = set(PipelineConfig.model_fields) - {"mode"}
from shared.topics import DETECTIONS, FEATURES_BODY


class BodyHandler:
    name = "body"
    input_topics = (DETECTIONS,)
    input_schema = DetectionEvent

    def __init__(self, extractor: BodyExtractor, fast: list[str], enhanced: list[str], cache_entries: int = 8192):
        self.extractor = extractor
        self.fast, self.ensemble = fast, enhanced
        # A detection's crop never changes (its id is its image's checksum and ordinal), so an event seen
        # again (a re-publication of queued work, a redelivery) is answered from its recent embeddings
        # instead of running the models again. Bounded: ~5 KB an entry with one 1280-d model.
        self.recent: OrderedDict[tuple, list[Embedding]] = OrderedDict()
        self.cache_entries = cache_entries
        # One inference thread, always the same: each thread that calls into torch gets its own
        # OpenMP team, and several teams spinning on two cores starve each other.
        self._infer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="body-infer")

    async def close(self) -> None:
        self._infer.shutdown(wait=True)

    def health(self) -> dict:
        return {"models": [m.version for m in self.extractor.models], "random_weights": self.extractor.random_weights,
                "precision": [m.precision for m in self.extractor.models],
                "engine": [m.engine for m in self.extractor.models]}

    def _remember(self, key: tuple, embeddings: list[Embedding]) -> None:
        self.recent[key] = embeddings
        while len(self.recent) > self.cache_entries:
            self.recent.popitem(last=False)

    async def handle(self, events: Sequence[DetectionEvent]) -> list[Handled]:
        out: list[Handled | None] = [None] * len(events)
        # Each event runs the models of the mode and switches it was published with.
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, e in enumerate(events):
            config = PipelineConfig(mode=e.mode, **{k: v for k, v in e.switches.items() if k in SWITCHES})
            groups.setdefault(tuple(body_models_for(config, self.fast, self.ensemble)), []).append(i)
        for names, index in groups.items():
            fresh = [i for i in index if (events[i].detection_id, names) not in self.recent]
            results: dict[int, list[Embedding] | str] = {}
            if fresh:
                started = time.perf_counter()
                # Decoding and inference leave the event loop free (torch releases the GIL).
                embeddings = await asyncio.get_running_loop().run_in_executor(
                    self._infer, self.extractor.embed, [events[i].crop_jpeg for i in fresh], list(names))
                elapsed = time.perf_counter() - started
                STAGE_SECONDS.labels(self.name, "embed").observe(elapsed)
                EVENTS.labels(self.name, "embedded").inc(len(fresh))
                per_event_ms = round(1000 * elapsed / len(fresh), 3)
                results = dict(zip(fresh, embeddings))
            for i in index:
                event = events[i]
                key = (event.detection_id, names)
                if i in results:
                    result, timings = results[i], {"body": per_event_ms}
                    if not isinstance(result, str):
                        self._remember(key, result)
                else:
                    result, timings = self.recent[key], {"body_cached": 0.0}  # the stats count cache answers apart
                    self.recent.move_to_end(key)
                    EVENTS.labels(self.name, "cached").inc()
                if isinstance(result, str):
                    out[i] = Handled(error=result)
                    continue
                features = Features(
                    component="body", detection_id=event.detection_id, site=event.site, property=event.property,
                    camera=event.camera, captured_at=event.captured_at, cls=event.cls, embeddings=result,
                    timings_ms=timings, attempt=event.attempt,
                )
                # keyed by property: one fusion worker sees a property's features in order
                out[i] = Handled([Output(FEATURES_BODY, event.property.encode(), features.to_bytes())])
        return out


async def make_handler(settings: Settings) -> BodyHandler:
    import torch

    torch.set_num_threads(settings.torch_threads or len(os.sched_getaffinity(0)))
    models = [load_configured(name, settings) for name in settings.body_models]
    handler = BodyHandler(BodyExtractor(models, batch=settings.batch_max), [settings.body_model], settings.ensemble,
                          settings.body_cache_entries)
    # Set the thread count in the inference thread itself: OpenMP settings are per thread.
    await asyncio.get_running_loop().run_in_executor(handler._infer, torch.set_num_threads,
                                                     settings.torch_threads or len(os.sched_getaffinity(0)))
    return handler
