"""Markings: white patches, dark spots, facial blazes, stripes and scars as structured records, and a
small map of them for matching.

A pixel of the animal is "white" when it is brighter than twice its surroundings (SPEC), "dark" when
darker than half of them; the surroundings are the animal's own brightness blurred over a tenth of
its size (so a pale flank and a dark flank are each judged against themselves). Connected pieces
become records, described relative to the animal's box with the head towards x = 0:

- `facial-blaze`: a white piece centred in the face region;
- `stripe`: a long thin white piece within 30 degrees of vertical on the flanks (striped coats);
- `scar`: a long thin piece (white or dark) at any other angle on the trunk;
- `white-patch` / `dark-spot`: the rest.

For matching, the records become a map: 8 x 4 cells over the animal's box, white and dark area per
cell (64-d), the face cells weighted double in frontal views (SPEC), L2-normalised; two maps compare
by cosine. Maps of animals facing different ways are never compared (`services.coat.match`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import cv2
import numpy as np

from services.coat.colour import REGION_BOXES, Box

WHITE_RATIO = 2.0
DARK_RATIO = 0.5
MIN_LEVEL = 0.12  # surroundings darker than this (shadow, black coat) judge nothing: no division by ~0
MIN_AREA = 0.0004  # of the animal's area: smaller pieces are noise (and hair texture)
ELONGATED = 4.0  # length / width above which a piece is a line (stripe or scar)
MAX_RECORDS = 64  # the largest pieces are kept
GRID = (4, 8)  # rows, columns of the map
MAP_DIM = 2 * GRID[0] * GRID[1]


@dataclass(frozen=True)
class Marking:
    kind: str  # white-patch | dark-spot | facial-blaze | stripe | scar
    x: float  # centre, 0-1 across the animal's box from its head end
    y: float  # centre, 0-1 down the animal's box
    width: float  # of the animal's box
    height: float
    area: float  # share of the animal's area
    angle: float  # degrees from vertical, 0-90
    region: str | None  # the SPEC region holding its centre (face, chest, flanks, legs), if any
    bright: bool  # brighter than its surroundings (else darker)

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def find_markings(rgb: np.ndarray, mask: np.ndarray, box: Box, head_left: bool) -> list[Marking]:
    """The markings on the animal (`mask`, its box in the crop), largest first."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if w < 8 or h < 8:
        return []
    luma = cv2.cvtColor(rgb[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    animal = mask[y0:y1, x0:x1] > 0
    sigma = max(2.0, 0.1 * max(w, h))
    # the surroundings over the animal only: a normalised blur, so the scene never lightens a flank
    weight = cv2.GaussianBlur(animal.astype(np.float32), (0, 0), sigma)
    around = cv2.GaussianBlur(luma * animal, (0, 0), sigma) / np.maximum(weight, 1e-3)
    judged = animal & (around > MIN_LEVEL)
    out: list[Marking] = []
    animal_area = max(1, int(animal.sum()))
    for bright, pixels in ((True, judged & (luma > WHITE_RATIO * around)), (False, judged & (luma < DARK_RATIO * around))):
        count, parts, stats, centres = cv2.connectedComponentsWithStats(pixels.astype(np.uint8), connectivity=8)
        for i in range(1, count):
            area = stats[i, cv2.CC_STAT_AREA] / animal_area
            if area < MIN_AREA:
                continue
            x, y, pw, ph = (int(v) for v in stats[i, :4])
            piece = parts[y:y + ph, x:x + pw] == i  # its own bounding box: no full-image pass per piece
            out.append(_record(piece, (x, y), stats[i], centres[i], area, bright, w, h, head_left))
    out.sort(key=lambda m: -m.area)
    return out[:MAX_RECORDS]


def _record(piece: np.ndarray, origin: tuple[int, int], stat, centre, area: float, bright: bool, w: int, h: int,
            head_left: bool) -> Marking:
    ys, xs = np.nonzero(piece)
    xs, ys = xs + origin[0], ys + origin[1]
    length, width, angle = _shape(xs, ys)
    cx, cy = centre[0] / w, centre[1] / h
    if not head_left:
        cx = 1.0 - cx
    region = next((name for name, (a, b, c, d) in REGION_BOXES.items() if a <= cx < c and b <= cy < d), None)
    thin = length >= ELONGATED * max(width, 1.0)
    if bright and region == "face":
        kind = "facial-blaze"
    elif thin and bright and angle <= 30 and region == "flanks":
        kind = "stripe"
    elif thin and region in ("flanks", "chest"):
        kind = "scar"
    else:
        kind = "white-patch" if bright else "dark-spot"
    return Marking(kind, float(cx), float(cy), stat[cv2.CC_STAT_WIDTH] / w, stat[cv2.CC_STAT_HEIGHT] / h,
                   float(area), float(angle), region, bright)


def _shape(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float]:
    """(length, width, angle from vertical in degrees) of a piece from its second moments."""
    if len(xs) < 3:
        return 1.0, 1.0, 0.0
    cov = np.cov(np.stack([xs, ys]).astype(np.float64))
    values, vectors = np.linalg.eigh(cov)
    major = vectors[:, 1]
    angle = float(np.degrees(np.arctan2(abs(major[0]), abs(major[1]))))  # 0 = vertical
    return 4 * float(np.sqrt(max(values[1], 0))), 4 * float(np.sqrt(max(values[0], 0))), angle


def marking_map(records: list[Marking] | list[Mapping], frontal: bool = False) -> np.ndarray:
    """The 64-d map of markings used for matching (zeros when there are none)."""
    rows, cols = GRID
    grid = np.zeros((2, rows, cols), np.float32)
    for m in records:
        m = m if isinstance(m, Mapping) else asdict(m)
        dark = not m["bright"]
        weight = m["area"] * (2.0 if frontal and m["region"] == "face" else 1.0)
        grid[int(dark), min(rows - 1, int(m["y"] * rows)), min(cols - 1, int(m["x"] * cols))] += weight
    flat = grid.ravel()
    norm = float(np.linalg.norm(flat))
    return flat / norm if norm > 0 else flat


