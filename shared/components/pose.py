"""The pose-aware component: the detection against a candidate's exemplars of the same viewpoint only.

A left flank and a right flank of one striped animal are different pictures; the best body similarity
over every exemplar mixes the two. `pose` is the best body similarity among the candidate's exemplars
seen from the detection's own viewpoint, and "no evidence" when the detection's viewpoint is unknown or
the candidate has no exemplar from it (it is calibrated and fused like any component, so its weight is
what labelled data says it is worth).

A detection's viewpoint: pose's where pose ran and knew; else the coat service's facing of a profile.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from shared.identity import VIEWPOINT_SQL
from shared.viewpoints import LEFT, RIGHT, UNKNOWN

__all__ = ["VIEWPOINT_SQL"]  # the rule in SQL lives beside the identity mechanics that read it

POSE = "pose"
FACING = {"left": LEFT, "right": RIGHT}

def viewpoint_of(result: dict | None) -> str | None:
    """A decided detection's viewpoint from its stored result (None: not known)."""
    result = result or {}
    pose = (result.get("pose") or {}).get("viewpoint")
    if pose and pose != UNKNOWN:
        return str(pose)
    return FACING.get((result.get("coat") or {}).get("facing"))


def known(view: str | None) -> bool:
    return view is not None and view != UNKNOWN


def pose_similarity(query_view: str | None, exemplar_view: str | None, body_similarity: float) -> float | None:
    """The body similarity when both are seen from the same known viewpoint, else None (no evidence)."""
    return body_similarity if known(query_view) and query_view == exemplar_view else None


def pose_matrix(body: np.ndarray, views: Sequence[str | None]) -> np.ndarray:
    """All pairwise `pose_similarity` of photos given their body similarity matrix (NaN: no evidence)."""
    v = np.asarray([x if known(x) else "" for x in views], dtype=object)
    same = (v[:, None] == v[None, :]) & (v[:, None] != "")
    return np.where(same, body, np.nan)
