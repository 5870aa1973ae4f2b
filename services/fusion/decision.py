"""The identity decision from scored candidates and thresholds (assigned, new or review): pure, shared by
the service and the evaluation. The scoring itself is `services.fusion.scoring`."""
from __future__ import annotations

from dataclasses import dataclass

from services.fusion.scoring import Candidate

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
class Decision:
    state: str
    individual_id: int | None
    score: float | None
    flags: tuple[str, ...]
    candidates: tuple[Candidate, ...]


def decide(candidates: list[Candidate], thresholds: Thresholds, *, keep: int = 5,
           calibrated: bool = False) -> Decision:
    """Match the best candidate, found a new individual, or ask a human.

    When unsure, review is preferred to a new profile, and a new profile to a wrong merge. The SPEC's
    ensemble rules (high confidence needs every model above the floor; disagreeing models in the
    review band go to a human) apply to uncalibrated scores: with a fitted fusion, the calibrated
    probability already weighs the models' agreement, and calibrated values from data win.
    """
    top = tuple(candidates[:keep])
    if not candidates or candidates[0].score < thresholds.new:
        best = candidates[0].score if candidates else None
        return Decision(NEW, None, best, (), top)
    best = candidates[0]
    if "temporal-conflict" in best.flags and best.score >= thresholds.new:
        # The best match was seen too far away moments ago: two deer, or one wrong photo time.
        return Decision(REVIEW, None, best.score, ("manual-review", "temporal-conflict"), top)
    if "possible-duplicate-profile" in best.flags and best.score >= thresholds.new:
        # Body and coat say this buck, his antlers say otherwise: a person decides, nothing is merged.
        return Decision(REVIEW, None, best.score, ("manual-review", "possible-duplicate-profile"), top)
    if best.score >= thresholds.match:
        runner_up = candidates[1] if len(candidates) > 1 else None
        if runner_up is not None and runner_up.score >= thresholds.match \
                and best.score - runner_up.score < thresholds.ambiguity_margin:
            return Decision(REVIEW, None, best.score, ("manual-review", "ambiguous"), top)
        models = best.body_models
        ensemble = len(models) > 1 and not calibrated
        low, high = thresholds.review_band
        if ensemble and low <= best.score <= high and max(models) - min(models) > thresholds.disagreement:
            return Decision(REVIEW, None, best.score, ("manual-review", "model-disagreement"), top)
        confident = best.score > thresholds.high_confidence and (
            not ensemble or min(models) > thresholds.model_floor)
        flags = ("high-confidence",) if confident else ()
        return Decision(ASSIGNED, best.individual_id, best.score, flags, top)
    return Decision(REVIEW, None, best.score, ("manual-review",), top)
