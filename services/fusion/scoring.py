"""Candidate scoring: per-component raw scores -> calibrated P(same) -> one fused score per individual.

Raw similarities of different components (and of different body networks) are not on one scale, so
each is first calibrated on labelled pairs (isotonic: monotone, so it never reorders one component's
candidates), then the calibrated scores are combined by weights learned on labelled data (logistic
regression on their log-odds), as wildlife-tools' WildFusion does. Without a fitted model the SPEC's
weighted mean of raw scores applies.

Evidence, three ways:
- a raw score: the component compared the detection with this individual;
- absent from the component's shortlist: scored as the lowest similarity that component returned
  (the individual is at most that close, so absent evidence is weak evidence);
- no evidence at all (the detection has no coat features, say): the component drops out of the
  weighted mean; in the fitted model it contributes its prior (base rate), i.e. nothing either way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from shared.components import Component, component_of, narrowed
from shared.calibrated import ComponentCalibration, FusionModel, logit, sigmoid

__all__ = ["ComponentCalibration", "FusionModel", "logit", "sigmoid"]  # re-exported: their home is shared/

# Calibrations are flat beyond their end knots (and clipped near 0 and 1), so two candidates can
# share a probability that their raw scores told apart: the raw scores' mean breaks such ties.
RAW_TIE_BREAK = 1e-9


def fused_score(raw: Mapping[str, float | np.ndarray], model: "FusionModel | None",
                spec_weights: Mapping[str, float]) -> tuple:
    """(score, calibrated, weights) of raw component scores (scalars, or arrays scored element-wise; NaN:
    no evidence). With a fitted model: its probability, ties broken by the raw scores' mean; without
    one: the SPEC's weighted mean over the components that have evidence. The service scores one
    candidate with it, `deer-reid eval` whole similarity matrices."""
    stack = np.stack([np.asarray(v, dtype=np.float64) for v in raw.values()])
    present = ~np.isnan(stack)
    if model is not None:
        calibrated = model.calibrate(raw)
        weights = {n: model.weights.get(n, 0.0) for n in raw}
        mean = np.where(present.any(0), np.nansum(np.where(present, stack, 0), 0) / np.maximum(present.sum(0), 1), 0)
        return model.probability(calibrated) + RAW_TIE_BREAK * mean, calibrated, weights
    weights = {n: default_weight(n, spec_weights) for n in raw}
    w = np.asarray([weights[n] for n in raw]).reshape((-1,) + (1,) * (stack.ndim - 1))
    total = (present * w).sum(0)
    score = np.where(total > 0, (np.where(present, stack, 0) * w).sum(0) / np.where(total > 0, total, 1), 0.0)
    return score, {n: np.full_like(np.asarray(v, float), np.nan) for n, v in raw.items()}, weights


@dataclass(frozen=True)
class Candidate:
    individual_id: int
    score: float
    components: Mapping[str, float | None] = field(default_factory=dict)  # raw score per component
    calibrated: Mapping[str, float | None] = field(default_factory=dict)  # P(same) per component
    weights: Mapping[str, float] = field(default_factory=dict)  # the weight each component had
    temporal_boost: float = 0.0  # added to the fused score by the temporal priors (not a base rate)
    flags: tuple[str, ...] = ()

    @property
    def body_models(self) -> list[float]:
        return [v for k, v in self.components.items() if component_of(k) == "body" and v is not None]

    def as_dict(self) -> dict:
        def r(v):
            return None if v is None else round(float(v), 5)
        return {"individual_id": self.individual_id, "score": r(self.score),
                "components": {k: {"raw": r(v), "calibrated": r(self.calibrated.get(k)),
                                   "weight": r(self.weights.get(k))} for k, v in self.components.items()},
                "temporal_boost": r(self.temporal_boost), "flags": list(self.flags)}


def default_weight(name: str, spec_weights: Mapping[str, float]) -> float:
    """SPEC weights are per body model name (resnet50 0.4, ...); any other component weighs 1."""
    return spec_weights.get(name.split(":", 1)[-1], spec_weights.get(name, 1.0))


def score_candidates(per_component: Mapping[str, Mapping[int, float]], model: FusionModel | None,
                     spec_weights: Mapping[str, float] | None = None,
                     no_evidence: frozenset[str] = frozenset()) -> list[Candidate]:
    """Identity-level raw scores per component -> candidates with fused scores, best first.

    `per_component[name][individual]` is that component's raw score of the individual; a component
    in `no_evidence` had nothing to compare for this detection.
    """
    spec_weights = spec_weights or {}
    names = [n for n in per_component if n not in no_evidence]
    floor = {n: min((v for v in per_component[n].values() if not np.isnan(v)), default=np.nan) for n in names}
    individuals = sorted(set().union(*(per_component[n].keys() for n in names))) if names else []
    out = []
    for ind in individuals:
        raw: dict[str, float] = {n: per_component[n].get(ind, floor[n]) for n in names}
        raw.update({n: np.nan for n in no_evidence})
        score, calibrated, weights = fused_score(raw, model, spec_weights)
        out.append(Candidate(ind, float(score), _or_none(raw), _or_none(calibrated), weights))
    out.sort(key=lambda c: (-c.score, c.individual_id))
    return out


def shortlist_scores(components: Sequence[Component], query: Any, gallery: Sequence[tuple[int, Any]],
                     costly_shortlist: int | None = None, cascade: int | None = None
                     ) -> dict[str, dict[int, list[float]]]:
    """{component: {individual: its photos' raw scores}} of the query against its shortlisted gallery photos
    ((individual, item) pairs, closest first): one call of each component that `applies` to the query. A
    `costly` one compares only the first `costly_shortlist` photos, and an individual beyond them is absent
    from its shortlist. Costly ones run cheapest first; with a `cascade` of K, each after the first that
    applied compares only the K photos the one before it scored highest (`narrowed`). An individual whose
    photos give no evidence keeps an empty list (fusion's "no evidence" for it)."""
    if not gallery:
        return {}
    out: dict[str, dict[int, list[float]]] = {}
    everything = list(range(len(gallery)))
    positions = everything[:costly_shortlist]  # what the next costly component compares
    ordered = [c for c in components if not c.costly] + sorted((c for c in components if c.costly),
                                                               key=lambda c: c.cost)
    for scorer in ordered:
        if not scorer.applies(query):
            continue
        compared = positions if scorer.costly else everything
        scores = scorer.similarity([query], [gallery[k][1] for k in compared])[0]
        by_individual = out.setdefault(scorer.name, {})
        for k, score in zip(compared, scores):
            photos = by_individual.setdefault(gallery[k][0], [])
            if not np.isnan(score):
                photos.append(float(score))
        if scorer.costly and cascade:
            positions = narrowed(compared, scores, cascade)
    return out


def _or_none(values: Mapping[str, float]) -> dict[str, float | None]:
    """NaN (no evidence) as None, for the recorded result."""
    return {n: None if np.isnan(v) else float(v) for n, v in values.items()}


def with_temporal_boost(candidate: Candidate, boost: float, flags: tuple[str, ...]) -> Candidate:
    """The candidate with a temporal boost added (capped at 1) and its flags."""
    return Candidate(candidate.individual_id, min(1.0, candidate.score + boost), candidate.components,
                     candidate.calibrated, candidate.weights, boost, tuple(candidate.flags) + tuple(flags))
