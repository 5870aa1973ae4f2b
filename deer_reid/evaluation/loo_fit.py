"""The loo protocol's fit and ablation: the fusion fitted on one half of the identities, every figure that
depends on the fit reported on the other half only.

The fit is what `deer-reid eval` installs: per-component calibrations and weights, the identity-level
aggregation, and the thresholds, chosen on the fit half by playing fusion's own decisions over it. The
ablation measures each component alone, the fused whole, and candidates the services do not run yet.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from deer_reid.evaluation import calibration as cal
from deer_reid.evaluation.loo_components import BodyNetworks, Components, Photos, Split
from deer_reid.evaluation.metrics import clustering_report, query_expanded_similarity, retrieval, \
    retrieval_by_sighting
from services.fusion.scoring import FusionModel
from shared.components import AGGREGATIONS, aggregate
from shared.config import Settings


def subset(matrix: np.ndarray, idx: list[int]) -> np.ndarray:
    return matrix[np.ix_(idx, idx)]


def figures(result: dict) -> dict:
    """A retrieval result's figures as the JSON reports them (without its CMC curve)."""
    return {m: result[m] for m in ("queries", "top1", "top5", "mAP", "top1_ci95", "top5_ci95") if m in result}


def all_identity_figures(photos: Photos, body: BodyNetworks, unfitted: np.ndarray) -> dict:
    """Retrieval on every identity of the run (nothing fitted: the SPEC's weighted mean of the components), and
    levers measured the same way: the sighting as the query (labelled as such: the figures are per sighting),
    and αQE re-ranking of a single model."""
    ids, enc = photos.identities, photos.encounters
    main = retrieval(unfitted, ids, enc)
    out = {**figures(main), "cmc": main["cmc"]}
    if photos.viewpoints:
        out["same_viewpoint"] = figures(retrieval(unfitted, ids, enc, photos.viewpoints))
    out["levers"] = {"sighting as the query (per sighting, not per image)": figures(
        retrieval_by_sighting(unfitted, ids, enc))}
    if len(body.names) == 1:
        for k in (1, 2, 3):
            qe = query_expanded_similarity(body.fast, enc, k=k)
            out["levers"][f"query expansion αQE k={k}"] = figures(retrieval(qe, ids, enc))
    return out


@dataclass(frozen=True)
class Fit:
    """One way of fusing, with thresholds chosen on the fit half, and its outcome on the held-out half."""
    chosen: cal.OperatingPoint
    met: bool  # the false-merge target was reachable on the fit half
    held: dict  # the held-out half's open-set outcome (a clustering report)
    points: list[cal.OperatingPoint] | None = None  # the fit half's operating curve
    fusion: dict | None = None  # the artifact's fusion section (None: the SPEC's weighted mean, uncalibrated)
    model: FusionModel | None = None
    fused: np.ndarray | None = None  # the (N, N) image-to-image score fusion gives


@dataclass(frozen=True)
class Fitter:
    """Fits on the fit half's photos and plays fusion's decisions over the held-out half, both on the
    components as each half's gallery scores them."""
    per_component: dict[str, np.ndarray]
    photos: Photos
    split: Split
    held_order: list[int]  # the held-out photos in a seeded arrival order
    spec_weights: dict[str, float]
    exemplar_vectors: np.ndarray  # fusion re-chooses exemplars by the fast body model
    seed: int
    target_false_merge: float
    max_review: float | None

    @classmethod
    def on(cls, components: Components, photos: Photos, split: Split, body: BodyNetworks, settings: Settings, *,
           seed: int, target_false_merge: float, max_review: float | None) -> Fitter:
        held_order = [int(i) for i in np.random.default_rng(seed + 1).permutation(np.asarray(split.held))]
        return cls(components.within_halves, photos, split, held_order, settings.weights(), body.fast, seed,
                   target_false_merge, max_review)

    def fusion(self, components: dict[str, np.ndarray], how: str,
               version_id: str) -> tuple[dict, FusionModel, np.ndarray]:
        """Calibrations and weights fitted on the fit half, the model fusion would run, and its scores."""
        fusion = cal.fit_fusion(components, self.split.fit, self.photos.identities, self.photos.encounters, how)
        model = FusionModel.from_artifact({"fusion": fusion, "version_id": version_id})
        return fusion, model, cal.fused_similarity(components, model)

    def thresholds(self, model: FusionModel | None, how: str,
                   scores: np.ndarray) -> tuple[list[cal.OperatingPoint], cal.OperatingPoint, bool]:
        """The fit half's operating curve over a grid drawn from `scores`, and the point chosen on it."""
        points = cal.operating_curve(self.per_component, self.split.fit, self.photos.identities, self.photos.sexes,
                                     self.seed, cal.threshold_grid(scores), model=model,
                                     spec_weights=self.spec_weights, aggregation=how,
                                     exemplar_vectors=self.exemplar_vectors)
        return points, *cal.choose(points, self.target_false_merge, self.max_review)

    def held_out(self, model: FusionModel | None, point: cal.OperatingPoint, how: str,
                 sightings: list[str] | None = None) -> dict:
        """The open-set outcome of the held-out half at `point`'s thresholds, the photos arriving one by one."""
        placed = cal.simulate(self.per_component, self.held_order, self.photos.sexes,
                              cal.Thresholds(match=point.match, new=point.new), model=model,
                              spec_weights=self.spec_weights, aggregation=how,
                              exemplar_vectors=self.exemplar_vectors, sightings=sightings)
        return clustering_report([placed[i] for i in self.held_order],
                                 [self.photos.identities[i] for i in self.held_order])

    def fit_pairs(self, similarity: np.ndarray) -> np.ndarray:
        """Every pair of the fit half's photos, scored by `similarity` (the threshold grid is drawn from them)."""
        return subset(similarity, self.split.fit)[~np.eye(len(self.split.fit), dtype=bool)]


@dataclass(frozen=True)
class Fitted:
    by_aggregation: dict[str, Fit]
    aggregation: str  # the one chosen on the fit half
    before: Fit  # the SPEC's weighted mean of raw cosines, thresholds fitted the same way
    held_with_sightings: dict  # the chosen fit's held-out outcome, each encounter's images arriving as one sighting
    started: float  # time.monotonic() as the fit began: the report counts its seconds from here

    @property
    def best(self) -> Fit:
        return self.by_aggregation[self.aggregation]


def fit(fitter: Fitter, unfitted: np.ndarray, before_aggregation: str) -> Fitted:
    """Before: the SPEC's weighted mean, thresholds fitted. After: calibrated per component and fused by fitted
    weights, for each identity-level aggregation; the aggregation is chosen on the fit half too."""
    started = time.monotonic()
    _, before, before_met = fitter.thresholds(None, before_aggregation, fitter.fit_pairs(unfitted))
    before_fit = Fit(before, before_met, fitter.held_out(None, before, before_aggregation))
    fits = {}
    for how in AGGREGATIONS:
        fusion, model, fused = fitter.fusion(fitter.per_component, how, f"eval-{how}")
        points, chosen, met = fitter.thresholds(model, how, fitter.fit_pairs(fused))
        fits[how] = Fit(chosen, met, fitter.held_out(model, chosen, how), points, fusion, model, fused)
    how = max(AGGREGATIONS, key=lambda a: (fits[a].met, fits[a].chosen.report["bcubed_f1"]))
    best = fits[how]
    # the sighting protocol (labelled as such): each encounter's images arrive as one sighting
    with_sightings = fitter.held_out(best.model, best.chosen, how, fitter.photos.encounters)
    return Fitted(fits, how, before_fit, with_sightings, started)


class Ablation(NamedTuple):
    """Retrieval on the held-out half (the fit saw the other): by row label, CMC curves included."""
    rows: dict[str, dict]
    same_viewpoint: dict[str, dict] | None
    candidate_weights: dict[str, dict]  # by coat pattern variant the service does not run
    cascade: dict | None = None  # the coat cascade's decisions against every keypoint pair's


def snapshot_decisions(similarity: np.ndarray, queries: list[int], identities: list, encounters: list,
                       thresholds: cal.Thresholds, how: str) -> list[tuple[str, object, int]]:
    """Each query's decision against every other encounter of `queries` as the gallery (all of them known:
    a leave-one-encounter-out snapshot, not the sequential simulation), as fusion takes it: the individual
    whose photos score best (aggregated `how`), matched, sent to review, or a new one by the thresholds.
    (state, individual, the closest photo), the individual None for a new one."""
    out = []
    for q in queries:
        others = [j for j in queries if encounters[j] != encounters[q]]
        by_identity: dict = {}
        for j in others:
            by_identity.setdefault(identities[j], []).append(float(similarity[q, j]))
        scored = {ind: aggregate(v, how) for ind, v in by_identity.items()}
        best = max(scored, key=lambda ind: (scored[ind], str(ind)), default=None)
        score = scored.get(best, -np.inf)
        state = "match" if score >= thresholds.match else "new" if score < thresholds.new else "review"
        closest = others[int(np.argmax(similarity[q, others]))] if others else -1
        out.append((state, None if state == "new" else best, closest))
    return out


def cascade_agreement(components: Components, fitter: Fitter, fitted: Fitted) -> tuple[dict, np.ndarray] | None:
    """The coat cascade (`coat_cascade_shortlist`) against every keypoint pair of the pattern shortlist, with
    the fitted fusion and thresholds: the held-out queries whose decision (`snapshot_decisions`) and whose
    first candidate photo are the same both ways, and the uncascaded fused scores (None: no cascade)."""
    coat = components.coat
    if coat is None or coat.uncascaded is None:
        return None
    best = fitted.best
    uncascaded = cal.fused_similarity({**fitter.per_component, **coat.uncascaded}, best.model)
    held, ids, enc = fitter.split.held, fitter.photos.identities, fitter.photos.encounters
    thresholds = cal.Thresholds(match=best.chosen.match, new=best.chosen.new)
    cascaded = snapshot_decisions(best.fused, held, ids, enc, thresholds, fitted.aggregation)
    every_pair = snapshot_decisions(uncascaded, held, ids, enc, thresholds, fitted.aggregation)
    same = [a[:2] == b[:2] for a, b in zip(cascaded, every_pair)]
    same_first = [a[2] == b[2] for a, b in zip(cascaded, every_pair)]
    return {"cascade_shortlist": coat.notes["cascade_shortlist"], "pattern_shortlist": coat.notes["pattern_shortlist"],
            "queries": len(held), "same_decision": round(float(np.mean(same)), 4),
            "same_first_photo": round(float(np.mean(same_first)), 4),
            "decisions": {"cascade": dict(Counter(d[0] for d in cascaded)),
                          "every_pair": dict(Counter(d[0] for d in every_pair))},
            "decided_as": "each held-out photo against every other encounter of the held-out half, the "
                          "fitted fusion and thresholds"}, uncascaded


def ablate(components: Components, fitter: Fitter, fitted: Fitted, unfitted: np.ndarray,
           body: BodyNetworks) -> Ablation:
    """Each component alone, each other way of scoring alone, the SPEC's weighted mean of an ensemble, the
    fitted fusion, and candidates: each other coat pattern matcher as a component of its own."""
    held = fitter.split.held
    held_ids = [fitter.photos.identities[i] for i in held]
    held_enc = [fitter.photos.encounters[i] for i in held]

    def on_held(similarity: np.ndarray, views: list[str] | None = None) -> dict:
        return retrieval(subset(similarity, held), held_ids, held_enc, views)

    how = fitted.aggregation
    fused_row = f"all fused through calibration ({how})"
    antler_variants = components.antler.variants if components.antler else {}
    coat = components.coat
    pattern_variants = coat.pattern_variants if coat else {}
    alone = {f"{c} alone": m for c, m in fitter.per_component.items()}
    rows = {k: on_held(m) for k, m in alone.items()}
    rows.update({v: on_held(m) for v, m in antler_variants.items()})
    rows.update({f"coat:pattern alone, {v} (shortlist {coat.notes['pattern_shortlist']} by body)": on_held(m)
                 for v, m in pattern_variants.items()})  # the keypoint matchers' own, DEER_COAT_PATTERN_SHORTLIST
    if len(body.names) > 1:
        rows["body ensemble, SPEC weighted mean (uncalibrated)"] = on_held(unfitted)
    rows[fused_row] = on_held(fitted.best.fused)
    # A candidate the services do not run yet: each other coat pattern matcher as a component of its own,
    # calibrated and weighted like the rest (fitted on the fit half, the same aggregation).
    candidates, candidate_weights = {}, {}
    for v, m in pattern_variants.items():
        if v not in coat.service:
            fusion, _, scores = fitter.fusion({**fitter.per_component, f"coat:pattern-{v}": m}, how, f"eval-{v}")
            candidates[f"all fused + {v} as a second pattern component (candidate, not in the service; {how})"] = \
                scores
            candidate_weights[v] = fusion["weights"]
    rows.update({k: on_held(m) for k, m in candidates.items()})
    agreement = cascade_agreement(components, fitter, fitted)
    if agreement is not None:
        rows[f"all fused, every keypoint pair of the {coat.notes['pattern_shortlist']} (no cascade; {how})"] = \
            on_held(agreement[1])
    held_views = [fitter.photos.viewpoints[i] for i in held] if fitter.photos.viewpoints else None
    same_viewpoint = None
    if held_views:
        # (the antler variants too are labelled `coat:pattern alone` here, as earlier reports printed them)
        same_viewpoint = {k: on_held(m, held_views) for k, m in [
            *alone.items(), *((f"coat:pattern alone, {v}", m) for v, m in {**antler_variants,
                                                                            **pattern_variants}.items()),
            (fused_row, fitted.best.fused), *candidates.items()]}
    return Ablation(rows, same_viewpoint, candidate_weights, agreement[0] if agreement is not None else None)
