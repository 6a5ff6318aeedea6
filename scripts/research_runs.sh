#!/usr/bin/env bash
# The runs behind docs/findings.md, on the shipped organism: maze (unique answer, the task with headroom: 25 % at
# 1 step, 75.5 % at 16), fork (two right goals, the noise picks one) and dispatch (the noise picks a colour, whose
# meaning is the same in every instance). Research size by default: 200 held-out instances x 2 seeds (fork: x 4
# seeds, so recipients have both another-answer and same-answer donors) = 400+ samples per run. Each run is
# captured, analysed, intervened on, patched and (maze) searched; the tables docs/findings.md reads are copied to
# $OUT as <run>.<table>.parquet (each carries the command that made it in its cos_config metadata) and the
# document is regenerated. The archives (~0.5 GB) are not shipped: they are reproducible-only, by this script.
#
# Usage: bash scripts/research_runs.sh [runs_dir] [out_dir]     (defaults runs/research, tables)
#   GPU (the lead): COS="cos" DEVICE=cuda BATCH=4096 bash scripts/research_runs.sh
#   small CPU check: INSTANCES=2 STEPS=0,4,8,12 FRAMES=1,4,7 STRENGTHS=0.25,1 LAYERS=0,4,7 PATCH_STEPS=0 \
#                    SEARCH_N=1,2,4 SEARCH_K=2 MERGES=mean_x0_hat,noise_mean BATCH=16 bash scripts/research_runs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/research}
OUT=${2:-tables}
COS=${COS:-cos}                         # e.g. COS="python3 -m cos_core.cli" where the package is not installed
INSTANCES=${INSTANCES:-200}             # held-out instances per run
DEVICE=${DEVICE:-}                      # default: cuda if available
BATCH=${BATCH:-512}                     # videos per pipeline call
STEPS=${STEPS:-}                        # noise / renoise / propagation steps (default: all 16)
FRAMES=${FRAMES:-}                      # noise / renoise frames (default: all 8)
STRENGTHS=${STRENGTHS:-0.1,0.25,0.5,1}  # λ of the strength sweep
LAYERS=${LAYERS:-}                      # blocks patched (default: all 8)
PATCH_STEPS=${PATCH_STEPS:-0,2,4,8}     # steps patched
SEARCH_N=${SEARCH_N:-1,2,4,8}
SEARCH_K=${SEARCH_K:-1,2,4,8}           # prune steps of the early search, and merged steps of the ensembles
MERGES=${MERGES:-mean_x_t,mean_v_hat,mean_x0_hat,noise_mean}
NOISE=${NOISE:-shared}                  # capture --noise: shared (the shipped tables) or per-instance (each
                                        # instance x seed its own noise, so intervals over instances sample it too)
common=(--runs-dir "$RUNS" --batch-size "$BATCH" ${DEVICE:+--device "$DEVICE"})
mkdir -p "$RUNS" "$OUT"

capture() {  # task run_id seeds
  rm -rf "${RUNS:?}/$2" "${RUNS:?}/$2.partial"
  $COS capture --task "$1" --instances "$INSTANCES" --seeds "$3" --run-id "$2" --store-dtype float16 \
    --tensors x0_hat --reductions frame_mean --runs-dir "$RUNS" --noise "$NOISE" ${DEVICE:+--device "$DEVICE"}
  $COS analyze --runs-dir "$RUNS" "$2" --which dynamics
}
keep() {  # run table...
  local run=$1; shift
  for table in "$@"; do cp "$RUNS/$run/derived/$table.parquet" "$OUT/$run.$table.parquet"; done
}
positions=(${STEPS:+--steps "$STEPS"} ${FRAMES:+--frames "$FRAMES"})

# maze: unique answers, the Chain-of-Steps regime
capture maze research-maze 0,1
$COS intervene research-maze "${common[@]}" "${positions[@]}" --which noise_step,noise_frame,renoise_step,renoise_frame \
  --strengths "$STRENGTHS"
$COS intervene research-maze "${common[@]}" ${STEPS:+--steps "$STEPS"} --which propagation --propagation-strength 0.5
# no seed -> seed patching on maze: its answer is unique, so every readable answer is the same path and no
# recipient has a donor with another answer (cos patch says so and stops)
$COS search research-maze "${common[@]}" --noise "$NOISE" --n "$SEARCH_N" --prune-steps "$SEARCH_K" --k "$SEARCH_K" \
  --merges "$MERGES"
keep research-maze event_rates step_answers interventions commitment sensitivity propagation search

# fork: the noise picks one of two right goals
capture fork research-fork 0,1,2,3
$COS intervene research-fork "${common[@]}" ${STEPS:+--steps "$STEPS"} --which renoise_step --strengths 1
$COS patch research-fork "${common[@]}" --pairs seed --steps "$PATCH_STEPS" ${LAYERS:+--layers "$LAYERS"}
keep research-fork event_rates step_answers commitment patching

# dispatch: the noise picks a colour; a colour means the same in every instance, so instance -> instance patching
# can measure adoption
capture dispatch research-dispatch 0,1
$COS patch research-dispatch "${common[@]}" --pairs instance --steps "$PATCH_STEPS" ${LAYERS:+--layers "$LAYERS"}
keep research-dispatch event_rates step_answers patching

python scripts/findings.py
ls -la "$OUT"
