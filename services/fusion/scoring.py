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

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from services.fusion.components import component_of

_EPS = 1e-3  # isotonic fits reach 0 and 1 exactly; log-odds need them kept off the ends
# Calibrations are flat beyond their end knots (and clipped near 0 and 1), so two candidates can
# share a probability that their raw scores told apart: the raw scores' mean breaks such ties.
RAW_TIE_BREAK = 1e-9


@dataclass(frozen=True)
class ComponentCalibration:
    """Isotonic map of one component's raw score to P(same individual)."""

    x: tuple[float, ...]
    y: tuple[float, ...]
    prior: float  # share of same-individual pairs it was fitted on

    def __call__(self, raw: float) -> float:
        return float(np.interp(raw, self.x, self.y))


@dataclass(frozen=True)
class FusionModel:
    """The fitted fusion: calibrations, combination weights and intercept; `version` names the fit."""

    version: str
    calibrations: Mapping[str, ComponentCalibration]
    weights: Mapping[str, float]
    intercept: float
    aggregation: str = "best"

    @classmethod
    def from_artifact(cls, artifact: dict) -> "FusionModel":
        fusion = artifact["fusion"]
        return cls(
            version=str(artifact.get("version_id") or artifact.get("created_at")),
            calibrations={name: ComponentCalibration(tuple(c["x"]), tuple(c["y"]), float(c["prior"]))
                          for name, c in fusion["calibrations"].items()},
            weights={k: float(v) for k, v in fusion["weights"].items()},
            intercept=float(fusion["intercept"]),
            aggregation=fusion.get("aggregation", "best"),
        )

    def probability(self, calibrated: Mapping[str, float | None]) -> float:
        z = self.intercept
        for name, w in self.weights.items():
            p = calibrated.get(name)
            if p is None:
                p = self.calibrations[name].prior
            z += w * logit(p)
        return sigmoid(z)


def logit(p: float) -> float:
    p = min(max(p, _EPS), 1 - _EPS)
    return math.log(p / (1 - p))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


@dataclass(frozen=True)
class Candidate:
    individual_id: int
    score: float
    components: Mapping[str, float | None] = field(default_factory=dict)  # raw score per component
    calibrated: Mapping[str, float | None] = field(default_factory=dict)  # P(same) per component
    weights: Mapping[str, float] = field(default_factory=dict)  # the weight each component had
    prior: float = 0.0  # temporal boost added to the fused score
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
                "temporal_boost": r(self.prior), "flags": list(self.flags)}


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
    floor = {n: min(per_component[n].values(), default=0.0) for n in names}
    individuals = sorted(set().union(*(per_component[n].keys() for n in names))) if names else []
    out = []
    for ind in individuals:
        raw: dict[str, float | None] = {n: per_component[n].get(ind, floor[n]) for n in names}
        raw.update({n: None for n in no_evidence})
        if model is not None:
            calibrated = {n: (model.calibrations[n](v) if v is not None and n in model.calibrations else None)
                          for n, v in raw.items()}
            score = model.probability(calibrated) + RAW_TIE_BREAK * float(
                np.mean([v for v in raw.values() if v is not None] or [0.0]))
            weights = {n: model.weights.get(n, 0.0) for n in raw}
        else:
            calibrated = {n: None for n in raw}
            weights = {n: default_weight(n, spec_weights) for n in raw}
            present = {n: v for n, v in raw.items() if v is not None}
            total = sum(weights[n] for n in present)
            score = sum(weights[n] * v for n, v in present.items()) / total if total else 0.0
        out.append(Candidate(ind, float(score), raw, calibrated, weights))
    out.sort(key=lambda c: (-c.score, c.individual_id))
    return out


def with_prior(candidate: Candidate, boost: float, flags: tuple[str, ...]) -> Candidate:
    """The candidate with a temporal boost added (capped at 1) and its flags."""
    return Candidate(candidate.individual_id, min(1.0, candidate.score + boost), candidate.components,
                     candidate.calibrated, candidate.weights, boost, tuple(candidate.flags) + tuple(flags))
