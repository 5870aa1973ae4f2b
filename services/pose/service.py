"""Pose service: consumes fusion's pose requests (the selective rule lives in fusion), publishes pose
features keyed by property: AP-10K keypoints where a keypoint model runs, and the viewpoint.

The viewpoint comes from the keypoints where they are confident (>= 0.6), else from the trained viewpoint
classifier, else it is `unknown`. Whenever the keypoints cannot place the coat and antler regions (no
keypoint model, random weights, low confidence, a crop that cannot be read), the result is flagged
`pose-fallback`: the box fractions stand. Nothing here ever blocks a detection: an unreadable, tiny or
black crop is answered "no evidence" with the reason.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from services.pose.classifier import ViewpointClassifier
from services.pose.keypoints import KeypointModel
from services.pose.viewpoint import KEYPOINT_MIN_SCORE, Viewpoint, combine, from_keypoints, keypoint_confidence, \
    unknown
from shared.broker import Handled, Output
from shared.config import Settings
from shared.images import decode_crop
from shared.models import MissingWeights
from shared.observability import STAGE_SECONDS
from shared.schemas import DetectionEvent, Features
from shared.service import CropExtractorHandler
from shared.topics import FEATURES_POSE, POSE_REQUESTS

log = logging.getLogger(__name__)
MIN_SIDE = 16  # px: below this a crop shows no pose (the network would upsample noise)
FALLBACK = "pose-fallback"


@dataclass
class PoseResult:
    status: str  # "ok" or "no-evidence"
    viewpoint: Viewpoint
    keypoints: np.ndarray | None = None
    flags: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)


def readable(crop: bytes) -> np.ndarray | str:
    """The crop as RGB, or the reason pose cannot look at it."""
    rgb = decode_crop(crop)
    if isinstance(rgb, str):
        return rgb
    if min(rgb.shape[:2]) < MIN_SIDE:
        return "tiny-crop"
    if int(rgb.max()) <= 8:
        return "black-frame"
    return rgb


def conclude(kp: np.ndarray | None, width: int, classified: Viewpoint | None, keypoints_random: bool) -> PoseResult:
    """One crop's answer from its keypoints (or None) and its classifier viewpoint (or None). Pure."""
    flags = []
    from_kp = None
    if kp is not None:
        from_kp = from_keypoints(kp, width) if not keypoints_random else unknown("random keypoint weights", "keypoints")
    confidence = keypoint_confidence(kp)
    if kp is None or keypoints_random or confidence < KEYPOINT_MIN_SCORE:
        flags.append(FALLBACK)  # regions stay on the box fractions
    if kp is not None and keypoints_random:
        flags.append("random-weights")
    view = combine(from_kp, classified)
    return PoseResult("ok" if view.label != "unknown" or kp is not None else "no-evidence", view, kp, flags)


class PoseHandler(CropExtractorHandler):
    name = "pose"
    input_topics = (POSE_REQUESTS,)

    def __init__(self, keypoints: KeypointModel | None, classifier: ViewpointClassifier | None, workers: int = 1,
                 off: dict[str, str] | None = None):
        super().__init__(workers)
        self.keypoints = keypoints
        self.classifier = classifier
        self.off = off or {}  # part -> why it is not running

    def health(self) -> dict:
        if self.keypoints is not None:
            path = "keypoints, the viewpoint classifier where they are unsure" if self.classifier else "keypoints"
        elif self.classifier is not None:
            path = f"viewpoint classifier only (keypoints off: {self.off.get('keypoints')})"
        else:
            path = "none: every viewpoint is unknown"
        return {"viewpoint_path": path,
                "keypoints": self.keypoints.version if self.keypoints else f"off: {self.off.get('keypoints')}",
                "viewpoint_classifier": self.classifier.version if self.classifier else
                f"off: {self.off.get('classifier')}"}

    def versions(self) -> dict[str, str | None]:
        return {"keypoints": self.keypoints.version if self.keypoints else None,
                "viewpoint_classifier": self.classifier.version if self.classifier else None}

    async def handle(self, events: Sequence[DetectionEvent]) -> list[Handled]:
        out = [Handled() for _ in events]
        todo = self.expecting(events)
        if not todo:
            return out
        results = await asyncio.get_running_loop().run_in_executor(
            self._pool, self.run, [events[i].crop_jpeg for i in todo])
        for i, result in zip(todo, results):
            out[i] = Handled([Output(FEATURES_POSE, events[i].property.encode(),
                                     pose_features(events[i], result, self.versions()).to_bytes())])
        return out

    def run(self, crops: list[bytes]) -> list[PoseResult]:
        """Every crop's answer; the networks run once per batch on the readable crops."""
        decoded = [readable(c) for c in crops]
        ok = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        kps: dict[int, np.ndarray] = {}
        views: dict[int, Viewpoint] = {}
        ms: dict[str, float] = {}
        if ok and self.keypoints is not None:
            started = time.perf_counter()
            kps = dict(zip(ok, self.keypoints.predict([decoded[i] for i in ok])))
            ms["keypoints"] = 1000 * (time.perf_counter() - started) / len(ok)
            STAGE_SECONDS.labels(self.name, "keypoints").observe(time.perf_counter() - started)
        if ok and self.classifier is not None:
            started = time.perf_counter()
            views = dict(zip(ok, self.classifier.predict([crops[i] for i in ok])))
            ms["viewpoint_classifier"] = 1000 * (time.perf_counter() - started) / len(ok)
            STAGE_SECONDS.labels(self.name, "viewpoint").observe(time.perf_counter() - started)
        results = []
        for i, d in enumerate(decoded):
            if isinstance(d, str):
                results.append(PoseResult("no-evidence", unknown(d), None, [FALLBACK, d]))
                continue
            r = conclude(kps.get(i), d.shape[1], views.get(i),
                         self.keypoints is not None and self.keypoints.random_weights)
            r.timings_ms = {k: round(v, 2) for k, v in ms.items()}
            results.append(r)
        return results


def pose_features(event: DetectionEvent, result: PoseResult, versions: dict) -> Features:
    kp = result.keypoints
    attributes = {"viewpoint": result.viewpoint.label, "angle": result.viewpoint.as_dict()["angle"],
                  "confidence": round(result.viewpoint.confidence, 3), "source": result.viewpoint.source,
                  "why": result.viewpoint.why or None, "versions": versions,
                  "keypoint_confidence": round(keypoint_confidence(kp), 3) if kp is not None else None,
                  # 17 x (x, y, score), crop pixels: 51 small numbers, well inside the SPEC's 500 bytes a detection
                  "keypoints": None if kp is None else [[round(float(v), 1) if j < 2 else round(float(v), 3)
                                                         for j, v in enumerate(row)] for row in kp]}
    return Features(
        component="pose", detection_id=event.detection_id, site=event.site, property=event.property,
        camera=event.camera, captured_at=event.captured_at, cls=event.cls, status=result.status,
        attributes=attributes, flags=result.flags, timings_ms={f"pose_{k}": v for k, v in result.timings_ms.items()},
        attempt=event.attempt)


def _off(value: str) -> bool:
    return value.strip().lower() in ("", "none", "off")


async def make_handler(settings: Settings) -> PoseHandler:
    off: dict[str, str] = {}
    keypoints = classifier = None
    if _off(settings.pose_keypoint_model):
        off["keypoints"] = "DEER_POSE_KEYPOINT_MODEL is none"
    else:
        try:  # a keypoint model with no weights refuses; the service goes on with the classifier (flagged fallback)
            keypoints = KeypointModel(settings.pose_keypoint_model, settings.model_cache,
                                      allow_random=settings.allow_random_weights,
                                      device="cuda" if settings.device == "cuda" else "cpu",
                                      flip_test=settings.pose_flip_test)
        except MissingWeights as exc:
            off["keypoints"] = str(exc)
            log.warning("pose: keypoints off: %s", exc)
        except ImportError as exc:  # weights present, OpenMMLab stack not installed (it is optional)
            off["keypoints"] = (f"the OpenMMLab stack is not installed ({exc.name or exc}): "
                                "DEER_POSE_KEYPOINTS=1 scripts/setup.sh installs it")
            log.warning("pose: keypoints off: %s", off["keypoints"])
    if _off(settings.pose_viewpoint_model):
        off["classifier"] = "DEER_POSE_VIEWPOINT_MODEL is none"
    else:
        try:
            classifier = ViewpointClassifier(settings.pose_viewpoint_model, settings.model_cache,
                                             device=settings.device, precision=settings.precision,
                                             engine=settings.inference_engine)
        except MissingWeights as exc:
            off["classifier"] = str(exc)
            log.warning("pose: viewpoint classifier off: %s", exc)
    # One worker: the networks batch a micro-batch themselves and use every core.
    return PoseHandler(keypoints, classifier, 1, off)
