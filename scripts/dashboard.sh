#!/usr/bin/env bash
# Sets up the dashboard (no torch needed) and opens it on the shipped runs in cached_runs/.
# Usage: bash scripts/dashboard.sh [streamlit args]   (COS_RUNS_DIR=... to browse other runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q -e .
exec "$PY" -m streamlit run app.py "$@"
