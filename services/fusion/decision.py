"""Scoring and the identity decision: pure functions, shared by the service and the evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

ASSIGNED, NEW, REVIEW = "assigned", "new", "review"

# Which individuals a detection may join: a buck never joins a doe, and the reverse.
COMPATIBLE_SEXES = {"male": ("male", "unknown"), "female": ("female", "unknown"),
                    "unknown": ("male", "female", "unknown")}


@dataclass(frozen=True)
class Thresholds:
    """Similarity cut-offs: >= match assigns, < new founds an individual, between goes to review."""

    match: float
    new: float
    ambiguity_margin: float = 0.02  # two individuals this close at the top: a human decides
    high_confidence: float = 0.90
    # Ensembles (SPEC defaults until calibration replaces them): high confidence needs every model
    # above `model_floor`; a score in the review band with models disagreeing by more than
    # `disagreement` goes to a human even above the match threshold.
    model_floor: float = 0.85
    review_band: tuple[float, float] = (0.75, 0.85)
    disagreement: float = 0.15

    def __post_init__(self):
        if self.new > self.match:
            raise ValueError(f"new-individual threshold {self.new} is above the match threshold {self.match}")


@dataclass(frozen=True)
class Candidate:
    individual_id: int
    score: float
    components: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    state: str
    individual_id: int | None
    score: float | None
    flags: tuple[str, ...]
    candidates: tuple[Candidate, ...]


def best_per_individual(neighbours: Iterable[tuple[int, float]]) -> dict[int, float]:
    """Nearest exemplars (individual, similarity) -> each individual's best similarity."""
    best: dict[int, float] = {}
    for individual, sim in neighbours:
        if sim > best.get(individual, float("-inf")):
            best[individual] = sim
    return best


def combine(per_model: Mapping[str, Mapping[int, float]], weights: Mapping[str, float] | None = None) -> list[Candidate]:
    """Per-model best similarities -> candidates scored by the weighted mean over models, best first.

    An individual a model did not return among its nearest neighbours counts as that
    model's floor (its lowest returned similarity): absent evidence is weak evidence.
    """
    if not per_model:
        return []
    models = list(per_model)
    w = {m: (weights or {}).get(m, 1.0) for m in models}
    total = sum(w.values())
    floor = {m: min(per_model[m].values(), default=0.0) for m in models}
    individuals = set().union(*(per_model[m].keys() for m in models))
    candidates = []
    for ind in individuals:
        comps = {m: per_model[m].get(ind, floor[m]) for m in models}
        score = sum(w[m] * comps[m] for m in models) / total
        candidates.append(Candidate(ind, score, comps))
    candidates.sort(key=lambda c: (-c.score, c.individual_id))
    return candidates


def decide(candidates: list[Candidate], thresholds: Thresholds, *, keep: int = 5) -> Decision:
    """Match the best candidate, found a new individual, or ask a human.

    When unsure, review is preferred to a new profile, and a new profile to a wrong merge.
    """
    top = tuple(candidates[:keep])
    if not candidates or candidates[0].score < thresholds.new:
        best = candidates[0].score if candidates else None
        return Decision(NEW, None, best, (), top)
    best = candidates[0]
    if best.score >= thresholds.match:
        runner_up = candidates[1] if len(candidates) > 1 else None
        if runner_up is not None and runner_up.score >= thresholds.match \
                and best.score - runner_up.score < thresholds.ambiguity_margin:
            return Decision(REVIEW, None, best.score, ("manual-review", "ambiguous"), top)
        models = list(best.components.values())
        ensemble = len(models) > 1
        low, high = thresholds.review_band
        if ensemble and low <= best.score <= high and max(models) - min(models) > thresholds.disagreement:
            return Decision(REVIEW, None, best.score, ("manual-review", "model-disagreement"), top)
        confident = best.score > thresholds.high_confidence and (
            not ensemble or min(models) > thresholds.model_floor)
        flags = ("high-confidence",) if confident else ()
        return Decision(ASSIGNED, best.individual_id, best.score, flags, top)
    return Decision(REVIEW, None, best.score, ("manual-review",), top)
