"""The pose-aware component: the detection against a candidate's exemplars of the same viewpoint only.

A left flank and a right flank of one striped animal are different pictures; the best body similarity
over every exemplar mixes the two. `pose` is the body similarity (the fast model's) to the candidate's
exemplars seen from the detection's own viewpoint, and "no evidence" when the detection's viewpoint is
unknown or the candidate has no exemplar from it (it is calibrated and fused like any component, so its
weight is what labelled data says it is worth).

An item is a `Seen`: a photo's viewpoint (`shared.viewpoints.viewpoint_of`) and its body embedding.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from shared.components.base import Component, cosine, grouped, register
from shared.viewpoints import known

POSE = "pose"


class Seen(NamedTuple):
    viewpoint: str | None
    body: np.ndarray | None


class PoseSimilarity(Component):
    """The body cosine (`shared.components.body`) of photos seen from one known viewpoint, NaN across them."""

    name, reads = POSE, POSE

    def similarity(self, queries: Sequence[Seen], gallery: Sequence[Seen]) -> np.ndarray:
        def viewpoint(seen: Seen):
            return (seen.viewpoint, len(seen.body)) if known(seen.viewpoint) and seen.body is not None else None

        return grouped(queries, gallery, viewpoint,
                       lambda q, g: cosine(np.stack([s.body for s in q]), np.stack([s.body for s in g])))


register(PoseSimilarity())
