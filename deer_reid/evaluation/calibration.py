"""From labelled data to the fitted fusion: per-component calibration, combination weights, thresholds.

Everything here reuses fusion's own pure code (the components' identity-level aggregation,
`score_candidates`, `decide`, exemplar choice, sex compatibility), so the simulation decides as the
service does:
- `component_pairs`: for each image of the fitting part and each identity, that component's
  identity-level raw score (never counting the image's own encounter: the scene, not the animal);
- `fit_fusion`: an isotonic calibration per component on those pairs, then a logistic regression on
  the calibrated log-odds (the combination weights);
- `simulate` + `operating_curve` + `choose`: a sequential open-set ingestion over an in-memory
  gallery, for a grid of thresholds; the best B-cubed F1 within the false-merge target is chosen.
Fitted on one part of the identities, reported on the other.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from deer_reid.evaluation.metrics import clustering_report
from shared import exemplars as exemplar_choice
from shared.calibration_artifact import ARTIFACT_KIND, ARTIFACT_VERSION
from shared.components import aggregate
from services.fusion.decision import ASSIGNED, COMPATIBLE_SEXES, NEW, Thresholds, decide
from services.fusion.scoring import FusionModel, fused_score, score_candidates
from shared.calibrated import fit_components

_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)


def simulate(per_component: Mapping[str, np.ndarray], order: Sequence[int], sexes: Sequence[str],
             thresholds: Thresholds, *, model: FusionModel | None = None, spec_weights: Mapping[str, float] | None = None,
             aggregation: str = "best", exemplars_per_individual: int = 8, k: int = 50,
             exemplar_vectors: np.ndarray | None = None, sightings: Sequence | None = None) -> list[int | None]:
    """Sequential ingestion: the individual each image is placed in (None: sent to review).

    `per_component[name]` is that component's (N, N) raw similarity (NaN: no evidence). With
    `exemplar_vectors`, exemplars are re-chosen by fusion's rule after every placement (else the
    first ones are kept, as a capped gallery). With `sightings` (a key per image), fusion's sighting
    rules apply: an image whose sighting was placed joins that individual; otherwise the sighting's
    images that arrived so far query together (each exemplar's best similarity to any of them).
    """
    how = model.aggregation if model else aggregation
    arrival = {index: _EPOCH + timedelta(seconds=n) for n, index in enumerate(order)}  # newest = latest arrival
    placed: list[int | None] = [None] * len(sexes)
    members: dict[int, list[int]] = {}
    exemplars: dict[int, list[int]] = {}
    owner_sex: dict[int, str] = {}
    next_id = 0
    arrived: dict = {}  # sighting -> images of it seen so far
    sighting_of: dict = {}  # sighting -> the individual it was placed in
    for i in order:
        sex = sexes[i]
        key = sightings[i] if sightings is not None else None
        queries = [i] + (arrived.get(key, []) if key is not None else [])
        if key is not None:
            arrived.setdefault(key, []).append(i)
        linked = sighting_of.get(key) if key is not None else None
        if linked is not None and owner_sex[linked] in COMPATIBLE_SEXES[sex]:
            ind = linked  # frames of one sighting are one animal
        else:
            ind = _decide_image(per_component, queries, sex, owner_sex, exemplars, model, spec_weights, thresholds,
                                how, k)
            if ind is None:
                continue
            if ind == "new":
                ind = next_id
                next_id += 1
                owner_sex[ind] = sex
                members[ind], exemplars[ind] = [], []
            elif owner_sex[ind] == "unknown":
                owner_sex[ind] = sex
        placed[i] = ind
        members[ind].append(i)
        if key is not None:
            sighting_of[key] = ind
        # the gallery as fusion keeps it
        step = exemplar_choice.on_new_sighting(len(exemplars[ind]), len(members[ind]), exemplars_per_individual)
        if step == exemplar_choice.JOIN:
            exemplars[ind].append(i)
        elif step == exemplar_choice.RECHOOSE and exemplar_vectors is not None:
            items = [exemplar_choice.ExemplarCandidate(m, exemplar_vectors[m], arrival[m])
                     for m in members[ind][-200:]]
            exemplars[ind] = list(exemplar_choice.choose(items, exemplars_per_individual))
    return placed


@dataclass
class OperatingPoint:
    match: float
    new: float
    report: dict


def _decide_image(per_component, queries, sex, owner_sex, exemplars, model, spec_weights, thresholds, how, k):
    """Fusion's decision for one image (queried with `queries`: it and its sighting's earlier frames):
    an existing individual, "new", or None (review)."""
    allowed = [ind for ind, s in owner_sex.items() if s in COMPATIBLE_SEXES[sex]]
    scored: dict[str, dict[int, float]] = {}
    if allowed:
        ex_idx = np.asarray([e for ind in allowed for e in exemplars[ind]])
        ex_own = np.asarray([ind for ind in allowed for _ in exemplars[ind]])
        for name, sim in per_component.items():
            block = sim[np.ix_(queries, ex_idx)]
            # each exemplar's best similarity to any frame (NaN only where no frame has evidence)
            sims = block[0] if len(queries) == 1 else np.where(
                np.isnan(block).all(axis=0), np.nan, np.nan_to_num(block, nan=-np.inf).max(axis=0))
            ok = ~np.isnan(sims)
            top = np.argsort(-np.where(ok, sims, -np.inf), kind="stable")[:k]
            top = top[ok[top]]
            by_ind: dict[int, list[float]] = {}
            for own, s in zip(ex_own[top].tolist(), sims[top].tolist()):
                by_ind.setdefault(own, []).append(s)
            if by_ind:
                scored[name] = {ind: aggregate(v, how) for ind, v in by_ind.items()}
    decision = decide(score_candidates(scored, model, spec_weights), thresholds, calibrated=model is not None)
    if decision.state == NEW:
        return "new"
    if decision.state == ASSIGNED:
        return decision.individual_id
    return None


def threshold_grid(scores: np.ndarray, size: int = 28) -> list[float]:
    """Thresholds spread over the upper half of the pair scores, up to the highest (any scale: raw or P).

    Same-individual pairs are a small share of all pairs, so the grid is densest in the top tail.
    """
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return [0.5]
    levels = np.concatenate([np.linspace(0.5, 0.99, size // 2), 1 - np.geomspace(0.01, 1e-5, size - size // 2)])
    grid = {round(float(q), 5) for q in np.quantile(finite, levels)}
    # and one above every score: "a new individual for every detection" is always a choice on the curve
    grid.add(round(float(finite.max()) + 1e-3, 5))
    return sorted(grid)


def operating_curve(per_component: Mapping[str, np.ndarray], indices: Sequence[int], identities: Sequence[str],
                    sexes: Sequence[str], seed: int, match_grid: Sequence[float], new_steps: int = 6,
                    **kw) -> list[OperatingPoint]:
    """Simulated open-set outcomes of the images `indices` for a grid of (match, new) thresholds.

    The new-individual threshold takes `new_steps` values of the same grid at or below the match
    threshold (from equal to it down to the grid's bottom), so the search works on any score scale.
    """
    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(np.asarray(indices))]
    grid = sorted(match_grid)
    points = []
    for m, match in enumerate(grid):
        below = grid[: m + 1][::-1]
        picks = sorted({below[int(round(j))] for j in np.linspace(0, len(below) - 1, min(new_steps, len(below)))},
                       reverse=True)
        for new in picks:
            placed = simulate(per_component, order, sexes, Thresholds(match=float(match), new=float(new)), **kw)
            report = clustering_report([placed[i] for i in order], [identities[i] for i in order])
            points.append(OperatingPoint(float(match), new, report))
    return points


def merge_risk(report: dict) -> float:
    """The worse of the two false-merge rates: by individuals, and by the detections inside them.

    Either alone can hide a disaster: one giant merged individual is a small share of the
    individuals but swallows a large share of the detections.
    """
    return max(report["false_merge_rate"], report["false_merge_detection_rate"])


def choose(points: list[OperatingPoint], target_false_merge: float,
           max_review: float | None = None) -> tuple[OperatingPoint, bool]:
    """Best B-cubed F1 among the points within the false-merge target (the safest point if none is).

    With `max_review`, only points that also send at most that share of detections to review count,
    as long as any point meets both; otherwise the review cap gives way (merges matter more).
    """
    ok = [p for p in points if merge_risk(p.report) <= target_false_merge]
    if max_review is not None and any(p.report["review_rate"] <= max_review for p in ok):
        ok = [p for p in ok if p.report["review_rate"] <= max_review]
    if ok:
        return max(ok, key=lambda p: (round(p.report["bcubed_f1"], 6), p.match, p.new)), True
    return min(points, key=lambda p: (merge_risk(p.report), -p.report["bcubed_f1"])), False


def component_pairs(sim: np.ndarray, indices: Sequence[int], identities: Sequence[str], encounters: Sequence[str],
                    aggregation: str = "best") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query index, score, same) for each image of `indices` against each identity of the part, scored by
    fusion's identity-level aggregation over that identity's images outside the query's encounter.
    NaN where the component had no evidence."""
    idx = np.asarray(indices)
    ids = np.asarray(identities)[idx]
    enc = np.asarray(encounters)[idx]
    uniq = np.unique(ids)
    queries, scores, same = [], [], []
    for row, i in enumerate(idx):
        s = sim[i, idx].astype(np.float64)
        other = enc != enc[row]
        for ident in uniq:
            mask = other & (ids == ident)
            if not mask.any():
                continue
            # the same pairs for every component (fusion lines them up); NaN where this one had no evidence
            value = aggregate(s[mask & ~np.isnan(s)].tolist(), aggregation)
            queries.append(i)
            scores.append(np.nan if value is None else value)
            same.append(ident == ids[row])
    return np.asarray(queries), np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)


def fit_fusion(per_component: Mapping[str, np.ndarray], indices: Sequence[int], identities: Sequence[str],
               encounters: Sequence[str], aggregation: str = "best") -> dict:
    """Per-component isotonic calibrations and logistic-regression weights on their log-odds.

    Returns the artifact's `fusion` section. A single component gets weight 1 and intercept 0 (its
    calibration alone is the probability).
    """
    names = list(per_component)
    pairs = {n: component_pairs(per_component[n], indices, identities, encounters, aggregation) for n in names}
    base_q, _, base_same = pairs[names[0]]
    # the pairs line up across components: same queries, same identities, same order
    for n in names[1:]:
        if not np.array_equal(pairs[n][0], base_q) or not np.array_equal(pairs[n][2], base_same):
            raise ValueError(f"component {n} was evaluated on other pairs than {names[0]}")
    calibrations, weights, intercept = fit_components({n: pairs[n][1] for n in names}, base_same)
    return {"calibrations": calibrations, "weights": weights, "intercept": intercept, "aggregation": aggregation,
            "pairs": int(base_same.size), "same_pairs": int(base_same.sum())}


def fused_similarity(per_component: Mapping[str, np.ndarray], model: FusionModel | None,
                     spec_weights: Mapping[str, float] | None = None) -> np.ndarray:
    """The (N, N) image-to-image score fusion gives, for retrieval metrics (fusion's own `fused_score`)."""
    return fused_score(per_component, model, spec_weights or {})[0]


def split_identities(identities: Sequence[str], seed: int, fit_share: float = 0.5) -> tuple[set, set]:
    uniq = sorted(set(identities))
    rng = np.random.default_rng(seed)
    perm = [uniq[i] for i in rng.permutation(len(uniq))]
    cut = int(round(len(perm) * fit_share))
    return set(perm[:cut]), set(perm[cut:])


def write_artifact(path: Path, *, versions: dict[str, str], fusion: dict, chosen: OperatingPoint, met_target: bool,
                   target: float, fit: dict, held_out: dict) -> dict:
    artifact = {
        "kind": ARTIFACT_KIND, "version": ARTIFACT_VERSION, "created_at": datetime.now(timezone.utc).isoformat(),
        "embedding_versions": versions, "fusion": fusion,
        "thresholds": {"match": chosen.match, "new": chosen.new},
        "target_false_merge_rate": target, "target_met_on_fit": met_target,
        "fit": fit, "held_out": held_out,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(artifact, indent=2))
    tmp.replace(path)
    return artifact
