"""The enhanced mode's components alone, per crop, without the stack: the coat extractor and its pattern
match, the antler geometry and fingerprint, the pose keypoints and viewpoint classifier."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable

import numpy as np

from shared.config import Settings


def component_costs(crops: list[bytes], settings: Settings, progress: Callable[[str], None]) -> dict:
    """The report's `coat_bare`, `antler_bare` and `pose_bare`."""
    progress("coat extraction and matching, bare ...")
    costs = {"coat_bare": coat_costs(crops, settings)}
    progress("antler geometry and fingerprint, bare ...")
    costs["antler_bare"] = antler_costs(crops, settings)
    progress("pose keypoints and viewpoint, bare ...")
    costs["pose_bare"] = pose_costs(crops, settings)
    return costs


def coat_costs(crops: list[bytes], settings: Settings) -> dict:
    """Milliseconds of the coat extractor per crop (one thread) and of one pattern match per matcher, median."""
    from services.coat.extractor import CoatExtractor
    from shared.components import component
    from shared.components.coat import PATTERN_OF

    extractor = CoatExtractor.from_settings(settings)
    extractor.extract(crops[0])  # warm-up: ONNX session
    features, times = [], []
    for crop in crops:
        started = time.perf_counter()
        features.append(extractor.extract(crop))
        times.append(1000 * (time.perf_counter() - started))
    match, patterns = {}, {}
    for method in extractor.patterns:
        patterns[method] = [f.patterns[method] for f in features if method in f.patterns]
        scorer, times_of = component(PATTERN_OF[method]), []
        views = [{"patterns": {method: ("bench", p)}} for p in patterns[method]]
        for a, b in zip(views, views[1:] + views[:1]):  # one pair a call, as fusion's cost per shortlisted photo
            started = time.perf_counter()
            scorer.similarity([a], [b])
            times_of.append(1000 * (time.perf_counter() - started))
        match[method] = round(float(np.median(times_of)), 2) if times_of else None
    steps = sorted({k for f in features for k in f.timings_ms if k != "total"})
    return {"extract_ms_per_crop": round(float(np.median(times)), 1),
            "steps_ms": {k: round(float(np.median([f.timings_ms[k] for f in features if k in f.timings_ms])), 1)
                         for k in steps},
            "match_ms_per_pair": match,
            "pattern_bytes_median": {m: int(np.median([len(p) for p in ps])) if ps else None
                                     for m, ps in patterns.items()},
            "crops": len(crops), "patterns": {m: len(ps) for m, ps in patterns.items()}}


def antler_costs(crops: list[bytes], settings: Settings) -> dict:
    """Milliseconds of the antler service per crop: geometry (one thread), and the fingerprint network on the
    head-top regions in batches of 16 (as the service runs a micro-batch)."""
    from services.antler.extractor import measure
    from services.antler.fingerprint import Fingerprinter
    from services.antler.seasons import SeasonCalendar
    from shared.images import model_input
    from shared.models import load_configured

    calendar = SeasonCalendar()
    now = datetime.now(timezone.utc)
    times = []
    for crop in crops:
        started = time.perf_counter()
        measure(crop, "buck", 40, now, calendar)
        times.append(1000 * (time.perf_counter() - started))
    model = load_configured(settings.antler_model, settings, allow_random=True)
    fingerprinter = Fingerprinter(model)
    regions = [model_input(c, 224)[: round(224 * 0.3)] for c in crops]  # every head-top region, antlers or not
    fingerprinter(regions[:16])  # warm-up
    started = time.perf_counter()
    for k in range(0, len(regions), 16):
        fingerprinter(regions[k:k + 16])
    return {"geometry_ms_per_crop": round(float(np.median(times)), 1),
            "fingerprint_ms_per_crop": round(1000 * (time.perf_counter() - started) / len(regions), 2),
            "model": model.version, "crops": len(crops)}


def pose_costs(crops: list[bytes], settings: Settings) -> dict:
    """Milliseconds of the pose service per crop: the AP-10K keypoint network (random weights where its
    weights are missing: speed only) one crop at a time and in batches of 8, and the viewpoint classifier."""
    from services.pose.classifier import ViewpointClassifier
    from services.pose.keypoints import KeypointModel
    from shared.images import decode_crop
    from shared.models import MissingWeights

    out: dict = {"crops": len(crops)}
    rgb = [decode_crop(c) for c in crops]
    model = KeypointModel(settings.pose_keypoint_model, settings.model_cache, allow_random=True,
                          flip_test=settings.pose_flip_test)
    out["keypoint_model"] = model.version
    out["flip_test"] = settings.pose_flip_test
    model.predict(rgb[:2])  # warm-up
    for batch in (1, 8):
        started = time.perf_counter()
        for k in range(0, len(rgb), batch):
            model.predict(rgb[k:k + batch])
        out[f"keypoints_ms_per_crop_batch{batch}"] = round(1000 * (time.perf_counter() - started) / len(rgb), 1)
    out["keypoint_parameters_m"] = round(sum(p.numel() for p in model.model.parameters()) / 1e6, 2)
    try:
        classifier = ViewpointClassifier(settings.pose_viewpoint_model, settings.model_cache,
                                         precision=settings.precision, engine=settings.inference_engine)
    except MissingWeights as exc:
        out["viewpoint_classifier"] = f"not measured: {exc}"
        return out
    classifier.predict(crops[:2])
    started = time.perf_counter()
    for k in range(0, len(crops), 16):
        classifier.predict(crops[k:k + 16])
    out["viewpoint_classifier"] = classifier.version
    out["viewpoint_ms_per_crop_batch16"] = round(1000 * (time.perf_counter() - started) / len(crops), 2)
    return out
