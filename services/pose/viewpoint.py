"""The viewpoint of a detection, two ways, both pure (numpy only):

- from AP-10K keypoints: the body axis (tail root -> neck) and which of head and tail the model sees;
- from a trained classifier on a body network's features, made mirror-consistent by construction.

Conventions. `profile-left` shows the animal's left flank: its head points to the image's left (as
nyala-train labels `left`). The angle is the yaw from the camera's point of view, in degrees: 0 the
animal faces the camera, +90 its left flank, -90 its right flank, 180 its rear. `unknown` comes with
no angle and says why (no keypoint confident enough, a classifier unsure of what it was never taught).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from shared.viewpoints import ANGLED, FRONTAL, LEFT, REAR, RIGHT, UNKNOWN

# Labels as datasets write them -> ours (nyala-train: left/right flanks).
LABEL_ALIASES = {"left": LEFT, "right": RIGHT, "front": FRONTAL, "back": REAR, "profile_left": LEFT,
                 "profile_right": RIGHT}
MIRROR = {LEFT: RIGHT, RIGHT: LEFT}
# SPEC: pose confidence below 0.6 falls back (to the box fractions) and is flagged `pose-fallback`.
KEYPOINT_MIN_SCORE = 0.6

# AP-10K's 17 keypoints, in the model's order.
AP10K_KEYPOINTS = ("left_eye", "right_eye", "nose", "neck", "root_of_tail", "left_shoulder", "left_elbow",
                   "left_front_paw", "right_shoulder", "right_elbow", "right_front_paw", "left_hip", "left_knee",
                   "left_back_paw", "right_hip", "right_knee", "right_back_paw")
L_EYE, R_EYE, NOSE, NECK, TAIL = 0, 1, 2, 3, 4
# In a true profile the neck-to-tail-root axis spans about this share of the box width (a standing
# ungulate's box holds the head and the legs too); shorter spans are foreshortened by the yaw.
PROFILE_AXIS_SHARE = 0.55


@dataclass(frozen=True)
class Viewpoint:
    label: str
    angle: float | None  # degrees, see the module's conventions; None when unknown
    confidence: float
    source: str  # "keypoints", "classifier" or "none"
    why: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["confidence"] = round(self.confidence, 3)
        d["angle"] = None if self.angle is None else round(self.angle, 1)
        return d


def normalise_label(label: str | None) -> str | None:
    """A dataset's viewpoint label in our vocabulary (None stays None; unknown words are kept, lower-cased)."""
    if label is None or not str(label).strip():
        return None
    word = str(label).strip().lower()
    return LABEL_ALIASES.get(word, word)


def unknown(why: str, source: str = "none") -> Viewpoint:
    return Viewpoint(UNKNOWN, None, 0.0, source, why)


def label_of_angle(angle: float) -> str:
    """The class of a yaw angle: within 30 degrees of a pure view it is that view, else angled."""
    a = abs(angle)
    if a <= 30:
        return FRONTAL
    if a >= 150:
        return REAR
    if 60 <= a <= 120:
        return LEFT if angle > 0 else RIGHT
    return ANGLED


def from_keypoints(keypoints: np.ndarray, box_width: float, min_score: float = KEYPOINT_MIN_SCORE) -> Viewpoint:
    """The viewpoint from AP-10K keypoints ((17, 3): x, y, score in crop pixels) of a crop `box_width` wide.

    The body axis (tail root -> neck) must be confident. Its horizontal span against a profile's span
    gives how far the animal is turned from the camera axis; where the head points gives the side; which
    end is confidently seen (eyes and nose, or not) tells facing the camera from facing away.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.shape != (17, 3) or not np.isfinite(kp).all() or box_width <= 0:
        return unknown("keypoints malformed", "keypoints")
    neck, tail = kp[NECK], kp[TAIL]
    axis_score = min(neck[2], tail[2])
    if axis_score < min_score:
        return unknown(f"body axis below {min_score} (neck {neck[2]:.2f}, tail root {tail[2]:.2f})", "keypoints")
    face_score = float(np.mean(kp[[L_EYE, R_EYE, NOSE], 2]))
    span = (neck[0] - tail[0]) / box_width  # < 0: the head points to the image's left
    turned = math.degrees(math.asin(min(1.0, abs(span) / PROFILE_AXIS_SHARE)))  # 0 along the camera axis, 90 across
    facing_camera = face_score >= min_score
    yaw = turned if facing_camera else 180.0 - turned  # from frontal (0) through profile (90) to rear (180)
    if span > 0:
        yaw = -yaw  # head to the image's right: the right flank
    if abs(yaw) < 1e-9 or abs(abs(yaw) - 180) < 1e-9:
        yaw = abs(yaw)
    used = [neck[2], tail[2]] + ([face_score] if facing_camera else [])
    return Viewpoint(label_of_angle(yaw), yaw, float(np.mean(used)), "keypoints")


def keypoint_confidence(keypoints: np.ndarray | None) -> float:
    """Pose confidence: the mean score of the keypoints that place the regions (eyes, nose, neck, tail root)."""
    if keypoints is None:
        return 0.0
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.shape != (17, 3) or not np.isfinite(kp).all():
        return 0.0
    return float(np.mean(kp[[L_EYE, R_EYE, NOSE, NECK, TAIL], 2]))


# ---- the classifier ------------------------------------------------------------------------------

def mirror_features(features: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """The classifier's input from a crop's features and its mirror image's: [f - f', f + f'].

    Mirroring the crop swaps the two halves' roles exactly (the first half changes sign, the second
    stays), so a linear head fitted with mirrored copies under swapped labels answers a mirrored
    left flank as a right flank by construction; a symmetric view (head-on, from behind) has a first
    half near zero and so no side.
    """
    return np.concatenate([features - mirrored, features + mirrored], axis=1).astype(np.float32)


def mirrored_inputs(x: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Training data with each example's mirror image added: the first half negated, left <-> right."""
    half = x.shape[1] // 2
    flipped = x.copy()
    flipped[:, :half] *= -1
    return np.concatenate([x, flipped]), list(labels) + [MIRROR.get(y, y) for y in labels]


@dataclass(frozen=True)
class ViewpointHead:
    """A multinomial logistic head over `mirror_features`; below `threshold` it answers unknown."""

    classes: tuple[str, ...]
    weights: np.ndarray  # (classes, 2 x feature dim)
    bias: np.ndarray  # (classes,)
    threshold: float  # the lowest probability it answers with (chosen on validation identities)
    version: str

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        z = x @ self.weights.T + self.bias
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def viewpoints(self, x: np.ndarray) -> list[Viewpoint]:
        out = []
        for p in self.probabilities(x):
            best = int(np.argmax(p))
            label, conf = self.classes[best], float(p[best])
            if conf < self.threshold:
                out.append(Viewpoint(UNKNOWN, None, conf, "classifier",
                                     f"classifier unsure ({label} at {conf:.2f} < {self.threshold:.2f})"))
            else:
                out.append(Viewpoint(label, ANGLE_OF.get(label), conf, "classifier"))
        return out


ANGLE_OF = {FRONTAL: 0.0, LEFT: 90.0, RIGHT: -90.0, REAR: 180.0}


def choose_threshold(probabilities: np.ndarray, truth: Sequence[int], target_accuracy: float = 0.95) -> float:
    """The lowest confidence threshold whose answered predictions reach `target_accuracy`, answering as
    many as possible (validation identities only); the largest confidence seen when none does."""
    conf = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == np.asarray(truth)
    for t in np.unique(np.concatenate([[0.0], conf])):
        answered = conf >= t
        if answered.any() and right[answered].mean() >= target_accuracy:
            return float(t)
    return float(conf.max())


def combine(from_kp: Viewpoint | None, from_classifier: Viewpoint | None) -> Viewpoint:
    """Keypoints decide where they are confident (they see frontal and rear too); else the classifier."""
    if from_kp is not None and from_kp.label != UNKNOWN:
        return from_kp
    if from_classifier is not None and from_classifier.label != UNKNOWN:
        return from_classifier
    reasons = [v.why for v in (from_kp, from_classifier) if v is not None and v.why]
    return unknown("; ".join(reasons) or "no keypoint model and no viewpoint classifier")
