"""Coat features of one crop: colour, markings and pattern, each present or "no evidence" (pure compute).

Bad input never raises: a crop under 32 px a side, an unreadable or uniform frame, a crop where no
animal is found, a grey infrared frame (no colour) each give "no evidence" for the parts concerned,
named in `flags`, and the detection goes on with its other components.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from services.coat import colour, markings
from services.coat.foreground import VERSION as FOREGROUND_VERSION
from services.coat.foreground import foreground
from services.coat.pattern import SIFT_DEFAULT_CONTRAST, PatternExtractor
from shared.coat import COLOUR_VERSION, GREY_VERSION, MARKINGS_VERSION, Pattern, is_infrared, pack
from shared.images import decode_crop
from shared.schemas import Embedding

MIN_SIDE = 32  # px: under this a crop shows no coat worth describing


@dataclass
class CoatFeatures:
    status: str  # "ok" or "no-evidence"
    flags: list[str] = field(default_factory=list)
    embeddings: list[Embedding] = field(default_factory=list)  # colour (or grey) and markings maps
    marks: list[dict] = field(default_factory=list)  # structured marking records
    patterns: dict[str, bytes] = field(default_factory=dict)  # matcher -> packed keypoints + descriptors
    pattern_versions: dict[str, str] = field(default_factory=dict)  # matcher -> its version
    attributes: dict = field(default_factory=dict)  # lighting, facing, foreground share, keypoint count
    timings_ms: dict[str, float] = field(default_factory=dict)
    mask: np.ndarray | None = None  # the animal's mask in the crop (not published: eval reuses it)


class CoatExtractor:
    """`methods`: the local feature matchers whose patterns are extracted, each a fusion component of its own."""

    def __init__(self, methods: Sequence[str] = ("xfeat", "rootsift"), keypoints: int = 1024,
                 restrict_to_animal: bool = True, sift_keypoints: int | None = None,
                 sift_contrast: float = SIFT_DEFAULT_CONTRAST):
        """`keypoints`: XFeat's budget (and RootSIFT's unless `sift_keypoints` names its own)."""
        budget = {"xfeat": keypoints, "rootsift": sift_keypoints or keypoints}
        self.patterns = {m: PatternExtractor(m, budget[m], sift_contrast) for m in methods}
        self.restrict = restrict_to_animal
        where = "-animal" if restrict_to_animal else "-crop"
        self.pattern_versions = {m: f"{extractor.version}{where}" for m, extractor in self.patterns.items()}
        # one matcher alone keeps the version it had before there were two
        self.version = f"coat-v3:{FOREGROUND_VERSION}:{'+'.join(self.pattern_versions.values())}"

    @classmethod
    def from_settings(cls, settings) -> "CoatExtractor":
        """The extractor the coat service runs under `settings` (shared.config.Settings)."""
        return cls(settings.coat_pattern_methods, settings.coat_keypoints, settings.coat_restrict_to_animal,
                   settings.coat_sift_keypoints, settings.coat_sift_contrast)

    def load(self) -> None:
        for extractor in self.patterns.values():
            extractor.load()

    def extract(self, crop: bytes) -> CoatFeatures:
        started = time.perf_counter()
        rgb = decode_crop(crop)
        if isinstance(rgb, str):
            return CoatFeatures("no-evidence", [rgb])
        h, w = rgb.shape[:2]
        if min(h, w) < MIN_SIDE:
            return CoatFeatures("no-evidence", ["tiny-crop"], attributes={"size": [w, h]})
        out = CoatFeatures("ok", attributes={"version": self.version})
        fg = foreground(rgb)
        out.timings_ms["foreground"] = _ms(started)
        out.attributes["foreground"] = round(fg.fraction, 4)
        out.mask = fg.mask
        if fg.approximate:
            out.flags.append("foreground-approximate")
        if not fg.found:
            out.flags.append("no-animal-found")
            if not self.restrict:  # the whole-crop pattern does not need the animal
                self._add_pattern(out, rgb, None)
            out.status = "ok" if out.patterns else "no-evidence"
            out.timings_ms["total"] = _ms(started)
            return out
        head_left = colour.facing_left(fg.mask, fg.box)
        if not fg.approximate:  # an ellipse's mass centre says nothing about where the head is
            out.attributes["facing"] = "left" if head_left else "right"
        regions = colour.region_boxes(fg.box, head_left)
        infrared = is_infrared(rgb)
        out.attributes["lighting"] = "infrared" if infrared else "day"
        normalised = colour.normalise_illumination(rgb)
        t = time.perf_counter()
        hist = colour.colour_histograms(normalised, fg.mask, regions, grey=infrared)
        if infrared:
            out.flags.append("infrared")
        if hist.any():
            version = GREY_VERSION if infrared else COLOUR_VERSION
            out.embeddings.append(Embedding.of(version.split(":")[0], version, hist, False))
        else:
            out.flags.append("no-colour")
        out.timings_ms["colour"] = _ms(t)
        t = time.perf_counter()
        found = markings.find_markings(normalised, fg.mask, fg.box, head_left)
        out.marks = [m.as_dict() for m in found]
        if found:
            out.embeddings.append(Embedding.of("coat-markings", MARKINGS_VERSION, markings.marking_map(found), False))
        else:
            out.flags.append("no-markings")
        out.timings_ms["markings"] = _ms(t)
        self._add_pattern(out, rgb, fg.mask if self.restrict else None)
        out.timings_ms["total"] = _ms(started)
        return out

    def _add_pattern(self, out: CoatFeatures, rgb: np.ndarray, mask: np.ndarray | None) -> None:
        out.attributes["keypoints"] = {}
        for method, extractor in self.patterns.items():
            t = time.perf_counter()
            pattern: Pattern = extractor(rgb, mask)
            out.attributes["keypoints"][method] = len(pattern)
            if len(pattern) >= 5:
                out.patterns[method], out.pattern_versions[method] = pack(pattern), self.pattern_versions[method]
            out.timings_ms[f"pattern_{method}"] = _ms(t)
        if not out.patterns:
            out.flags.append("no-keypoints")


def _ms(since: float) -> float:
    return round(1000 * (time.perf_counter() - since), 3)
