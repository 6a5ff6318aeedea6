#!/usr/bin/env bash
# Sets up the dashboard (no torch needed) and opens it on the shipped runs in cached_runs/.
# Usage: bash scripts/dashboard.sh [streamlit args]   (COS_RUNS_DIR=... to browse other runs)
# Installs the package only when it is missing or pyproject.toml changed since the last install (a stamp file in
# the package's egg-info), so a second launch starts at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.dashboard-installed
WANT=$(cksum < pyproject.toml)
if ! "$PY" -c "import cos_core, streamlit, plotly" 2>/dev/null || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$PY" -m pip install -q -e .
  echo "$WANT" > "$STAMP"
fi
exec "$PY" -m streamlit run app.py "$@"
