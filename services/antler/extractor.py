"""The antler extractor: one crop in, antler features (or why there are none) out. No I/O.

Every outcome is an answer, never an error: a doe that reached the service, an unreadable crop, a box
cut by the top of the frame, a rear view, a region too small, an empty sky or no antler structure all
give "no antler evidence" with the reason flagged, and fusion scores without antlers. Whether antlers
were *absent* (`present: false`: the region was readable and held none) or *unknown* (`present: null`)
is kept apart: only the former counts as "seen without antlers" in the casting-window rule.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from services.antler import geometry
from services.antler.fingerprint import Fingerprinter
from services.antler.seasons import SeasonCalendar
from shared.coat import is_infrared
from shared.images import decode_crop
from shared.schemas import ANTLERED, DetectionClass, Embedding

ABSENT_REASONS = ("empty-region", "no-antler-structure")  # the region was readable and held no antlers


@dataclass
class AntlerFeatures:
    status: str  # "ok" or "no-evidence"
    flags: list[str]
    attributes: dict
    region: np.ndarray | None = None  # RGB of the antler region, for the fingerprint (ok only)
    embeddings: list[Embedding] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)


def no_evidence(reason: str, attributes: dict, present: bool | None = None, **extra) -> AntlerFeatures:
    return AntlerFeatures("no-evidence", [reason, *extra.pop("flags", [])],
                          {**attributes, "present": present, "reason": reason, **extra})


def cut_by_frame(touches_top: bool, box_top: int) -> bool:
    """The rack runs into the photo's top edge (the box starts there and so does the antler mask): its tines
    and spread are cut, and a fingerprint would mislead."""
    return touches_top and box_top <= 1


def measure(crop_jpeg: bytes, cls: DetectionClass | str, box_top: int, captured_at: datetime,
            calendar: SeasonCalendar, keypoints: np.ndarray | None = None,
            viewpoint: str | None = None) -> AntlerFeatures:
    """Everything but the fingerprint (which runs batched on the network): region, geometry, season."""
    started = time.perf_counter()
    attributes = {"geometry_version": geometry.VERSION, "season": calendar.season(captured_at),
                  "casting_window": calendar.casting_window(captured_at)}
    if DetectionClass(cls) not in ANTLERED:
        return no_evidence("not-antlered-class", attributes)
    rgb = decode_crop(crop_jpeg)
    if isinstance(rgb, str):
        return no_evidence(rgb, attributes)
    if viewpoint == "rear":
        return no_evidence("rear-view", attributes)
    flags = ["infrared"] if is_infrared(rgb) else []
    region = geometry.region_of(rgb.shape[0], rgb.shape[1], keypoints)
    geo = geometry.measure(rgb, region)
    attributes.update(region={"x0": region.x0, "y0": region.y0, "x1": region.x1, "y1": region.y1,
                              "source": region.source}, geometry=geo.as_dict())
    ms = {"geometry": round(1000 * (time.perf_counter() - started), 2)}
    if geo.present and cut_by_frame(geo.touches_top, box_top):
        geo.present = False
        out = no_evidence("cut-by-frame", attributes, flags=flags)
        out.timings_ms = ms
        return out
    if not geo.present:
        absent = geo.reason in ABSENT_REASONS
        out = no_evidence(geo.reason, attributes, present=False if absent else None, flags=flags)
        out.timings_ms = ms
        return out
    return AntlerFeatures("ok", flags, {**attributes, "present": True},
                          rgb[region.y0:region.y1, region.x0:region.x1].copy(), timings_ms=ms)


def fingerprint(found: list[AntlerFeatures], fingerprinter: Fingerprinter) -> None:
    """Add the 64-d fingerprint to every result with antlers, in one network batch."""
    todo = [f for f in found if f.status == "ok" and f.region is not None]
    if not todo:
        return
    started = time.perf_counter()
    vectors = fingerprinter([f.region for f in todo])
    ms = round(1000 * (time.perf_counter() - started) / len(todo), 2)
    for f, vec in zip(todo, vectors):
        f.embeddings = [Embedding.of("antler", fingerprinter.version, vec, fingerprinter.model.random_weights)]
        f.attributes["fingerprint_version"] = fingerprinter.version
        f.timings_ms["fingerprint"] = ms
        f.region = None
