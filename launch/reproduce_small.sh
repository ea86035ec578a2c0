#!/usr/bin/env bash
# The small-scale reproduction study (every method against its baseline on Fashion-MNIST):
#   bash launch/reproduce_small.sh --floor          MAE fine-tuned vs scratch first, 3 seeds
#   bash launch/reproduce_small.sh                  3 seeds of every pair, RESULTS.md (~25 h, 2 cores)
#   bash launch/reproduce_small.sh --quick          one seed of every row, RESULTS_quick.md
#   bash launch/reproduce_small.sh --dry-run [...]  print the command without running it
# Other arguments go to `python -m mimjax.reproduce` (e.g. --rows mae_lut --seeds 3).
# Runs are cached under workdirs/repro: rerunning resumes and skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
args=()
for arg in "$@"; do
  if [[ "${arg}" == "--dry-run" ]]; then
    dry_run=1
  else
    args+=("${arg}")
  fi
done

cmd=(python3 -m mimjax.reproduce --workdir_root workdirs/repro "${args[@]}")
if (( dry_run )); then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
exec "${cmd[@]}"
