"""Pose's pure logic: the viewpoint from keypoints, the mirror-consistent classifier head, the service's
answer for bad crops, and the pose-aware fusion component."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shared.components import component
from shared.components.pose import POSE, Seen
from shared.viewpoints import viewpoint_of
from services.pose.service import FALLBACK, conclude, readable
from services.pose.viewpoint import (
    ANGLED,
    FRONTAL,
    LEFT,
    REAR,
    RIGHT,
    UNKNOWN,
    Viewpoint,
    ViewpointHead,
    choose_threshold,
    combine,
    from_keypoints,
    label_of_angle,
    mirror_features,
    mirrored_inputs,
    normalise_label,
)
from shared.pipeline import wants_pose
from shared.schemas import PipelineConfig


def keypoints(neck_x: float, tail_x: float, face: float = 0.9, axis: float = 0.9) -> np.ndarray:
    kp = np.zeros((17, 3))
    kp[:, 2] = 0.5
    kp[3] = (neck_x, 30, axis)
    kp[4] = (tail_x, 40, axis)
    kp[0, 2] = kp[1, 2] = kp[2, 2] = face
    return kp


@pytest.mark.parametrize("neck, tail, face, label, angle", [
    (20, 80, 0.9, LEFT, 90.0),  # head to the image's left: the left flank (nyala's "left")
    (80, 20, 0.9, RIGHT, -90.0),
    (50, 50, 0.9, FRONTAL, 0.0),  # body axis along the camera's, face seen
    (50, 50, 0.1, REAR, 180.0),  # ... face not seen
])
def test_viewpoint_from_keypoints(neck, tail, face, label, angle):
    v = from_keypoints(keypoints(neck, tail, face), box_width=100)
    assert (v.label, v.source) == (label, "keypoints")
    assert v.angle == pytest.approx(angle)
    assert v.confidence > 0.6


def test_a_half_turned_animal_is_angled_and_a_weak_body_axis_is_unknown():
    v = from_keypoints(keypoints(40, 60), box_width=100)  # axis spans 0.2 of the box: about 21 degrees... frontal
    assert v.label == FRONTAL
    v = from_keypoints(keypoints(35, 70), box_width=100)  # 0.35 of the box: 40 degrees off the camera axis
    assert v.label == ANGLED and 30 < v.angle < 60
    weak = from_keypoints(keypoints(20, 80, axis=0.4), box_width=100)
    assert weak.label == UNKNOWN and weak.angle is None and "0.6" in weak.why
    assert from_keypoints(np.zeros((5, 3)), 100).label == UNKNOWN
    assert from_keypoints(np.full((17, 3), np.nan), 100).label == UNKNOWN


def test_angle_classes():
    assert [label_of_angle(a) for a in (0, 29, 45, 90, -90, 135, 170, -179)] == \
        [FRONTAL, FRONTAL, ANGLED, LEFT, RIGHT, ANGLED, REAR, REAR]
    assert normalise_label("Left") == LEFT and normalise_label(" right ") == RIGHT and normalise_label("") is None


def _fitted_head(seed: int = 0) -> tuple[ViewpointHead, np.ndarray, np.ndarray]:
    """A head fitted the way `train viewpoint` fits it, on features whose left/right differ by a direction."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    n, dim = 60, 16
    side = rng.normal(size=dim)
    f = rng.normal(size=(n, dim))
    y = np.where(rng.random(n) < 0.5, LEFT, RIGHT)
    f += np.where(y == LEFT, 1.0, -1.0)[:, None] * side
    mirrored = f - 2 * np.outer(f @ side / (side @ side), side)  # the mirror image flips the side direction
    x = mirror_features(f, mirrored)
    xt, yt = mirrored_inputs(x, list(y))
    fit = LogisticRegression(C=1.0, max_iter=5000).fit(xt, yt)
    w, b = fit.coef_, fit.intercept_
    head = ViewpointHead(tuple(fit.classes_), np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2]),
                         0.9, "test")
    return head, f, mirrored


def test_the_classifier_answers_a_mirrored_crop_with_the_other_flank_and_a_symmetric_view_unknown():
    head, f, mirrored = _fitted_head()
    p = head.probabilities(mirror_features(f, mirrored))
    p_mirror = head.probabilities(mirror_features(mirrored, f))
    assert np.allclose(p[:, 0], p_mirror[:, 1], atol=1e-3)  # P(left | crop) == P(right | its mirror image)
    symmetric = head.viewpoints(mirror_features(f[:3], f[:3]))  # identical halves: a head-on or rear view
    assert all(v.label == UNKNOWN and "unsure" in v.why for v in symmetric)
    assert all(v.confidence == pytest.approx(0.5, abs=0.01) for v in symmetric)
    answers = {v.label for v in head.viewpoints(mirror_features(f, mirrored))} - {UNKNOWN}
    assert answers == {LEFT, RIGHT}


def test_threshold_reaches_the_target_on_what_it_answers():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4], [0.55, 0.45], [0.2, 0.8]])
    truth = [0, 0, 1, 0, 1]  # the 0.6 answer is wrong
    t = choose_threshold(probs, truth, 0.99)
    assert t == pytest.approx(0.8)  # answers 0.95, 0.9 and 0.8: all right
    assert choose_threshold(probs, truth, 0.5) == 0.0  # 4 of 5 right: answer everything


def test_keypoints_decide_where_confident_else_the_classifier_else_unknown_with_reasons():
    kp_view = Viewpoint(REAR, 180.0, 0.8, "keypoints")
    cls_view = Viewpoint(LEFT, 90.0, 0.9, "classifier")
    assert combine(kp_view, cls_view) is kp_view
    weak = from_keypoints(keypoints(20, 80, axis=0.1), 100)
    assert combine(weak, cls_view) is cls_view
    none = combine(weak, Viewpoint(UNKNOWN, None, 0.55, "classifier", "classifier unsure"))
    assert none.label == UNKNOWN and "body axis" in none.why and "unsure" in none.why
    assert "no keypoint model" in combine(None, None).why


def _jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG")
    return out.getvalue()


def test_bad_crops_are_answered_not_blocked():
    assert readable(b"not an image") == "unreadable-crop"
    assert readable(_jpeg(np.full((10, 40, 3), 128, np.uint8))) == "tiny-crop"
    assert readable(_jpeg(np.zeros((64, 64, 3), np.uint8))) == "black-frame"
    assert readable(_jpeg(np.full((64, 64, 3), 128, np.uint8))).shape == (64, 64, 3)
    # nothing to go on: unknown, the regions fall back, no evidence
    r = conclude(None, 64, None, keypoints_random=False)
    assert (r.status, r.viewpoint.label, r.flags) == ("no-evidence", UNKNOWN, [FALLBACK])
    # keypoints on random weights are reported but never trusted
    r = conclude(keypoints(20, 80), 100, None, keypoints_random=True)
    assert r.viewpoint.label == UNKNOWN and FALLBACK in r.flags and "random-weights" in r.flags
    # confident real keypoints: no fallback
    r = conclude(keypoints(20, 80), 100, None, keypoints_random=False)
    assert (r.status, r.viewpoint.label, r.flags) == ("ok", LEFT, [])
    # no keypoint above threshold, the classifier knows: its viewpoint, regions fall back
    r = conclude(keypoints(20, 80, face=0.1, axis=0.1), 100, Viewpoint(RIGHT, -90.0, 0.9, "classifier"), False)
    assert (r.viewpoint.label, r.flags) == (RIGHT, [FALLBACK])


def test_pose_component_compares_like_with_like():
    pose = component(POSE)
    a, b = np.array([1.0, 0.0]), np.array([0.5, np.sqrt(0.75)])  # cosine 0.5
    assert pose.similarity([Seen(LEFT, a)], [Seen(LEFT, b)])[0, 0] == pytest.approx(0.5)
    assert np.isnan(pose.similarity([Seen(LEFT, a)], [Seen(RIGHT, b)])[0, 0])
    assert np.isnan(pose.similarity([Seen(UNKNOWN, a)], [Seen(UNKNOWN, b)])[0, 0])
    seen = [Seen(LEFT, a), Seen(LEFT, b), Seen(None, a)]
    m = pose.similarity(seen, seen)
    assert m[0, 1] == pytest.approx(0.5) and np.isnan(m[0, 2]) and np.isnan(m[2, 2])
    assert viewpoint_of({"pose": {"viewpoint": RIGHT}, "coat": {"facing": "left"}}) == RIGHT
    assert viewpoint_of({"pose": {"viewpoint": UNKNOWN}, "coat": {"facing": "left"}}) == LEFT
    assert viewpoint_of(None) is None


def test_selective_pose_says_why():
    on = PipelineConfig(mode="enhanced", pose=True)
    assert wants_pose(on, 0.5) == (True, "best body-only match 0.50 < 0.75")
    assert wants_pose(on, 0.8) == (False, "best body-only match 0.80 >= 0.75")
    assert wants_pose(on, None) == (True, "no candidate to compare")
    assert wants_pose(PipelineConfig(mode="fast", pose=True), 0.1) == (False, "fast mode")
    assert wants_pose(PipelineConfig(mode="enhanced", pose=False), 0.1) == (False, "pose switched off")
