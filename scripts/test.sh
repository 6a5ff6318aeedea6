#!/usr/bin/env bash
# Sets up everything the test suite needs (CPU torch first, then the package with its model + test extras,
# Debian's chromium for the real-browser test when we can install it) and runs the whole suite offline.
# Usage: bash scripts/test.sh [pytest args]      (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q torch==2.13.0            # the local CPU wheel; any other pin pulls GBs of CUDA packages
"$PY" -m pip install -q -e ".[model,test]"
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "note: could not install chromium; the browser test will be skipped"
fi
exec "$PY" -m pytest -q "$@"
