"""Which extractor components a detection runs and fusion waits for: pure rules, shared by the relay
(which stamps them on the detection at its first publication) and fusion (which joins on them).

- body always runs: it anchors the join (the candidate shortlist comes from its embeddings);
- coat and antler run in enhanced mode when switched on, antler only for antlered classes;
- pose is selective (SPEC): never expected up front; fusion asks for it in enhanced mode when the
  body-only match is uncertain, and from then on waits for it too.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from shared.schemas import ANTLERED, COMPONENTS, Box, DetectionClass, DetectionEvent, PipelineConfig
from shared.topics import FEATURES_ANTLER, FEATURES_BODY, FEATURES_COAT, FEATURES_POSE, Topic

TOPIC_OF: dict[str, Topic] = {"body": FEATURES_BODY, "coat": FEATURES_COAT, "pose": FEATURES_POSE,
                              "antler": FEATURES_ANTLER}
assert set(TOPIC_OF) == set(COMPONENTS)

# SPEC: in enhanced mode pose runs only when the best body-only confidence is below this.
POSE_WHEN_BEST_BELOW = 0.75


def expected_components(config: PipelineConfig, cls: DetectionClass | str) -> list[str]:
    """The components a detection published under `config` waits for, body first."""
    expected = ["body"]
    if config.mode == "enhanced":
        if config.coat:
            expected.append("coat")
        if config.antler and DetectionClass(cls) in ANTLERED:
            expected.append("antler")
    return expected


def wants_pose(config: PipelineConfig, best_body_confidence: float | None) -> tuple[bool, str]:
    """Whether fusion should ask the pose service for this detection (the SPEC's selective rule), and why."""
    if config.mode != "enhanced":
        return False, "fast mode"
    if not config.pose:
        return False, "pose switched off"
    if best_body_confidence is None:
        return True, "no candidate to compare"
    if best_body_confidence < POSE_WHEN_BEST_BELOW:
        return True, f"best body-only match {best_body_confidence:.2f} < {POSE_WHEN_BEST_BELOW}"
    return False, f"best body-only match {best_body_confidence:.2f} >= {POSE_WHEN_BEST_BELOW}"


def body_models_for(config: PipelineConfig, fast: list[str], ensemble: list[str]) -> list[str]:
    """The body models a detection runs: the fast model, or the ensemble in enhanced mode with it switched on."""
    if config.mode == "enhanced" and config.ensemble and ensemble:
        return list(ensemble)
    return list(fast)


def detection_event(row: Mapping, config: PipelineConfig, expected: Sequence[str], crop: bytes,
                    attempt: int = 0) -> DetectionEvent:
    """The event of a stored detection row, under `config` and expecting `expected`: what the reconciler's
    relay publishes and what fusion sends the pose service."""
    x0, y0, x1, y1 = row["box"]
    return DetectionEvent(
        detection_id=row["id"], site=row["site"], camera=row["camera"], captured_at=row["captured_at"],
        cls=row["cls"], box=Box(x0=x0, y0=y0, x1=x1, y1=y1), image_sha256=row["image_sha256"],
        crop_jpeg=crop, attempt=attempt, mode=config.mode, property=row["property"],
        switches=config.switches(), expected=list(expected))
