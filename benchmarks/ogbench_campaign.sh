#!/usr/bin/env bash
# The OGBench side-by-side (docs/ogbench.md, Results) as two resumable lanes, one CPU core each. Run it again after any
# stop: finished runs are skipped (their data is not made again), killed ones resume (generation from its chunks,
# OFQL from its checkpoint, FQL from its last params_<step>.pkl). Needs FQL's checkout and venv (benchmarks/vs_fql.py's
# docstring).
#   DATA=/work/ogbench-data WORK=/work/vs_fql-work STEPS=50000 bash benchmarks/ogbench_campaign.sh [fql|ofql]
# (one lane alone with its name; both by default)
set -u
cd "$(dirname "$0")/.."
DATA=${DATA:-$HOME/.ogbench/data} WORK=${WORK:-runs/vs_fql} STEPS=${STEPS:-50000} LOGS=${LOGS:-$WORK/logs}
mkdir -p "$LOGS"
vs() {  # vs METHOD DATASET SEEDS... [--task N] [--tag ...]: makes the data first where a run is still to do and the
  # file is missing (one lane at a time per dataset: the other waits on the lock, then finds the file)
  local method=$1 dataset=$2; shift 2
  local train=(python benchmarks/vs_fql.py --work "$WORK" train --dataset "$dataset" --steps "$STEPS" --save-interval 5000
               --dataset-dir "$DATA" --methods "$method" --seeds "$@")
  [ -n "$("${train[@]}" --to-do)" ] || return 0
  mkdir -p "$DATA"
  flock "$DATA/.$dataset.lock" bash -c '[ -f "$1/$2-val.npz" ] ||
    python ogbench_tasks.py generate "$2" --workers 1 --out-dir "$1"' _ "$DATA" "$dataset" || return 1
  "${train[@]}"
}
fql_lane() {  # FQL (~5 steps/s on one core here): the default tasks
  vs fql cube-single-play-v0 0 1 2
  vs fql puzzle-3x3-play-v0 0
  vs fql cube-double-play-v0 0 1 2
}
ofql_lane() {  # OFQL (~25 steps/s); each run re-scored under the paper's selection and one sample. eta 0.3 (best on
  # cube-single task2, collapsed on its tasks 1 and 5) beside the preset's eta 0.1, both named
  local eta03=(--tag eta0.3 --ofql-flag=--eta=0.3) eta01=(--tag eta0.1 --ofql-flag=--eta=0.1 --ofql-flag=--compile)
  vs ofql cube-single-play-v0 0 1 2 "${eta03[@]}"
  vs ofql cube-double-play-v0 0 1 2 "${eta03[@]}"
  vs ofql puzzle-3x3-play-v0 0 1 2 "${eta03[@]}"
  vs ofql puzzle-3x3-play-v0 0 --task 1 "${eta03[@]}"
  vs ofql puzzle-3x3-play-v0 0 --task 1 "${eta01[@]}"
  for task in 1 3 4 5; do vs ofql cube-single-play-v0 0 --task "$task" "${eta03[@]}"; done
  vs ofql cube-single-play-v0 0 1 2 "${eta01[@]}"  # the preset on the default task, 3 seeds
  for task in 1 3 4 5; do vs ofql cube-single-play-v0 0 --task "$task" "${eta01[@]}"; done
  vs ofql cube-double-play-v0 0 1 2 "${eta01[@]}"  # the preset's default tasks
  vs ofql puzzle-3x3-play-v0 0 1 2 "${eta01[@]}"
  vs ofql puzzle-3x3-play-v0 1 2 --task 1 "${eta03[@]}"
  vs ofql puzzle-3x3-play-v0 1 2 --task 1 "${eta01[@]}"
  # runs of earlier sessions are re-scored already (their checkpoints may be gone): only the ones queued here
  python benchmarks/vs_fql.py --work "$WORK" rescore --runs '*eta0.1' '*task1__seed[12]__*'
}
for lane in ${1:-fql ofql}; do "${lane}_lane" > "$LOGS/${lane}_lane.log" 2>&1 & done
wait
python benchmarks/vs_fql.py report
