#!/usr/bin/env bash
# Prints why the pose service's AP-10K keypoint stack (mmcv, compiled once) must be installed, or nothing:
# for the tests (--tests), when asked for (DEER_POSE_KEYPOINTS=1), or when AP-10K weights sit in the model
# cache. scripts/setup.sh installs it only then; tests/test_setup.py checks each case.
set -euo pipefail
model_cache=${DEER_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deer-reid/models}
if [ "${1:-}" = "--tests" ]; then
  echo "the tests need it"
elif [ "${DEER_POSE_KEYPOINTS:-0}" = 1 ]; then
  echo "DEER_POSE_KEYPOINTS=1"
elif compgen -G "$model_cache/*ap10k*/*.pth" >/dev/null; then
  echo "AP-10K weights are in $model_cache"
fi
