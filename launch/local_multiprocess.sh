#!/usr/bin/env bash
# N local processes of one multi-process mimjax run (CPU gloo collectives, or one GPU each).
#
#   launch/local_multiprocess.sh [--dry-run] NUM_PROCESSES TRAIN_FLAGS...
#   launch/local_multiprocess.sh 2 --config configs/mae.py:runlocal --workdir /tmp/mae2
#
# Every process gets MIMJAX_COORDINATOR (a free localhost port), MIMJAX_NUM_PROCESSES and
# MIMJAX_PROCESS_ID, which mimjax.distributed passes to jax.distributed.initialize. Process i
# logs to $LOG_DIR/process_i.log (LOG_DIR defaults to the current directory). The script waits
# for all processes and exits with the first non-zero status among them (143 when they were
# preempted by SIGTERM). --dry-run (or DRY_RUN=1) prints the commands only.
# Ctrl-C (or SIGTERM to this script) sends SIGTERM to every process: they checkpoint at one
# common step and exit with 143; the script reports each status and exits 130. Re-running the
# command resumes.
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [--dry-run] NUM_PROCESSES TRAIN_FLAGS..." >&2
  exit 2
fi
num_processes="$1"
shift
PYTHON="${PYTHON:-python}"
LOG_DIR="${LOG_DIR:-.}"
port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
coordinator="127.0.0.1:${port}"

pids=()
# Stopping the launcher stops the whole run. Background processes ignore SIGINT, so they get
# SIGTERM, which JAX's preemption service turns into a checkpoint at a step common to all.
# shellcheck disable=SC2329  # called by the trap
stop() {
  echo "stopping: the processes save a checkpoint and exit" >&2
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait_all
  exit 130
}

# Waits for every process, reporting each non-zero exit status; the first one is kept in $status.
status=0
wait_all() {
  for i in "${!pids[@]}"; do
    code=0
    wait "${pids[$i]}" || code=$?
    if [[ "$code" != 0 ]]; then
      echo "process ${i} exited with status ${code}; see ${LOG_DIR}/process_${i}.log" >&2
      if [[ "$status" == 0 ]]; then
        status="$code"
      fi
    fi
  done
}
trap stop INT TERM

for ((i = 0; i < num_processes; i++)); do
  cmd=(env "MIMJAX_COORDINATOR=${coordinator}" "MIMJAX_NUM_PROCESSES=${num_processes}"
       "MIMJAX_PROCESS_ID=${i}" "$PYTHON" -m mimjax.train "$@")
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '> %q\n' "${LOG_DIR}/process_${i}.log"
  else
    mkdir -p "$LOG_DIR"
    "${cmd[@]}" > "${LOG_DIR}/process_${i}.log" 2>&1 &
    pids+=("$!")
  fi
done

wait_all
exit "$status"
