"""People's answers teach the machine: a property's own calibration, fitted on its answered pairs (pure).

Every `same` or `different` answer is a labelled pair of the property's own animals, with each component's
raw score stored on its edge. Once there are enough of both kinds, the calibration is fitted again on them
(in one of two forms, below: by default a rescaling of the fused log-odds in force), and the fit replaces
the one in force only when it predicts the answers better out of sample: the answers are dealt into folds,
each fold scored by a fit on the others, and the log-loss of each answer compared with the one in force on
the same answer. The refit must win by more than the noise of that
comparison (the mean gain above twice its standard error): a refit that won by 0.3% on 208 answers was
installed on the stack, and its isotonic fit, which had seen no `same` below a body score of 0.85, told
the census that no pair below it could be one animal, so the census stopped asking after 257 answers.
For the same reason no refitted component calibration is more extreme than the answers can tell: with n
answers, none below 1/(n+2) or above (n+1)/(n+2) (Laplace's rule of succession). The report says by how much the
refit helped (reliability before and after).

The pairs people answer were chosen because the machine was unsure of them, so they are not a random
sample of the property's pairs; the out-of-sample comparison is on that same kind of pair, which is the
kind whose probabilities decide what the census does. The clustering, though, also sums the many pairs
nobody asked about, and what a refit may change decides what it does to them. Two forms (`RefitRule.form`):

- `scale` (the default): a scale and a shift of the fused log-odds in force (Platt's two parameters), so the
  order of the property's pairs stays the fusion's and only how sure it is moves. The census chooses its
  questions by that fused probability, so the answered pairs are a sample selected on the very score being
  recalibrated: P(same | fused score) is what such a sample estimates without bias.
- `full`: every component's isotonic calibration and the fusion weights fitted again. Each component's
  calibration is then fitted on pairs selected on the sum of all of them: the body pairs that were asked
  despite a low body score were asked because their coat matched, so the body's refitted calibration came out
  flat (0.23-0.25 over its range on nyala-train's held-out half), and every unasked pair of different
  animals with a low body score gained P(same) (summed over them, 113 -> 560). The clustering adds those up
  into false merges: after 1,000 answers precision 0.922 and 0.966 on the two halves offline, 0.874 on the
  stack, against 0.974-1.000 without a refit, for no F1 on average (README).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from shared.calibrated import FusionModel, fit_components, logit, sigmoid

FORMS = ("scale", "full")


@dataclass(frozen=True)
class RefitRule:
    """When a property's calibration is refitted: every `every` new answered pairs, from `min_answers` on with
    `min_each` of each kind, and in which `form` (the census job's rule, which the offline census follows)."""

    every: int
    min_answers: int
    min_each: int
    form: str = "scale"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"refit form {self.form!r}: one of {FORMS}")

    @classmethod
    def of(cls, settings) -> "RefitRule":
        return cls(settings.census_refit_every, settings.census_refit_min_answers, settings.census_refit_min_each,
                   settings.census_refit_form)

    def due(self, answered: int, last_tried: int) -> bool:
        """Whether `answered` pairs call for a refit when the last one was tried at `last_tried`."""
        return answered > 0 and answered >= last_tried + self.every


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
    return {"pairs": int(y.size), "log_loss": round(float(log_losses(p, same).mean()), 4),
            "brier": round(float(((p - y) ** 2).mean()), 4), "ece": round(float(ece), 4)}


def _probability(fusion: Mapping, raw: Mapping[str, np.ndarray]) -> np.ndarray:
    model = FusionModel.from_artifact({"fusion": dict(fusion), "version_id": "refit"})
    return np.asarray(model.probability(model.calibrate(dict(raw))), dtype=np.float64)


def refit_from_answers(raw: Mapping[str, np.ndarray], same: np.ndarray, current: Mapping | None, rule: RefitRule, *,
                       folds: int = 5, seed: int = 0) -> dict:
    """A property's fusion section fitted on its answers, with the evidence for (or against) using it.

    `raw[name]`: that component's raw score of each answered pair (NaN: no evidence); `same`: each answer;
    `current`: the fusion section in force (None: none; then there is nothing to rescale and the `full` form
    is fitted); `rule`: how many answers a refit needs and its form (the module's docstring). Returns
    {accepted, why, form, answers, same, before, after, fusion}: `fusion` is the refit on all the answers
    (when accepted), `before`/`after` the reliability of the current fit and of the out-of-fold refits on the
    same answers."""
    form = rule.form if current is not None else "full"
    min_answers, min_each = rule.min_answers, rule.min_each
    same = np.asarray(same, dtype=bool)
    raw = {n: np.asarray(v, dtype=np.float64) for n, v in raw.items()}
    out = {"accepted": False, "form": form, "answers": int(same.size), "same": int(same.sum()), "before": None,
           "after": None, "fusion": None}
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
        elif form == "scale":
            a, c = _rescaling(before[train], same[train])
            held[test] = sigmoid(a * logit(before[test]) + c)
        else:
            cal, weights, intercept = _fit({n: raw[n][train] for n in names}, same[train])
            held[test] = _probability({"calibrations": cal, "weights": weights, "intercept": intercept},
                                      {n: raw[n][test] for n in names})
    out["before"], out["after"] = reliability(before, same), reliability(held, same)
    if form == "scale":
        a, c = _rescaling(before, same)
        out["fusion"] = {**current, "weights": {n: round(a * float(w), 6) for n, w in current["weights"].items()},
                         "intercept": round(a * float(current["intercept"]) + c, 6),
                         "rescaled": {"scale": round(a, 6), "shift": round(c, 6)}}
    else:
        cal, weights, intercept = _fit({n: raw[n] for n in names}, same)
        out["fusion"] = {"calibrations": cal, "weights": weights, "intercept": intercept,
                         "aggregation": (current or {}).get("aggregation", "best")}
    out["fusion"].update({"pairs": int(same.size), "same_pairs": int(same.sum()), "fitted_on": "answers",
                          "form": form})
    gain, noise = clear_gain(log_losses(before, same), log_losses(held, same))
    out["accepted"] = gain > noise
    out["gain"] = {"log_loss": round(gain, 5), "noise": round(noise, 5)}
    out["why"] = ("out-of-fold log-loss {after} against {before} in force (gain {gain:.4f}, twice its standard "
                  "error {noise:.4f}): {verdict}".format(
                      after=out["after"]["log_loss"], before=out["before"]["log_loss"], gain=gain, noise=noise,
                      verdict="refit used" if out["accepted"] else "the fit in force stays"))
    return out


def _rescaling(p: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(a, c) such that sigmoid(a * logit(p) + c) fits the answers (logistic regression on the log-odds in
    force). A negative scale would reverse the fusion's order of the pairs: the answers cannot teach that
    with a scale, so it is held at 0 (no information), which the out-of-sample comparison then turns down."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0).fit(logit(np.asarray(p, dtype=np.float64))[:, None], same)
    a = max(float(lr.coef_[0, 0]), 0.0)
    if a == 0.0:
        return 0.0, float(logit(same.mean()))
    return a, float(lr.intercept_[0])


def _fit(raw: Mapping[str, np.ndarray], same: np.ndarray) -> tuple[dict, dict, float]:
    """`fit_components`, each calibration kept within Laplace's bounds for this many answers."""
    calibrations, weights, intercept = fit_components(raw, same)
    low = 1.0 / (same.size + 2)
    for c in calibrations.values():
        c["y"] = [round(min(max(y, low), 1 - low), 6) for y in c["y"]]
    return calibrations, weights, intercept


def log_losses(p: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Each answer's log-loss under probabilities `p` (kept off 0 and 1 as `reliability` keeps them)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-3, 1 - 1e-3)
    return np.where(np.asarray(same, dtype=bool), -np.log(p), -np.log(1 - p))


def clear_gain(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """(mean gain of `after` over `before`, per answer, and twice its standard error): a gain counts only
    above that noise."""
    d = np.asarray(before, dtype=np.float64) - np.asarray(after, dtype=np.float64)
    if d.size < 2:
        return float(d.mean()) if d.size else 0.0, float("inf")
    return float(d.mean()), float(2 * d.std(ddof=1) / np.sqrt(d.size))


def labelled_pairs(snapshot: dict, index: dict, latest: list) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw component scores of every pair a person answered `same` or `different` (for the refit)."""
    by_pair = {}
    for r in snapshot["edges"]:
        i, j = index.get(r["a"]), index.get(r["b"])
        if i is not None and j is not None:
            by_pair[(min(i, j), max(i, j))] = r["components"]
    rows = [(by_pair[key], answer == "same") for key, answer in latest
            if answer in ("same", "different") and key in by_pair]
    names = sorted({n for comps, _ in rows for n, v in comps.items() if v is not None})
    raw = {n: np.asarray([np.nan if comps.get(n) is None else float(comps[n]) for comps, _ in rows]) for n in names}
    return raw, np.asarray([s for _, s in rows], dtype=bool)
