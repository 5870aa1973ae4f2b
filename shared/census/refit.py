"""People's answers teach the machine: a property's own calibration, fitted on its answered pairs (pure).

Every `same` or `different` answer is a labelled pair of the property's own animals, with each component's
raw score stored on its edge. Once there are enough of both kinds, the components' isotonic calibrations
and the fusion weights are fitted again on them (the same fitting as `deer-reid eval`, `shared.calibrated`),
and the fit replaces the one in force only when it predicts the answers better out of sample: the
answers are dealt into folds, each fold scored by a fit on the others, and the pooled log-loss compared
with the one in force on the same answers. So a refit never makes the census worse on the evidence it
has, and the report says by how much it helped (reliability before and after).

The pairs people answer were chosen because the machine was unsure of them, so they are not a random
sample of the property's pairs; the out-of-sample comparison is on that same kind of pair, which is the
kind whose probabilities decide what the census does.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from shared.calibrated import FusionModel, fit_components


def reliability(p: np.ndarray, same: np.ndarray, bins: int = 10) -> dict:
    """Log-loss, Brier score and expected calibration error of probabilities `p` against the answers."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-3, 1 - 1e-3)
    y = np.asarray(same, dtype=np.float64)
    if not y.size:
        return {"pairs": 0, "log_loss": None, "brier": None, "ece": None}
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    ece = sum(abs(p[which == b].mean() - y[which == b].mean()) * (which == b).mean() for b in range(bins)
              if (which == b).any())
    return {"pairs": int(y.size), "log_loss": round(float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()), 4),
            "brier": round(float(((p - y) ** 2).mean()), 4), "ece": round(float(ece), 4)}


def _probability(fusion: Mapping, raw: Mapping[str, np.ndarray]) -> np.ndarray:
    model = FusionModel.from_artifact({"fusion": dict(fusion), "version_id": "refit"})
    return np.asarray(model.probability(model.calibrate(dict(raw))), dtype=np.float64)


def refit_from_answers(raw: Mapping[str, np.ndarray], same: np.ndarray, current: Mapping | None, *,
                       min_answers: int, min_each: int, folds: int = 5, seed: int = 0) -> dict:
    """A property's fusion section fitted on its answers, with the evidence for (or against) using it.

    `raw[name]`: that component's raw score of each answered pair (NaN: no evidence); `same`: each answer;
    `current`: the fusion section in force (None: none). Returns {accepted, why, answers, same, before,
    after, fusion}: `fusion` is the refit on all the answers (when accepted), `before`/`after` the
    reliability of the current fit and of the out-of-fold refits on the same answers."""
    same = np.asarray(same, dtype=bool)
    raw = {n: np.asarray(v, dtype=np.float64) for n, v in raw.items()}
    out = {"accepted": False, "answers": int(same.size), "same": int(same.sum()), "before": None, "after": None,
           "fusion": None}
    if same.size < min_answers or same.sum() < min_each or (~same).sum() < min_each:
        out["why"] = (f"{same.size} answers ({int(same.sum())} same, {int((~same).sum())} different): a refit needs "
                      f"{min_answers}, with {min_each} of each")
        return out
    names = [n for n in raw if np.isfinite(raw[n]).any()]
    before = _probability(current, {n: raw[n] for n in current["calibrations"] if n in raw}) \
        if current is not None else np.full(same.size, same.mean())
    order = np.random.default_rng(seed).permutation(same.size)
    held = np.empty(same.size, dtype=np.float64)
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        if same[train].all() or not same[train].any():
            held[test] = same[train].mean()
            continue
        cal, weights, intercept = fit_components({n: raw[n][train] for n in names}, same[train])
        held[test] = _probability({"calibrations": cal, "weights": weights, "intercept": intercept},
                                  {n: raw[n][test] for n in names})
    out["before"], out["after"] = reliability(before, same), reliability(held, same)
    cal, weights, intercept = fit_components({n: raw[n] for n in names}, same)
    out["fusion"] = {"calibrations": cal, "weights": weights, "intercept": intercept,
                     "aggregation": (current or {}).get("aggregation", "best"), "pairs": int(same.size),
                     "same_pairs": int(same.sum()), "fitted_on": "answers"}
    out["accepted"] = out["after"]["log_loss"] < out["before"]["log_loss"]
    out["why"] = ("out-of-fold log-loss {after} against {before} in force: {verdict}".format(
        after=out["after"]["log_loss"], before=out["before"]["log_loss"],
        verdict="refit used" if out["accepted"] else "the fit in force stays"))
    return out
