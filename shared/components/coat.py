"""Coat components: a detection's coat against a gallery photo's, one component per kind of evidence.

An item is a coat view (`coat_view`): `colour` (version, vector), `markings` (vector), `facing`, and
`patterns` ({matcher: (version, packed keypoints or the `Pattern` they unpack to)}), each None where the photo lacks it.
- `coat:colour`: per-region histogram intersection (`shared.coat`); day colour and infrared
  grey levels are different versions and never meet.
- `coat:markings`: cosine of the two marking maps; only for animals facing the same way (a map is
  laid out head-first, so a left flank would otherwise meet a mirrored right flank).
- `coat:pattern-xfeat` (XFeat) and `coat:pattern-rootsift` (RootSIFT): geometrically verified keypoint matches,
  squashed to [0, 1). Two matchers, two components: they find different animals (on nyala-train's fit half
  the fitted fusion weighs both), and each is calibrated on its own. A matcher's component scores only the
  queries that carry its pattern.
Each gives NaN ("no evidence") where either side lacks that part.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from shared import coat as coat_features
from shared.components.base import Component, cosine, grouped, register
from shared.schemas import Embedding

COAT = "coat"
COLOUR, MARKINGS, PATTERN = "coat:colour", "coat:markings", "coat:pattern-xfeat"
PATTERN_OF = {"xfeat": PATTERN, "rootsift": "coat:pattern-rootsift"}  # matcher -> its component
# milliseconds a pair at the service's budgets (one Zen 4 core, nyala photos: XFeat ~660 keypoints of 64
# values, RootSIFT ~1,570 of 128; integer products): the order of the cascade, cheaper first
PATTERN_COST_MS = {"xfeat": 0.8, "rootsift": 2.4}
COAT_COMPONENTS = (COLOUR, MARKINGS, *PATTERN_OF.values())


def coat_view(stored: Mapping) -> dict:
    """A photo's coat view from its stored coat features (the event as fusion's join keeps it, with its
    patterns decoded beside it: {"features": ..., "patterns": {matcher: (version, bytes)}})."""
    features = stored["features"]
    vectors = {e["version"]: Embedding.model_validate(e).array() for e in features.get("embeddings", [])}
    return view_of(vectors, features.get("attributes", {}).get("facing"), stored.get("patterns") or {})


def view_of(vectors: Mapping[str, np.ndarray], facing: str | None, patterns: Mapping) -> dict:
    """A coat view from a photo's coat vectors by version, its facing and its patterns."""
    colour = next(((v, vec) for v, vec in vectors.items()
                   if v in (coat_features.COLOUR_VERSION, coat_features.GREY_VERSION)), None)
    return {"colour": colour, "markings": vectors.get(coat_features.MARKINGS_VERSION), "facing": facing,
            "patterns": dict(patterns)}


class ColourSimilarity(Component):
    name, reads = COLOUR, COAT

    def similarity(self, queries: Sequence[Mapping], gallery: Sequence[Mapping]) -> np.ndarray:
        def version(view):
            colour = view.get("colour")
            return None if colour is None or colour[1] is None else colour[0]

        def block(q, g):
            n = len(q)
            m = coat_features.colour_similarity_matrix(np.stack([v["colour"][1] for v in [*q, *g]]))
            return m[:n, n:]
        return grouped(queries, gallery, version, block)


class MarkingsSimilarity(Component):
    name, reads = MARKINGS, COAT

    def similarity(self, queries: Sequence[Mapping], gallery: Sequence[Mapping]) -> np.ndarray:
        def facing(view):
            return view.get("facing") if view.get("markings") is not None else None

        return grouped(queries, gallery, facing, lambda q, g: cosine(np.stack([v["markings"] for v in q]),
                                                                     np.stack([v["markings"] for v in g])))


class PatternSimilarity(Component):
    """One keypoint matcher's patterns, matched pair by pair (the costliest comparison: callers shortlist)."""

    reads = COAT
    costly = True

    def __init__(self, matcher: str, name: str, cost: float):
        self.matcher, self.name, self.cost = matcher, name, cost

    def applies(self, query: Mapping) -> bool:
        return self.matcher in (query.get("patterns") or {})

    def similarity(self, queries: Sequence[Mapping], gallery: Sequence[Mapping]) -> np.ndarray:
        def version(view):
            pattern = (view.get("patterns") or {}).get(self.matcher)
            return None if pattern is None or pattern[1] is None else pattern[0]  # other extractors never meet

        def block(q, g):
            theirs = [coat_features.as_pattern(v["patterns"][self.matcher][1]) for v in g]
            out = np.full((len(q), len(g)), np.nan)
            for i, view in enumerate(q):
                mine = coat_features.as_pattern(view["patterns"][self.matcher][1])
                for j, other in enumerate(theirs):
                    if mine.kind == other.kind:  # each pattern unpacked once, every pair verified
                        out[i, j] = coat_features.pattern_score(coat_features.inliers(mine, other))
            return out
        return grouped(queries, gallery, version, block)


for _component in (ColourSimilarity(), MarkingsSimilarity(),
                   *(PatternSimilarity(matcher, name, PATTERN_COST_MS[matcher]) for matcher, name in PATTERN_OF.items())):
    register(_component)
