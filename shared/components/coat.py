"""Coat components: a detection's coat features against an exemplar's, three raw scores.

- `coat:colour`: per-region histogram intersection (`shared.coat`); day colour and infrared
  grey levels are different versions and never meet.
- `coat:markings`: cosine of the two marking maps; only for animals facing the same way (a map is
  laid out head-first, so a left flank would otherwise meet a mirrored right flank).
- `coat:pattern` (XFeat) and `coat:pattern-rootsift` (RootSIFT): geometrically verified keypoint matches,
  squashed to [0, 1). Two matchers, two components: they find different animals (on nyala-train's fit half
  the fitted fusion weighs both), and each is calibrated on its own.
Each is None ("no evidence") when either side lacks that part.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from shared import coat as coat_features

COLOUR, MARKINGS, PATTERN = "coat:colour", "coat:markings", "coat:pattern"
PATTERN_OF = {"xfeat": PATTERN, "rootsift": "coat:pattern-rootsift"}  # matcher -> its component
COAT_COMPONENTS = (COLOUR, MARKINGS, *PATTERN_OF.values())


def colour_similarity(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    return None if a is None or b is None else coat_features.colour_similarity(a, b)


def markings_similarity(a: np.ndarray | None, b: np.ndarray | None, facing_a: str | None,
                        facing_b: str | None) -> float | None:
    if a is None or b is None or facing_a is None or facing_a != facing_b:
        return None
    return coat_features.marking_similarity(a, b)


def pattern_similarity(a: bytes | None, b: bytes | None) -> float | None:
    if a is None or b is None:
        return None
    pa, pb = coat_features.unpack(a), coat_features.unpack(b)
    if pa.kind != pb.kind:
        return None
    return coat_features.pattern_score(coat_features.inliers(pa, pb))


def coat_scores(query: Mapping, exemplar: Mapping) -> dict[str, float | None]:
    """The raw scores of two detections' coat features, each a mapping with `colour` (version, vector),
    `markings` (vector), `facing` and `patterns` ({matcher: (version, packed bytes)}); a matcher's component
    only where the query has its pattern."""
    q_colour, e_colour = query.get("colour"), exemplar.get("colour")
    same_colour = q_colour is not None and e_colour is not None and q_colour[0] == e_colour[0]
    scores = {
        COLOUR: colour_similarity(q_colour[1], e_colour[1]) if same_colour else None,
        MARKINGS: markings_similarity(query.get("markings"), exemplar.get("markings"), query.get("facing"),
                                      exemplar.get("facing")),
    }
    theirs = exemplar.get("patterns") or {}
    for matcher, (version, raw) in (query.get("patterns") or {}).items():
        if matcher in PATTERN_OF:
            other = theirs.get(matcher)
            same = other is not None and other[0] == version  # another extractor's keypoints never meet
            scores[PATTERN_OF[matcher]] = pattern_similarity(raw, other[1]) if same else None
    return scores


def colour_matrix(vectors: Sequence[np.ndarray | None]) -> np.ndarray:
    """All pairwise colour similarities of photos (None: no colour), NaN where not comparable."""
    n = len(vectors)
    out = np.full((n, n), np.nan)
    have = [i for i, v in enumerate(vectors) if v is not None]
    if have:
        out[np.ix_(have, have)] = coat_features.colour_similarity_matrix(np.stack([vectors[i] for i in have]))
    return out


def markings_matrix(maps: Sequence[np.ndarray | None], facing: Sequence[str | None]) -> np.ndarray:
    """All pairwise marking-map cosines, NaN where either has no markings or they face different ways."""
    n = len(maps)
    out = np.full((n, n), np.nan)
    have = [i for i, v in enumerate(maps) if v is not None and facing[i] is not None]
    if have:
        m = np.stack([maps[i] for i in have])
        same = np.array([facing[i] for i in have])
        out[np.ix_(have, have)] = np.where(same[:, None] == same[None, :], m @ m.T, np.nan)
    return out
