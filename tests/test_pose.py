"""The pose service's models on real photos: `deer-reid train viewpoint` and its card, the AP-10K keypoint
model's weights rule, and the service's answers for real and bad crops (random keypoint weights: plumbing)."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from deer_reid.cli import main
from deer_reid.evaluation.dataset import DatasetError, load_dataset
from deer_reid.evaluation.run import never_trained_on
from deer_reid.training.viewpoint import ViewpointConfig, train_viewpoint
from services.pose.classifier import HEAD_FILE, ViewpointClassifier, read_head
from services.pose.keypoints import KEYPOINT_MODELS, KeypointModel
from services.pose.service import FALLBACK, PoseHandler, pose_features
from shared.viewpoints import LEFT, RIGHT, UNKNOWN
from shared.config import Settings
from shared.models import MissingWeights, get_spec, read_card
from shared.schemas import DetectionEvent, Features
from tests.conftest import labelled_subset


def test_a_trained_viewpoint_classifier_is_a_checked_model_that_eval_treats_fairly(viewpoint_cache, nyala_paths):
    card = read_card("viewpoint", viewpoint_cache)
    assert card["kind"] == "viewpoint-classifier" and card["classes"] == [LEFT, RIGHT]
    assert card["backbone"] == "efficientnet_lite0" and 0.5 <= card["threshold"] < 1
    ids = card["identities"]
    assert len(ids["holdout"]) == 4 and len(ids["validation"]) == 4 and not set(ids["train"]) & set(ids["holdout"])
    held = card["holdout"]
    assert held["photos"] > 0 and 0 <= held["accuracy"] <= held["accuracy_without_unknown"] <= 1
    assert sum(n for row in held["confusion"].values() for n in row.values()) == held["photos"]
    # it answers real crops with a side or `unknown`
    classifier = ViewpointClassifier("viewpoint", viewpoint_cache)
    views = classifier.predict([p.read_bytes() for p in nyala_paths[:6]])
    assert {v.label for v in views} <= {LEFT, RIGHT, UNKNOWN}
    assert all(v.source == "classifier" and (v.label == UNKNOWN) == (v.angle is None) for v in views)
    # a mirrored photo is the other flank, with the same confidence
    im = Image.open(nyala_paths[0]).convert("RGB")
    flipped = io.BytesIO()
    im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped, format="JPEG", quality=95)
    original = io.BytesIO()
    im.save(original, format="JPEG", quality=95)
    p, q = classifier.head.probabilities(classifier.features([original.getvalue(), flipped.getvalue()]))
    assert p[0] == pytest.approx(q[1], abs=0.02)
    # it is not a body network, and eval leaves every identity it learned out of a --pose run
    with pytest.raises(KeyError):
        get_spec("viewpoint", viewpoint_cache)
    settings = Settings(model_cache=viewpoint_cache)
    samples = load_dataset(card["data"]["folder"])
    kept, notes = never_trained_on(samples, ["viewpoint"], settings)
    assert {s.identity for s in kept} == set(ids["holdout"]) | set(ids["skipped"])
    assert "viewpoint" in notes


def test_a_tampered_head_refuses_to_load(viewpoint_cache, tmp_path):
    cache = tmp_path / "models"
    shutil.copytree(viewpoint_cache / "viewpoint", cache / "viewpoint")
    (cache / "viewpoint" / HEAD_FILE).write_bytes(b"not the head")
    with pytest.raises(MissingWeights, match="checksum"):
        read_head("viewpoint", cache)
    with pytest.raises(MissingWeights, match="train viewpoint"):
        read_head("nothing-here", cache)


def test_train_viewpoint_needs_two_viewpoints_and_is_routed_by_the_cli(tmp_path, nyala_rows, nyala_paths, capsys):
    data = labelled_subset(tmp_path / "data", nyala_rows, nyala_paths, 4, 3)
    meta = data / "metadata.csv"
    meta.write_text("\n".join(",".join(line.split(",")[:2] + [""] + line.split(",")[3:]) if n else line
                              for n, line in enumerate(meta.read_text().splitlines())) + "\n")
    settings = Settings(model_cache=tmp_path / "models", home=tmp_path / "home")
    with pytest.raises(DatasetError, match="viewpoint column"):
        train_viewpoint(data, ViewpointConfig(), settings, progress=False)
    assert main(["train", "viewpoint", str(data), "--quiet"]) == 2
    assert "deer-reid train viewpoint: " in capsys.readouterr().err


def _jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG")
    return out.getvalue()


def test_the_keypoint_model_refuses_without_weights_and_rejects_wrong_ones(tmp_path):
    spec = KEYPOINT_MODELS["rtmpose-m_ap10k"]
    with pytest.raises(MissingWeights, match=spec.weights_file):
        KeypointModel("rtmpose-m_ap10k", tmp_path)
    (tmp_path / spec.name).mkdir()
    (tmp_path / spec.name / spec.weights_file).write_bytes(b"something else")
    with pytest.raises(MissingWeights, match=spec.sha256_prefix):
        KeypointModel("rtmpose-m_ap10k", tmp_path)
    with pytest.raises(KeyError):
        KeypointModel("no-such-model", tmp_path)


@pytest.fixture(scope="module")
def random_keypoints(tmp_path_factory) -> KeypointModel:
    return KeypointModel("rtmpose-m_ap10k", tmp_path_factory.mktemp("kp"), allow_random=True)


def test_the_service_answers_real_and_bad_crops_with_random_keypoints_flagged(random_keypoints, viewpoint_cache,
                                                                            nyala_paths):
    handler = PoseHandler(random_keypoints, ViewpointClassifier("viewpoint", viewpoint_cache))
    real = [p.read_bytes() for p in nyala_paths[:3]]
    bad = [b"\xff\xd8 not a jpeg", _jpeg(np.full((12, 60, 3), 90, np.uint8)), _jpeg(np.zeros((80, 80, 3), np.uint8))]
    results = handler.run(real + bad)
    for crop, r in zip(real, results[:3]):
        h, w = Image.open(io.BytesIO(crop)).size[::-1]
        assert r.keypoints.shape == (17, 3) and np.isfinite(r.keypoints).all()
        assert (0 <= r.keypoints[:, 2]).all() and (r.keypoints[:, 2] <= 1).all()
        assert r.keypoints[:, 0].max() <= w * 1.5 and r.keypoints[:, 1].max() <= h * 1.5  # crop pixels
        assert FALLBACK in r.flags and "random-weights" in r.flags  # random keypoints are never trusted
        assert r.viewpoint.source in ("classifier", "none")  # the viewpoint never comes from random keypoints
        assert set(r.timings_ms) == {"keypoints", "viewpoint_classifier"}
    assert [(r.status, r.viewpoint.label, r.flags) for r in results[3:]] == [
        ("no-evidence", UNKNOWN, [FALLBACK, reason]) for reason in ("unreadable-crop", "tiny-crop", "black-frame")]
    event = DetectionEvent(detection_id="00000000-0000-0000-0000-000000000001", site="s", camera="c",
                           captured_at="2025-01-01T00:00:00Z", cls="doe", box={"x0": 0, "y0": 0, "x1": 9, "y1": 9},
                           image_sha256="0" * 64, crop_jpeg=real[0], expected=["body", "pose"])
    features = pose_features(event, results[0], handler.versions())
    assert Features.from_bytes(features.to_bytes()) == features
    assert features.attributes["versions"]["keypoints"].startswith("rtmpose-m_ap10k:random")
    assert len(json.dumps(features.attributes["keypoints"])) < 500
