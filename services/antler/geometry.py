"""Antler geometry from what one photo supports: the region, the antler mask, its skeleton, and the
measurements (points per side, spread, symmetry, tine angles, notable formations).

Pure functions of arrays. The mask takes thin structures that differ from their surroundings, dark
against sky or light against vegetation (morphological black-hat and top-hat at a scale wider than a
tine), in the part of the region that grows from the head. Branches, fences and grass stems are thin
too: what the mask cannot tell from antlers is said in the result's `quality`, and nothing here is
ever a reason to fail a detection. These estimates have no labelled photos to be measured against
here; their code is tested on drawn antlers with known tine counts and spreads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

VERSION = "antler-geometry-v1"
REGION_FRACTION = 0.30  # SPEC: the upper 30% of the box
WORK_HEIGHT = 128  # px: the region is measured at this height (thin structures stay a few px wide)
MIN_REGION = (24, 32)  # (height, width) px in the crop: below, nothing can be read
MIN_CONTRAST = 18.0  # grey levels: a region whose thin-structure response never reaches this is empty
KEYPOINT_CONFIDENCE = 0.6  # SPEC: pose keypoints below this are not used
# AP-10K keypoint indices used to place the region: eyes, nose, neck
LEFT_EYE, RIGHT_EYE, NOSE, NECK = 0, 1, 2, 3


@dataclass(frozen=True)
class Region:
    """Where the antlers are looked for, in crop pixels; `center_x` splits left from right."""

    x0: int
    y0: int
    x1: int
    y1: int
    center_x: float
    head_width: float | None  # eye distance x 2.5 when pose gave the eyes: the spread's reference
    source: str  # "box-top" or "keypoints"


@dataclass
class Geometry:
    present: bool
    reason: str | None = None  # why nothing was measured (empty region, no thin structure)
    points_left: int = 0
    points_right: int = 0
    spread_ratio: float | None = None  # mask width over the reference width
    spread_reference: str = "box-width"
    symmetry: float | None = None  # 0-1
    tine_angles_left: list[float] = field(default_factory=list)  # degrees from vertical, outward positive
    tine_angles_right: list[float] = field(default_factory=list)
    formations: list[str] = field(default_factory=list)
    quality: float = 0.0  # 0-1: contrast and size of the region
    mask_fraction: float = 0.0
    touches_top: bool = False  # the mask reaches the region's top edge (cut there, if that is the photo's edge)

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def region_of(height: int, width: int, keypoints: np.ndarray | None = None) -> Region:
    """The antler region of a crop: above the head from pose keypoints ((17, 3) x, y, confidence) when the
    eyes and the neck or nose are confident, else the upper 30% of the box."""
    if keypoints is not None and len(keypoints) > NECK:
        eyes = keypoints[[LEFT_EYE, RIGHT_EYE]]
        anchor = keypoints[NECK] if keypoints[NECK, 2] >= KEYPOINT_CONFIDENCE else keypoints[NOSE]
        if (eyes[:, 2] >= KEYPOINT_CONFIDENCE).all() and anchor[2] >= KEYPOINT_CONFIDENCE:
            eye_dist = float(np.hypot(*(eyes[0, :2] - eyes[1, :2])))
            head = max(eye_dist * 2.5, 8.0)
            cx, top_eye = float(eyes[:, 0].mean()), float(eyes[:, 1].min())
            half = head * 1.6  # a rack spreads well beyond the head
            x0, x1 = int(max(0, cx - half)), int(min(width, cx + half))
            y1 = int(min(height, top_eye + 0.15 * head))
            y0 = int(max(0, top_eye - 2.5 * head))
            if y1 - y0 >= 8 and x1 - x0 >= 8:
                return Region(x0, y0, x1, y1, cx, head, "keypoints")
    y1 = max(1, round(height * REGION_FRACTION))
    return Region(0, 0, width, y1, width / 2.0, None, "box-top")


def thin_structure_response(grey: np.ndarray, tine_px: int) -> np.ndarray:
    """Per pixel, how much a structure narrower than `tine_px` stands out from its surroundings.

    One polarity per region: antlers are darker than a sky and lighter than dark vegetation, and the
    region's median is its background (the structures are thin: a minority of pixels). Using both
    polarities at once would also light up the background showing between two close tines.
    """
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (tine_px, tine_px))
    d = grey.astype(np.float32) - float(np.median(grey))
    dark_mass = float(np.clip(-d - MIN_CONTRAST, 0, None).sum())
    light_mass = float(np.clip(d - MIN_CONTRAST, 0, None).sum())
    op = cv2.MORPH_BLACKHAT if dark_mass >= light_mass else cv2.MORPH_TOPHAT
    return cv2.morphologyEx(grey, op, k).astype(np.float32)


def antler_mask(grey: np.ndarray) -> tuple[np.ndarray, float]:
    """(bool mask of antler-like thin structures connected towards the base, peak contrast)."""
    h, w = grey.shape
    response = thin_structure_response(grey, max(5, (h // 8) | 1))
    peak = float(np.percentile(response, 99.5)) if response.size else 0.0
    if peak < MIN_CONTRAST:
        return np.zeros_like(grey, dtype=bool), peak
    level, _ = cv2.threshold(cv2.GaussianBlur(response, (3, 3), 0).astype(np.uint8), 0, 255,
                             cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (response >= max(level, MIN_CONTRAST * 0.75)).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(n, dtype=bool)
    min_area = max(6, int(0.002 * h * w))
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        # antlers grow from the head at the bottom of the region and reach up: keep pieces that reach
        # into the lower half and are taller than a speck
        if area >= min_area and y + bh >= 0.5 * h and bh >= 0.15 * h:
            keep[i] = True
    return keep[labels], peak


def skeleton(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a bool mask to one-pixel-wide lines."""
    img = np.pad(mask.astype(np.uint8), 1)
    while True:
        changed = False
        for step in (0, 1):
            p = [np.roll(np.roll(img, -dy, 0), -dx, 1) for dy, dx in
                 ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))]  # P2..P9
            neighbours = sum(p)
            transitions = sum(((p[i] == 0) & (p[(i + 1) % 8] == 1)).astype(np.uint8) for i in range(8))
            if step == 0:
                cond = (p[0] * p[2] * p[4] == 0) & (p[2] * p[4] * p[6] == 0)
            else:
                cond = (p[0] * p[2] * p[6] == 0) & (p[0] * p[4] * p[6] == 0)
            remove = (img == 1) & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1) & cond
            if remove.any():
                img[remove] = 0
                changed = True
        if not changed:
            return img[1:-1, 1:-1].astype(bool)


def _neighbour_count(skel: np.ndarray) -> np.ndarray:
    s = skel.astype(np.uint8)
    return cv2.filter2D(s, -1, np.ones((3, 3), np.float32), borderType=cv2.BORDER_CONSTANT) - s


def measure(rgb: np.ndarray, region: Region) -> Geometry:
    """The geometry of the antlers in `region` of an RGB crop."""
    crop = rgb[region.y0:region.y1, region.x0:region.x1]
    h, w = crop.shape[:2]
    if h < MIN_REGION[0] or w < MIN_REGION[1]:
        return Geometry(False, "region-too-small")
    scale = WORK_HEIGHT / h
    work = cv2.resize(crop, (max(8, round(w * scale)), WORK_HEIGHT), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(work, cv2.COLOR_RGB2GRAY)
    mask, peak = antler_mask(grey)
    if not mask.any():
        return Geometry(False, "empty-region" if peak < MIN_CONTRAST else "no-antler-structure")
    skel = skeleton(mask)
    neighbours = _neighbour_count(skel)
    ys, xs = np.nonzero(skel & (neighbours == 1))
    bys, bxs = np.nonzero(skel & (neighbours >= 3))
    center = (region.center_x - region.x0) * scale
    sk_ys = np.nonzero(skel)[0]
    base_y = sk_ys.max()
    reach = max(1, base_y - sk_ys.min())
    sides: dict[str, list[float]] = {"left": [], "right": []}
    for y, x in zip(ys, xs):
        if base_y - y < 0.15 * reach:
            continue  # the base, where the antler meets the head, is an end of the skeleton but not a tine
        side = "left" if x < center else "right"
        # the tine's direction: from the nearest branch point (else the base) to the tip
        if len(bys):
            k = int(np.argmin((bys - y) ** 2 + (bxs - x) ** 2))
            fy, fx = bys[k], bxs[k]
        else:
            fy, fx = base_y, center
        angle = math.degrees(math.atan2(x - fx, fy - y))  # 0 = straight up; positive = to image right
        sides[side].append(round(angle if side == "right" else -angle, 1))  # outward positive on both sides
    cols = np.nonzero(mask.any(axis=0))[0]
    spread_px = float(cols.max() - cols.min() + 1) / scale
    reference = region.head_width or float(region.x1 - region.x0)
    left, right = mask[:, :int(round(center))], mask[:, int(round(center)):]
    width = max(left.shape[1], right.shape[1])
    lpad = np.zeros((mask.shape[0], width), bool)
    rpad = np.zeros((mask.shape[0], width), bool)
    lpad[:, width - left.shape[1]:] = left
    rpad[:, :right.shape[1]] = right
    mirrored = np.fliplr(rpad)
    union = (lpad | mirrored).sum()
    shape_symmetry = float((lpad & mirrored).sum() / union) if union else 0.0
    nl, nr = len(sides["left"]), len(sides["right"])
    count_symmetry = 1.0 - abs(nl - nr) / max(nl, nr, 1)
    formations = []
    if any(abs(a) > 110 for a in sides["left"] + sides["right"]):
        formations.append("drop-tine")
    if abs(nl - nr) >= 3 or max(nl, nr) > 6:
        formations.append("non-typical")
    connected = float(mask.sum()) / max(1, mask.size)
    quality = float(np.clip(peak / 60.0, 0, 1) * np.clip(h / 96.0, 0, 1))
    return Geometry(True, None, nl, nr, round(spread_px / reference, 4),
                    "head-width" if region.head_width else "box-width",
                    round(0.5 * shape_symmetry + 0.5 * count_symmetry, 4),
                    sorted(sides["left"]), sorted(sides["right"]), formations, round(quality, 4),
                    round(connected, 4), bool(mask[:2].any()))
