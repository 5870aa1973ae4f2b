"""The pose-aware component: the detection against a candidate's exemplars of the same viewpoint only.

A left flank and a right flank of one striped animal are different pictures; the best body similarity
over every exemplar mixes the two. `pose` is the body similarity (the fast model's) to the candidate's
exemplars seen from the detection's own viewpoint, and "no evidence" when the detection's viewpoint is
unknown or the candidate has no exemplar from it (it is calibrated and fused like any component, so its
weight is what labelled data says it is worth).

An item is a `Seen`: a photo's viewpoint and its body embedding. A detection's viewpoint: pose's where
pose ran and knew; else the coat service's facing of a profile.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from shared.components.base import Component, cosine, grouped, register
from shared.identity import VIEWPOINT_SQL
from shared.viewpoints import LEFT, RIGHT, UNKNOWN

__all__ = ["VIEWPOINT_SQL"]  # the rule in SQL lives beside the identity mechanics that read it

POSE = "pose"
FACING = {"left": LEFT, "right": RIGHT}


class Seen(NamedTuple):
    viewpoint: str | None
    body: np.ndarray | None


def viewpoint_of(result: dict | None) -> str | None:
    """A decided detection's viewpoint from its stored result (None: not known)."""
    result = result or {}
    pose = (result.get("pose") or {}).get("viewpoint")
    if pose and pose != UNKNOWN:
        return str(pose)
    return FACING.get((result.get("coat") or {}).get("facing"))


def known(view: str | None) -> bool:
    return view is not None and view != UNKNOWN


class PoseSimilarity(Component):
    """The body cosine (`shared.components.body`) of photos seen from one known viewpoint, NaN across them."""

    name, reads = POSE, POSE

    def similarity(self, queries: Sequence[Seen], gallery: Sequence[Seen]) -> np.ndarray:
        def viewpoint(seen: Seen):
            return (seen.viewpoint, len(seen.body)) if known(seen.viewpoint) and seen.body is not None else None

        return grouped(queries, gallery, viewpoint,
                       lambda q, g: cosine(np.stack([s.body for s in q]), np.stack([s.body for s in g])))


register(PoseSimilarity())
