"""The calibrated side of fusion, shared by the fusion service, the census job and eval: each component's
raw score mapped to P(same individual) by an isotonic calibration, the calibrated scores combined by
logistic-regression weights on their log-odds, and the fitting of both from labelled pairs.

It lives in `shared/` because more than one service reads it: fusion decides with it, and the census
job turns the identity graph's stored raw scores into log-odds with the same model (and refits it per
property from people's answers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

_EPS = 1e-3  # isotonic fits reach 0 and 1 exactly; log-odds need them kept off the ends
@dataclass(frozen=True)
class ComponentCalibration:
    """Isotonic map of one component's raw score to P(same individual)."""

    x: tuple[float, ...]
    y: tuple[float, ...]
    prior: float  # share of same-individual pairs it was fitted on

    @classmethod
    def from_dict(cls, c: dict) -> "ComponentCalibration":
        return cls(tuple(c["x"]), tuple(c["y"]), float(c["prior"]))

    def __call__(self, raw):
        """P(same) of a raw score, or of an array of them (NaN, no evidence, stays NaN)."""
        return np.where(np.isnan(raw), np.nan, np.interp(raw, self.x, self.y))


@dataclass(frozen=True)
class FusionModel:
    """The fitted fusion: calibrations, combination weights and intercept; `version` names the fit."""

    version: str
    calibrations: Mapping[str, ComponentCalibration]
    weights: Mapping[str, float]
    intercept: float
    aggregation: str = "best"
    coat_version: str | None = None  # the coat extractor its coat calibrations were fitted on
    antler_version: str | None = None  # the antler fingerprint its antler calibration was fitted on

    @classmethod
    def from_artifact(cls, artifact: dict) -> "FusionModel":
        fusion = artifact["fusion"]
        return cls(
            coat_version=fusion.get("coat_version"),
            antler_version=fusion.get("antler_version"),
            version=str(artifact.get("version_id") or artifact.get("created_at")),
            calibrations={name: ComponentCalibration.from_dict(c) for name, c in fusion["calibrations"].items()},
            weights={k: float(v) for k, v in fusion["weights"].items()},
            intercept=float(fusion["intercept"]),
            aggregation=fusion.get("aggregation", "best"),
        )

    def calibrate(self, raw: Mapping[str, float | np.ndarray]) -> dict[str, float | np.ndarray]:
        """Each component's P(same) (NaN where it had no evidence, or has no calibration)."""
        return {n: self.calibrations[n](v) if n in self.calibrations else np.full_like(np.asarray(v, float), np.nan)
                for n, v in raw.items()}

    def probability(self, calibrated: Mapping[str, float | np.ndarray]):
        """The fused P(same); a component with no evidence (missing or NaN) contributes its prior."""
        z = self.intercept
        for name, w in self.weights.items():
            p = np.asarray(calibrated.get(name, np.nan), dtype=np.float64)
            z = z + w * logit(np.where(np.isnan(p), self.calibrations[name].prior, p))
        return sigmoid(z)


def logit(p):
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=np.float64)))




def fit_isotonic(scores: np.ndarray, same: np.ndarray) -> dict:
    """A component's isotonic calibration {x, y, prior} on labelled raw scores (NaN: no evidence)."""
    from sklearn.isotonic import IsotonicRegression

    ok = np.isfinite(scores)
    if not ok.any():  # the component never had evidence here (a small fit set): flat, at the base rate
        prior = round(float(same.mean()), 6) if same.size else 0.0
        return {"x": [0.0, 1.0], "y": [prior, prior], "prior": prior}
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0, increasing=True).fit(scores[ok], same[ok])
    return {"x": [round(float(v), 6) for v in iso.X_thresholds_], "y": [round(float(v), 6) for v in iso.y_thresholds_],
            "prior": round(float(same[ok].mean()), 6)}


def fit_components(raw: Mapping[str, np.ndarray], same: np.ndarray) -> tuple[dict, dict, float]:
    """(calibrations, weights, intercept) from labelled pairs: `raw[name]` holds that component's raw score
    of every pair (NaN: no evidence), aligned across components, `same` whether each pair is one animal.
    A single component gets weight 1 and intercept 0 (its calibration alone is the probability)."""
    from sklearn.linear_model import LogisticRegression

    names = list(raw)
    calibrations = {n: fit_isotonic(raw[n], same) for n in names}
    if len(names) == 1:
        return calibrations, {names[0]: 1.0}, 0.0
    x = np.column_stack([logit(np.where(np.isnan(p := ComponentCalibration.from_dict(calibrations[n])(raw[n])),
                                        calibrations[n]["prior"], p)) for n in names])
    lr = LogisticRegression(C=1.0, max_iter=1000).fit(x, same)
    return calibrations, {n: round(float(w), 6) for n, w in zip(names, lr.coef_[0])}, round(float(lr.intercept_[0]), 6)
