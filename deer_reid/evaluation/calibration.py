"""From labelled data to thresholds: sequential simulation, the operating curve, isotonic calibration.

The simulation runs fusion's own decision code (best exemplar per individual,
`combine`, `decide`, the exemplar cap and sex compatibility) over an in-memory
gallery, one image at a time, exactly as the service sees a stream of uploads.
Thresholds are fitted on one part of the identities and reported on the other.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from deer_reid.evaluation.metrics import clustering_report
from services.fusion.calibration import ARTIFACT_KIND
from services.fusion.decision import ASSIGNED, COMPATIBLE_SEXES, NEW, Thresholds, best_per_individual, combine, \
    decide


def simulate(per_model: dict[str, np.ndarray], order: Sequence[int], sexes: Sequence[str], thresholds: Thresholds,
             *, exemplars_per_individual: int = 8, k: int = 50,
             weights: dict[str, float] | None = None) -> list[int | None]:
    """Sequential ingestion: the individual each image is placed in (None: sent to review)."""
    placed: list[int | None] = [None] * len(sexes)
    ex_index: list[int] = []
    ex_owner: list[int] = []
    owner_sex: dict[int, str] = {}
    ex_count: dict[int, int] = {}
    next_id = 0
    for i in order:
        sex = sexes[i]
        per_model_best = {}
        if ex_index:
            idx = np.asarray(ex_index)
            owners = np.asarray(ex_owner)
            allowed = np.array([owner_sex[o] in COMPATIBLE_SEXES[sex] for o in ex_owner])
            for name, sim in per_model.items():
                sims = sim[i, idx][allowed]
                own = owners[allowed]
                top = np.argsort(-sims, kind="stable")[:k]
                per_model_best[name] = best_per_individual(zip(own[top].tolist(), sims[top].tolist()))
            per_model_best = {m: b for m, b in per_model_best.items() if b}
        decision = decide(combine(per_model_best, weights), thresholds)
        if decision.state == NEW:
            ind = next_id
            next_id += 1
            owner_sex[ind] = sex
            ex_count[ind] = 0
        elif decision.state == ASSIGNED:
            ind = decision.individual_id
            if owner_sex[ind] == "unknown":
                owner_sex[ind] = sex
        else:
            continue
        placed[i] = ind
        if ex_count[ind] < exemplars_per_individual:
            ex_index.append(i)
            ex_owner.append(ind)
            ex_count[ind] += 1
    return placed


@dataclass
class OperatingPoint:
    match: float
    new: float
    report: dict


def operating_curve(per_model: dict[str, np.ndarray], indices: Sequence[int], identities: Sequence[str],
                    sexes: Sequence[str], seed: int, match_grid: Sequence[float] | None = None,
                    new_gaps: Sequence[float] = (0.0, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3),
                    weights: dict[str, float] | None = None) -> list[OperatingPoint]:
    """Simulated open-set outcomes of the images `indices` for a grid of (match, new) thresholds."""
    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(np.asarray(indices))]
    grid = match_grid if match_grid is not None else np.round(np.arange(0.30, 0.985, 0.02), 3)
    points = []
    for match in grid:
        for gap in new_gaps:
            new = round(float(match) - gap, 3)
            placed = simulate(per_model, order, sexes, Thresholds(match=float(match), new=new), weights=weights)
            report = clustering_report([placed[i] for i in order], [identities[i] for i in order])
            points.append(OperatingPoint(float(match), new, report))
    return points


def merge_risk(report: dict) -> float:
    """The worse of the two false-merge rates: by individuals, and by the detections inside them.

    Either alone can hide a disaster: one giant merged individual is a small share of the
    individuals but swallows a large share of the detections.
    """
    return max(report["false_merge_rate"], report["false_merge_detection_rate"])


def choose(points: list[OperatingPoint], target_false_merge: float) -> tuple[OperatingPoint, bool]:
    """Best B-cubed F1 among the points within the false-merge target (the safest point if none is)."""
    ok = [p for p in points if merge_risk(p.report) <= target_false_merge]
    if ok:
        return max(ok, key=lambda p: (round(p.report["bcubed_f1"], 6), p.match, p.new)), True
    return min(points, key=lambda p: (merge_risk(p.report), -p.report["bcubed_f1"])), False


def identity_pairs(sim: np.ndarray, indices: Sequence[int], identities: Sequence[str],
                   encounters: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(score, same) for each image against each other identity of the part: its best-image similarity,
    never counting the image's own encounter (the scene, not the animal)."""
    idx = np.asarray(indices)
    ids = np.asarray(identities)[idx]
    enc = np.asarray(encounters)[idx]
    scores, same = [], []
    for row, i in enumerate(idx):
        s = sim[i, idx].copy()
        s[enc == enc[row]] = -np.inf
        for ident in np.unique(ids):
            best = s[ids == ident].max()
            if np.isfinite(best):
                scores.append(best)
                same.append(ident == ids[row])
    return np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)


def fit_isotonic(scores: np.ndarray, same: np.ndarray) -> dict:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0, increasing=True).fit(scores, same)
    return {"x": [round(float(v), 6) for v in iso.X_thresholds_], "y": [round(float(v), 6) for v in iso.y_thresholds_]}


def split_identities(identities: Sequence[str], seed: int, fit_share: float = 0.5) -> tuple[set, set]:
    uniq = sorted(set(identities))
    rng = np.random.default_rng(seed)
    perm = [uniq[i] for i in rng.permutation(len(uniq))]
    cut = int(round(len(perm) * fit_share))
    return set(perm[:cut]), set(perm[cut:])


def write_artifact(path: Path, *, versions: dict[str, str], weights: dict[str, float], chosen: OperatingPoint,
                   met_target: bool, target: float, isotonic: dict, fit: dict, held_out: dict) -> dict:
    artifact = {
        "kind": ARTIFACT_KIND, "version": 1, "created_at": datetime.now(timezone.utc).isoformat(),
        "embedding_versions": versions, "weights": weights,
        "thresholds": {"match": chosen.match, "new": chosen.new},
        "target_false_merge_rate": target, "target_met_on_fit": met_target,
        "isotonic": isotonic, "fit": fit, "held_out": held_out,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(artifact, indent=2))
    tmp.replace(path)
    return artifact
