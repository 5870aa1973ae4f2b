#!/usr/bin/env bash
# Build the pose service's two compiled packages once per (package, torch, python) and keep their
# wheels in the user's cache, so that later set-ups and CI reuse them:
# - mmcv 2.1.0 with its CPU ops (mmpose 1.3 imports them): no wheel exists for this torch, and its
#   setup.py asks for C++14/17 where torch 2.14's headers need C++20. About 19 minutes on two cores (1,087 and 1,134 s measured).
# - xtcocotools 1.14.3, whose published wheels were compiled against numpy 1 (seconds).
# Prints the wheels' paths on stdout, one a line.
set -euo pipefail
cd "$(dirname "$0")/.."

MMCV_VERSION=2.1.0
XTCOCOTOOLS_VERSION=1.14.3
PY=${PYTHON:-.venv/bin/python}
torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
py_tag=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
root=${XDG_CACHE_HOME:-$HOME/.cache}/deer-reid/wheels
mmcv_cache=$root/mmcv-$MMCV_VERSION-torch$torch_version-$py_tag
xtcoco_cache=$root/xtcocotools-$XTCOCOTOOLS_VERSION-$py_tag
mkdir -p "$mmcv_cache" "$xtcoco_cache"
cached() { ls "$1"/*.whl 2>/dev/null | head -n1 || true; }

if [ -n "$(cached "$mmcv_cache")" ] && [ -n "$(cached "$xtcoco_cache")" ]; then
  cached "$mmcv_cache"; cached "$xtcoco_cache"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A throwaway build environment: the project's torch and numpy, and the setuptools that still has
# pkg_resources (mmcv's setup.py imports it).
"$PY" -m venv "$work/venv"
pip=("$work/venv/bin/pip")
"${pip[@]}" install -q "torch==$torch_version" "numpy==2.4.6" "setuptools<81" wheel ninja "cython==3.3.1" 2>&1 \
  | grep -v "^WARNING: Location" >&2 || true

if [ -z "$(cached "$xtcoco_cache")" ]; then
  "${pip[@]}" wheel -q --no-build-isolation --no-deps --no-binary xtcocotools -w "$xtcoco_cache" \
    "xtcocotools==$XTCOCOTOOLS_VERSION" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  [ -n "$(cached "$xtcoco_cache")" ] || { echo "setup: building xtcocotools failed" >&2; exit 1; }
fi

if [ -z "$(cached "$mmcv_cache")" ]; then
  echo "setup: building mmcv $MMCV_VERSION for torch $torch_version (once, about 19 minutes on two cores;" \
       "cached in $mmcv_cache)" >&2
  started=$(date +%s)
  # The source archive (pip reads its metadata by running setup.py, which imports torch).
  "${pip[@]}" download -q --no-deps --no-binary :all: --no-build-isolation -d "$work" "mmcv==$MMCV_VERSION" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  tar -xzf "$work/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
  src="$work/mmcv-$MMCV_VERSION"
  sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "${pip[@]}" wheel -q --no-build-isolation --no-deps -w "$mmcv_cache" "$src" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  [ -n "$(cached "$mmcv_cache")" ] || { echo "setup: building mmcv failed" >&2; exit 1; }
  echo "setup: mmcv built in $(( $(date +%s) - started )) s" >&2
fi
cached "$mmcv_cache"; cached "$xtcoco_cache"
