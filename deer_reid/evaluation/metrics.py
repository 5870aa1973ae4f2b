"""Re-identification metrics: retrieval (CMC, mAP) and clustering (B-cubed, false merges and splits).

Ties are broken pessimistically: among gallery items with equal scores, the wrong
identities rank first, so a model that scores everything alike earns nothing.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Hashable, Sequence

import numpy as np


def rank(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Relevance of the gallery items in ranked order (best score first, ties: irrelevant first)."""
    order = np.lexsort((relevant.astype(np.int8), -scores))
    return relevant[order]


def average_precision(ranked_relevance: np.ndarray) -> float:
    hits = np.flatnonzero(ranked_relevance)
    if hits.size == 0:
        return 0.0
    return float(np.mean(np.arange(1, hits.size + 1) / (hits + 1)))


def _summary(first_hit: list[int], aps: list[float], max_rank: int, groups: list | None = None) -> dict:
    """CMC, top-1/top-5 and mAP from each query's rank of its first hit and its average precision; with
    `groups` (each query's identity), 95% intervals of top-1 and top-5 as well."""
    n = len(first_hit)
    hits = np.asarray(first_hit)
    cmc = [float(np.mean(hits < k)) if n else 0.0 for k in range(1, max_rank + 1)]
    out = {"queries": n, "top1": cmc[0], "top5": cmc[4] if max_rank >= 5 else None,
           "mAP": float(np.mean(aps)) if n else 0.0, "cmc": cmc}
    if groups is not None and n:
        out["top1_ci95"] = bootstrap_interval(hits < 1, groups)
        if max_rank >= 5:
            out["top5_ci95"] = bootstrap_interval(hits < 5, groups)
    return out


def bootstrap_interval(correct: np.ndarray, groups: Sequence[Hashable], resamples: int = 2000,
                       seed: int = 0) -> list[float]:
    """95% percentile interval of a share of correct queries, resampling whole identities (a query's
    photos of one animal are not independent draws): how far a figure may move on other animals."""
    names, index = np.unique(np.asarray(groups), return_inverse=True)
    right = np.bincount(index, weights=np.asarray(correct, dtype=float), minlength=len(names))
    total = np.bincount(index, minlength=len(names)).astype(float)
    draws = np.random.default_rng(seed).multinomial(len(names), np.full(len(names), 1 / len(names)), resamples)
    shares = (draws @ right) / np.maximum(draws @ total, 1)
    return [round(float(v), 4) for v in np.percentile(shares, [2.5, 97.5])]


def retrieval(similarity: np.ndarray, identities: Sequence[Hashable], encounters: Sequence[Hashable],
              viewpoints: Sequence[Hashable] | None = None, max_rank: int = 20) -> dict:
    """Leave-one-encounter-out retrieval over a square similarity matrix.

    The gallery of query i is every image outside i's encounter (restricted to i's
    viewpoint when `viewpoints` is given). Queries with no image of their identity
    in their gallery are skipped; those images still serve as distractors.
    """
    ids = np.asarray(identities)
    enc = np.asarray(encounters)
    views = None if viewpoints is None else np.asarray(viewpoints)
    first_hit, aps, who = [], [], []
    for i in range(len(ids)):
        gallery = enc != enc[i]
        if views is not None:
            gallery &= views == views[i]
        relevant = ids[gallery] == ids[i]
        if not relevant.any():
            continue
        ranked = rank(similarity[i, gallery], relevant)
        first_hit.append(int(np.argmax(ranked)))
        aps.append(average_precision(ranked))
        who.append(ids[i])
    return _summary(first_hit, aps, max_rank, who)


def retrieval_by_sighting(similarity: np.ndarray, identities: Sequence[Hashable], encounters: Sequence[Hashable],
                          max_rank: int = 20) -> dict:
    """The sighting protocol: each encounter (all its photos: both flanks, a burst) is one query, and a
    gallery image scores its best similarity to any of the query's photos. Gallery: every image outside
    the encounter. Queries are encounters, so the figures are per sighting, not per image."""
    ids = np.asarray(identities)
    enc = np.asarray(encounters)
    first_hit, aps, who = [], [], []
    for e in dict.fromkeys(enc.tolist()):
        members = enc == e
        gallery = ~members
        relevant = ids[gallery] == ids[members][0]
        if not relevant.any():
            continue
        scores = similarity[np.ix_(members, gallery)].max(axis=0)
        ranked = rank(scores, relevant)
        first_hit.append(int(np.argmax(ranked)))
        aps.append(average_precision(ranked))
        who.append(ids[members][0])
    return _summary(first_hit, aps, max_rank, who)


def query_expanded_similarity(embeddings: np.ndarray, encounters: Sequence[Hashable], k: int = 2,
                              alpha: float = 3.0) -> np.ndarray:
    """Row i: image i's αQE query (expanded only with images outside its own encounter, i.e. its
    leave-one-encounter-out gallery) against every image."""
    from services.fusion.rerank import expanded_query

    enc = np.asarray(encounters)
    out = np.empty((len(embeddings), len(embeddings)), dtype=np.float32)
    for i in range(len(embeddings)):
        gallery = enc != enc[i]
        out[i] = embeddings @ expanded_query(embeddings[i], embeddings[gallery], k, alpha)
    return out


def bcubed(predicted: Sequence[Hashable], truth: Sequence[Hashable]) -> dict:
    """B-cubed precision, recall and F1 of a clustering against the true identities."""
    if len(predicted) != len(truth):
        raise ValueError("predicted and truth differ in length")
    if not predicted:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    pair = Counter(zip(predicted, truth))
    pred_size = Counter(predicted)
    true_size = Counter(truth)
    precision = sum(pair[(p, t)] / pred_size[p] for p, t in zip(predicted, truth)) / len(predicted)
    recall = sum(pair[(p, t)] / true_size[t] for p, t in zip(predicted, truth)) / len(predicted)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def answers_floor(truth: Sequence[Hashable], sightings: Sequence[Hashable],
                  targets: Sequence[float] = (0.90, 0.95)) -> dict[float, int | None]:
    """For each B-cubed F1 target, the fewest answers that can reach it when people do all the joining: the
    sightings (each photo's unit, one animal) start apart, every question asked is a pair that turns out to
    be one animal, and every answer is right. No question policy and no reviewer does better without the
    machine joining sightings on its own; None where even every join falls short (no target above 1).

    Precision stays 1, and an animal's share of recall after k of its joins is largest when its k + 1
    largest sightings are the ones joined: moving a fragment from a smaller joined group to a larger one
    only adds to the sum of squared group sizes that B-cubed recall counts. So each animal offers a curve
    of recall against joins, and the cheapest way to a recall across animals is a knapsack over those
    curves, solved exactly by dynamic programming over the number of joins (`best[m]`: the most recall
    mass m joins buy)."""
    if len(truth) != len(sightings):
        raise ValueError("truth and sightings differ in length")
    units: dict[Hashable, Counter] = defaultdict(Counter)
    for t, s in zip(truth, sightings):
        units[t][s] += 1  # a sighting of two labelled animals counts as one per animal
    n = len(truth)
    joins = sum(len(c) - 1 for c in units.values())
    best = np.full(joins + 1, -np.inf)
    best[0] = 0.0
    reach = 0
    for counts in units.values():
        sizes = np.sort(np.fromiter(counts.values(), float))[::-1]
        total = sizes.sum()
        gain = (np.cumsum(sizes) ** 2 + (np.sum(sizes ** 2) - np.cumsum(sizes ** 2))) / total  # k = 0 .. len-1
        merged = np.full(joins + 1, -np.inf)
        for k, g in enumerate(gain):
            merged[k:reach + k + 1] = np.maximum(merged[k:reach + k + 1], best[:reach + 1] + g)
        reach += len(sizes) - 1
        best = merged
    recall = best / n if n else best
    f1 = np.where(recall > 0, 2 * recall / (1 + recall), 0.0)
    return {t: (int(np.argmax(f1 >= t - 1e-12)) if n and f1.max() >= t - 1e-12 else None) for t in targets}


def merges_and_splits(predicted: Sequence[Hashable | None], truth: Sequence[Hashable]) -> dict:
    """False merges and splits over the detections placed in an individual (None: not placed, e.g. review).

    false_merge_rate: share of predicted individuals holding more than one true identity;
    false_merge_detection_rate: share of placed detections inside such individuals;
    false_split_rate: share of true identities (with a placed detection) spread over several individuals.
    """
    members: dict[Hashable, list[Hashable]] = defaultdict(list)
    homes: dict[Hashable, set] = defaultdict(set)
    for p, t in zip(predicted, truth):
        if p is None:
            continue
        members[p].append(t)
        homes[t].add(p)
    merged = [p for p, ts in members.items() if len(set(ts)) > 1]
    placed = sum(len(ts) for ts in members.values())
    return {
        "predicted_individuals": len(members),
        "false_merge_rate": len(merged) / len(members) if members else 0.0,
        "false_merge_detection_rate": sum(len(members[p]) for p in merged) / placed if placed else 0.0,
        "false_split_rate": sum(1 for ps in homes.values() if len(ps) > 1) / len(homes) if homes else 0.0,
    }


def clustering_report(predicted: Sequence[Hashable | None], truth: Sequence[Hashable]) -> dict:
    """B-cubed with unplaced detections as singletons, plus merges, splits and the review rate."""
    singletons = [p if p is not None else ("unplaced", i) for i, p in enumerate(predicted)]
    b = bcubed(singletons, truth)
    ms = merges_and_splits(predicted, truth)
    return {
        "bcubed_precision": b["precision"], "bcubed_recall": b["recall"], "bcubed_f1": b["f1"],
        **ms,
        "true_individuals": len(set(truth)),
        "review_rate": sum(1 for p in predicted if p is None) / len(predicted) if predicted else 0.0,
    }
