#!/usr/bin/env bash
# The research-size measurements behind docs/findings.md: the organism on fork and memory, 200 held-out instances
# x 2 noise seeds each (400 samples), captured, analysed (probes incl. the fork outcome label), intervened on and
# ensembled. Too large to ship (~0.3 GB); its derived tables are copied to $OUT (default runs/research-tables) as
# <run>.<table>.parquet, each table carrying its command in the parquet metadata. On one H100 the fork capture +
# analyze took 2.5 min (the part docs/findings.md §4 cites); the whole script has not been timed in one go.
# Usage: bash scripts/research_runs.sh [runs_dir] [out_dir]        (COS=... as in make_cached_runs.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/research}
OUT=${2:-runs/research-tables}
COS=${COS:-cos}
mkdir -p "$RUNS" "$OUT"
capture() {  # task
  rm -rf "${RUNS:?}/$1-400" "${RUNS:?}/$1-400.partial"
  $COS capture --task "$1" --instances 200 --seeds 0,1 --run-id "$1-400" --store-dtype float16 \
    --tensors x0_hat --reductions frame_mean --runs-dir "$RUNS"
  $COS analyze --runs-dir "$RUNS" "$1-400"
}
keep() {  # run table [suffix]
  cp "$RUNS/$1/derived/$2.parquet" "$OUT/$1.$2${3:-}.parquet"
}
capture fork
capture memory
for t in probe_grid step_answers candidates events event_rates phases; do keep fork-400 $t; done
for t in probe_grid memory step_answers; do keep memory-400 $t; done
$COS intervene --runs-dir "$RUNS" fork-400
for t in interventions interventions_samples propagation; do keep fork-400 $t; done
$COS intervene --runs-dir "$RUNS" memory-400
for t in interventions interventions_samples propagation; do keep memory-400 $t; done
for steps in 16 4; do  # the shipped 16 steps, and 4 steps: a weaker sampler with room to improve
  $COS ensemble --runs-dir "$RUNS" fork-400 --steps "$steps" --k 0,1,2,4 --n 1,2,4,8
  keep fork-400 ensemble ".steps$steps"
  keep fork-400 ensemble_samples ".steps$steps"
done
ls -la "$OUT"
