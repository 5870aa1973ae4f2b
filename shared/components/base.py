"""What every component shares: its name's family, and identity-level aggregation over exemplars."""
from __future__ import annotations

from typing import Sequence

# How an individual's exemplar similarities become one score for that individual. "best" rewards the
# single closest photo; "mean2" (mean of the best two) asks a second photo to agree, which damps one
# lucky look-alike. `deer-reid eval` measures both; the artifact records the one fitted with.
AGGREGATIONS = ("best", "mean2")


def aggregate(similarities: Sequence[float], how: str = "best") -> float | None:
    """One individual's score from its exemplars' similarities (None when it has none)."""
    values = sorted((s for s in similarities if s is not None), reverse=True)
    if not values:
        return None
    if how == "best":
        return values[0]
    if how == "mean2":
        return sum(values[:2]) / min(2, len(values))
    raise ValueError(f"unknown aggregation {how!r}; one of {AGGREGATIONS}")


def component_of(name: str) -> str:
    """The component family of a scored name: 'body:efficientnet_lite0' -> 'body'."""
    return name.split(":", 1)[0]
