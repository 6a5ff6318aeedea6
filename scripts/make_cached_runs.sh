#!/usr/bin/env bash
# Regenerates cached_runs/: real archives of the shipped organism made by `cos capture`, analysed by `cos analyze`;
# the fork and memory runs also get `cos intervene` tables and fork a `cos ensemble` table (100 held-out instances
# x the run's seeds, more than the run ships, so their intervals are usable; ~3 minutes on one H100).
# Every run's manifest records the exact command that made it. Sizes are chosen to ship (float16 storage,
# activations every other step); for research-size runs raise --instances / --seeds and drop --steps.
# Usage: bash scripts/make_cached_runs.sh [runs_dir]     (deletes and remakes the organism-* runs there)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-cached_runs}
COS=${COS:-cos}   # e.g. COS="python3 -m cos_core.cli" where the package is not installed
mkdir -p "$RUNS"
COMMON=(--store-dtype float16 --tensors x0_hat --reductions frame_mean,token_norm --steps 0:16:2 --runs-dir "$RUNS")
make_run() {  # task instances seeds
  local id="organism-$1"
  rm -rf "${RUNS:?}/$id" "${RUNS:?}/$id.partial"
  $COS capture --task "$1" --instances "$2" --seeds "$3" --run-id "$id" "${COMMON[@]}"
  $COS analyze --runs-dir "$RUNS" "$id"
}
make_run maze 6 0,1
make_run memory 6 0,1
make_run choice 6 0,1
make_run fork 16 0,1
# base vs ensemble for the Compare page: member 0 of a 4-seed ensemble merged by mean x̂0 over the first 4 of 16
# steps, on the fork run's instances with seed 0 (pairs with organism-fork's seed-0 samples)
rm -rf "${RUNS:?}/organism-fork-ensemble" "${RUNS:?}/organism-fork-ensemble.partial"
$COS capture --task fork --instances 16 --seeds 0 --ensemble mean_x0_hat:4:4 --run-id organism-fork-ensemble \
    "${COMMON[@]}"
$COS analyze --runs-dir "$RUNS" organism-fork-ensemble
$COS intervene --runs-dir "$RUNS" organism-fork --instances 100 --batch-size 512
$COS intervene --runs-dir "$RUNS" organism-memory --instances 100 --batch-size 512
# 4 steps instead of 16: the organism solves fork 70-80 % of the time there, so merging seeds has room to help
$COS ensemble --runs-dir "$RUNS" organism-fork --instances 100 --steps 4 --k 0,1,2,4 --n 1,2,4,8 --batch-size 4096
du -sh "$RUNS"
