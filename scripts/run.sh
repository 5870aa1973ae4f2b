#!/usr/bin/env bash
# Set up (if needed) and run deer-reid on the embedded default: PostgreSQL + pgvector, the Tansu
# broker, every service and the API, in the foreground (Ctrl-C stops everything).
# Arguments go to `deer-reid up`; the default body model is the one with real weights offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# what is installed and what is not, each missing item with its fix; stops here if the stack cannot run
.venv/bin/deer-reid doctor
[ $# -eq 0 ] && set -- --body-model efficientnet_lite0
exec .venv/bin/deer-reid up "$@"
