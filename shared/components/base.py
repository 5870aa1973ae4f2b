"""What every component shares: one shape, one registry, and identity-level aggregation over exemplars.

A component (wildlife-tools' shape: extractor -> similarity -> calibration -> fusion) compares one kind of
features: it names the extractor whose output it reads (`reads`: the `Features.component` of the events,
"body", "coat", "pose" or "antler") and turns Q query items and G gallery items into a (Q, G) matrix of raw
similarities, NaN where a pair gives no evidence. What an item is belongs to the component (an embedding, a
coat view, an antler sighting; its module says). The fusion service calls it with the detection's frames
against its shortlist, `deer-reid eval` with every photo against every photo: one scorer for both.

Components register by their scored name (`register`); a family of names (`body:<model>`, one per body
network) registers a factory (`register_family`). Calibration and the fitted fusion take any name, so a new
matcher of an existing extractor's features is one module and one `register` call.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

import numpy as np

# How an individual's exemplar similarities become one score for that individual. "best" rewards the
# single closest photo; "mean2" (mean of the best two) asks a second photo to agree, which damps one
# lucky look-alike. `deer-reid eval` measures both; the artifact records the one fitted with.
AGGREGATIONS = ("best", "mean2")


class Component(ABC):
    """One matcher. Subclasses set `name` and `reads` and implement `similarity`."""

    name: str  # the scored name: the key of calibrations, weights and the result document
    reads: str  # the extractor whose features it compares
    costly = False  # matched pair by pair at a cost that calls for a shortlist and all the cores
    cost = 0.0  # a costly one's milliseconds a pair (measured): the cheaper ones go first in a cascade

    def applies(self, query: Any) -> bool:
        """Whether the component scores this query at all. One that does not is left out of the detection's
        candidates (not even "no evidence"): a pattern matcher whose pattern the query does not carry."""
        return True

    @abstractmethod
    def similarity(self, queries: Sequence[Any], gallery: Sequence[Any]) -> np.ndarray:
        """(len(queries), len(gallery)) raw similarities, NaN where a pair gives no evidence."""

    def __repr__(self) -> str:
        return f"<component {self.name} reads {self.reads}>"


_REGISTERED: dict[str, Component] = {}
_FAMILIES: dict[str, Callable[[str], Component]] = {}


def register(component: Component) -> Component:
    """Make `component` known by its name (a second registration of one name replaces the first)."""
    _REGISTERED[component.name] = component
    return component


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def register_family(family: str, factory: Callable[[str], Component]) -> None:
    """Names `family:<anything>` are made by `factory(<anything>)` on first use (one per body network)."""
    _FAMILIES[family] = factory


def component(name: str) -> Component:
    """The registered component of a scored name; KeyError naming the known ones when there is none."""
    if name not in _REGISTERED:
        family, _, member = name.partition(":")
        if family not in _FAMILIES or not member:
            raise KeyError(f"no component {name!r}; registered: {sorted(_REGISTERED)}, families: {sorted(_FAMILIES)}")
        _REGISTERED[name] = _FAMILIES[family](member)
    return _REGISTERED[name]


def reading(extractor: str) -> list[Component]:
    """The registered components that compare `extractor`'s features, in registration order."""
    return [c for c in _REGISTERED.values() if c.reads == extractor]


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


def narrowed(positions: Sequence[int], scores: Sequence[float], keep: int) -> list[int]:
    """The cascade's step: of the gallery `positions` a cheaper matcher scored (`scores`, NaN: no evidence),
    the `keep` it scored highest (ties and NaN in the given order: closest by body first), in the given
    order. The costlier matcher verifies only those."""
    values = np.where(np.isnan(np.asarray(scores, dtype=np.float64)), -np.inf, scores)
    best = np.argsort(-values, kind="stable")[:keep]
    return [positions[k] for k in sorted(best)]


def component_of(name: str) -> str:
    """The component family of a scored name: 'body:efficientnet_lite0' -> 'body'."""
    return name.split(":", 1)[0]


def best_over_queries(similarities: np.ndarray) -> np.ndarray:
    """Each gallery item's best score over the queries (a sighting's frames are one query), NaN where no
    query scored it."""
    if similarities.shape[0] == 0:
        return np.full(similarities.shape[1], np.nan)
    best = np.where(np.isnan(similarities), -np.inf, similarities).max(axis=0)
    return np.where(np.isneginf(best), np.nan, best)


def cosine(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q, G) cosines of two stacks of vectors; NaN where either vector is all zeros."""
    q = np.asarray(queries, dtype=np.float64)
    g = np.asarray(gallery, dtype=np.float64)
    norms = np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(g, axis=1)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (q @ g.T) / np.where(norms > 0, norms, 1.0), np.nan)


def by_group(items: Sequence[Any], key: Callable[[Any], Any]) -> dict[Any, list[int]]:
    """Indexes of `items` grouped by `key(item)`, None keys left out (items that cannot be compared)."""
    groups: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        k = key(item)
        if k is not None:
            groups.setdefault(k, []).append(i)
    return groups


def grouped(queries: Sequence[Any], gallery: Sequence[Any], key: Callable[[Any], Any],
            block: Callable[[list, list], np.ndarray], gallery_key: Callable[[Any], Any] | None = None) -> np.ndarray:
    """A (Q, G) matrix of NaN, filled by `block(query items, gallery items)` for each group of items sharing
    a `key` (a feature version, a season; `gallery_key` for the gallery's items where it differs): items of
    different keys never meet."""
    out = np.full((len(queries), len(gallery)), np.nan)
    in_gallery = by_group(gallery, gallery_key or key)
    for k, qi in by_group(queries, key).items():
        gi = in_gallery.get(k)
        if gi:
            out[np.ix_(qi, gi)] = block([queries[i] for i in qi], [gallery[j] for j in gi])
    return out
