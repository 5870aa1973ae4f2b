"""Coat colour: illumination normalisation, body regions, per-region colour histograms (SPEC).

- Illumination: grey-world over the whole crop (the scene tells the light's colour; the animal's own
  colour must survive, so the animal alone is not greyed), then a luminance stretch between the
  crop's 2nd and 98th percentiles (dawn, noon and flash frames land on one scale).
- Regions are placed on the animal (the foreground box), not on the loose detection box; from pose
  keypoints when those are given with enough confidence (`regions_from_keypoints`).
- Histograms: 16 bins per RGB channel per region over the animal's pixels, 4 regions = 192-d.
- Night frames: trail cameras switch to grey infrared at night. Such a frame carries no colour: it is
  flagged `infrared`, and its histograms are of grey levels only (64-d, its own version), so its
  "colour" never meets a day frame's.
- Seasonal tolerance (summer/winter coats): the grey-world and stretch remove the light's colour and
  level; histograms are compared after smoothing each over its neighbouring bins (a shift of one bin,
  1/16 of the range, still overlaps by half), so a coat that darkens or greys slightly between
  seasons keeps most of its similarity, while rufous against dark brown (a doe against an adult
  nyala bull) does not. Larger seasonal changes are left to the other components: the fusion
  calibration weighs colour by what it is worth.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from shared.coat import BINS, REGIONS

# Our reading of the SPEC's regions, as fractions of the animal's box with its head towards x = 0
# (mirrored for an animal facing right): (x0, y0, x1, y1).
REGION_BOXES: dict[str, tuple[float, float, float, float]] = {
    "chest": (0.0, 0.50, 0.35, 0.75),  # the lower front of the trunk (its lower quarter, in front)
    "flanks": (0.20, 0.25, 0.85, 0.75),  # the middle half
    "face": (0.0, 0.0, 0.22, 0.35),  # a head-sized box in the upper front corner
    "legs": (0.0, 0.85, 1.0, 1.0),  # the lower 15%
}
MIN_REGION_PIXELS = 40  # fewer animal pixels than this: the region is not seen
# AP-10K keypoint indices used to place regions from pose
EYES_NOSE, NECK, SHOULDERS, ELBOWS, HIPS, KNEES, PAWS = (0, 1, 2), 3, (5, 8), (6, 9), (11, 14), (12, 15), (7, 10, 13, 16)
KEYPOINT_MIN_SCORE = 0.6  # SPEC: pose confidence below 0.6 falls back (to the box fractions)

Box = tuple[int, int, int, int]


def normalise_illumination(rgb: np.ndarray) -> np.ndarray:
    """Grey-world white balance over the crop, then a luminance stretch (uint8 RGB out)."""
    x = rgb.astype(np.float32)
    means = x.reshape(-1, 3).mean(0)
    x *= means.mean() / np.maximum(means, 1.0)
    luma = x @ np.array([0.299, 0.587, 0.114], np.float32)
    lo, hi = np.percentile(luma, (2, 98))
    x = (x - lo) * (255.0 / max(hi - lo, 1.0))
    return np.clip(x, 0, 255).astype(np.uint8)


def facing_left(mask: np.ndarray, box: Box) -> bool:
    """Whether the animal's head is towards x = 0 of the crop, from its silhouette: the trunk and
    hindquarters hold most of the mass and the neck and head little, so the mass centre lies on the
    tail side of the box centre. (A profile-left view shows the left flank with the head to the left.)
    Measured on 123 nyala-train photos against their left/right labels: right 85% of the time; pose
    keypoints, when present, are the better source."""
    x0, y0, x1, y1 = box
    columns = mask[y0:y1, x0:x1].sum(0).astype(np.float64)
    if columns.sum() == 0:
        return True
    centre = float((np.arange(len(columns)) * columns).sum() / columns.sum())
    return centre >= (len(columns) - 1) / 2


def region_boxes(box: Box, head_left: bool) -> dict[str, Box]:
    """The SPEC's regions in crop pixels, placed on the animal's box by fixed fractions."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    out = {}
    for name, (a, b, c, d) in REGION_BOXES.items():
        if not head_left:
            a, c = 1.0 - c, 1.0 - a
        out[name] = (x0 + int(a * w), y0 + int(b * h), x0 + max(int(c * w), int(a * w) + 1),
                     y0 + max(int(d * h), int(b * h) + 1))
    return out


def regions_from_keypoints(keypoints: Sequence[Sequence[float]], shape: tuple[int, int]) -> dict[str, Box] | None:
    """Regions placed from AP-10K keypoints ([x, y, score] x 17, crop pixels), or None when the pose is
    not confident enough for the trunk (shoulders and hips) to be placed."""
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.shape != (17, 3):
        return None
    ok = kp[:, 2] >= KEYPOINT_MIN_SCORE
    h, w = shape

    def around(idx, pad: float) -> Box | None:
        pts = kp[[i for i in idx if ok[i]], :2]
        if len(pts) == 0:
            return None
        (ax, ay), (bx, by) = pts.min(0), pts.max(0)
        px, py = pad * max(bx - ax, 1.0), pad * max(by - ay, 1.0)
        box = (int(max(0, ax - px)), int(max(0, ay - py)), int(min(w, bx + px + 1)), int(min(h, by + py + 1)))
        return box if box[2] > box[0] and box[3] > box[1] else None

    if not any(ok[i] for i in SHOULDERS) or not any(ok[i] for i in HIPS):
        return None
    regions = {"flanks": around(SHOULDERS + HIPS, 0.15), "face": around(EYES_NOSE, 0.6),
               "chest": around((NECK,) + ELBOWS, 0.2), "legs": around(KNEES + PAWS, 0.1)}
    return {k: v for k, v in regions.items() if v is not None}


def colour_histograms(rgb: np.ndarray, mask: np.ndarray, regions: Mapping[str, Box], grey: bool = False) -> np.ndarray:
    """Per-region histograms over the animal's pixels: 16 bins x RGB x 4 regions (192-d), or 16 grey bins x
    4 regions (64-d) for an infrared frame. Each channel's histogram sums to 1; a region not seen is zeros."""
    channels = 1 if grey else 3
    out = np.zeros((len(REGIONS), channels, BINS), np.float32)
    img = rgb.mean(axis=2, keepdims=True) if grey else rgb
    for r, name in enumerate(REGIONS):
        if name not in regions:
            continue
        x0, y0, x1, y1 = regions[name]
        pixels = img[y0:y1, x0:x1][mask[y0:y1, x0:x1] > 0]
        if len(pixels) < MIN_REGION_PIXELS:
            continue
        for c in range(channels):
            hist = np.bincount(np.minimum(pixels[:, c].astype(np.int32) * BINS // 256, BINS - 1), minlength=BINS)
            out[r, c] = hist / hist.sum()
    return out.ravel()


