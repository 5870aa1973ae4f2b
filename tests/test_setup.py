"""The first run in minutes: the set-up compiles mmcv only where something uses it, and the pose service
says which viewpoint path it runs, and why, on /healthz and in `deer-reid status`."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import REPO


def why_keypoints(tmp_path, *args: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("DEER_POSE_KEYPOINTS", "DEER_MODEL_CACHE")}
    done = subprocess.run(["bash", str(REPO / "scripts" / "needs_keypoints.sh"), *args],
                          env={**clean, "DEER_MODEL_CACHE": str(tmp_path / "models"), **env},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_keypoint_stack_is_installed_only_where_something_uses_it(tmp_path):
    assert why_keypoints(tmp_path) == ""  # ./scripts/run.sh on a fresh machine: no mmcv compile
    assert why_keypoints(tmp_path, "--tests") == "the tests need it"
    assert why_keypoints(tmp_path, DEER_POSE_KEYPOINTS="1") == "DEER_POSE_KEYPOINTS=1"
    weights = tmp_path / "models" / "rtmpose-m_ap10k" / "rtmpose-m_simcc-ap10k_pt-aic-coco_210e-256x256-7a041aa1.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    assert why_keypoints(tmp_path).startswith("AP-10K weights are in")


@pytest.mark.stack
def test_status_names_the_viewpoint_path_the_pose_service_runs_and_why(stack, monkeypatch, capsys):
    from deer_reid.cli import main

    monkeypatch.setenv("DEER_HOME", str(stack.home))
    capsys.readouterr()
    assert main(["status"]) == 0
    pose = json.loads(capsys.readouterr().out)["services"]["pose"]["health"]
    # the test stack has a trained viewpoint classifier and no AP-10K weights
    assert pose["viewpoint_path"].startswith("viewpoint classifier only (keypoints off: no weights for keypoint")
    assert pose["keypoints"].startswith("off: ") and not pose["viewpoint_classifier"].startswith("off")
