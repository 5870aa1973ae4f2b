#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests, then the real broker, database
# and services started by the fixtures. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
exec .venv/bin/python -m pytest -ra "$@"
