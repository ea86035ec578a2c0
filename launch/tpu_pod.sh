#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice (e.g. v4-32, v5e-64).
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE TRAIN_FLAGS...
#   launch/tpu_pod.sh my-v4-32 us-central2-b --config configs/mae.py:model=B/16 \
#       --workdir gs://my-bucket/mae_b16
#
# Copies this checkout to every worker (scp); creates a Python 3.11 virtual environment there
# with uv (TPU VM images ship Python 3.10) and installs requirements.txt and jax[tpu] into it
# (SETUP=0 skips that); then starts `python -m mimjax.train TRAIN_FLAGS` on all workers at once,
# detached (setsid nohup), so the run survives a dropped ssh session; each worker logs to
# ${REMOTE_DIR}/train.log. On TPU VMs jax.distributed.initialize finds the coordinator and
# process ids itself (--config.distributed.num_processes=-1, added here, asks for that). The
# workdir must be one every worker can write (a gs:// bucket). A maintenance event or preemption
# sends SIGTERM: every worker checkpoints at one common step and exits with status 143; re-run
# the command (SETUP=0) to resume. PROJECT sets the gcloud project. --dry-run (or DRY_RUN=1)
# prints the gcloud commands only.
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry-run] TPU_NAME ZONE TRAIN_FLAGS..." >&2
  exit 2
fi
tpu="$1"
zone="$2"
shift 2
SETUP="${SETUP:-1}"
REMOTE_DIR="${REMOTE_DIR:-mimjax}"
VENV_DIR="${VENV_DIR:-mimjax_venv}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gcloud_args=(--zone="$zone" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_args+=(--project="$PROJECT")
fi

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# The remote command line, quoted so the flags reach python unchanged.
printf -v train_cmd '%q ' "$@" --config.distributed.num_processes=-1
train_cmd="cd ${REMOTE_DIR} && TF_CPP_MIN_LOG_LEVEL=3 setsid nohup ~/${VENV_DIR}/bin/python \
-m mimjax.train ${train_cmd} > train.log 2>&1 < /dev/null &"
setup_cmd="python3 -m pip install -q --user uv && python3 -m uv venv -q --python 3.11 \
~/${VENV_DIR} && cd ${REMOTE_DIR} && python3 -m uv pip install -q --python ~/${VENV_DIR}/bin/python \
-r requirements.txt 'jax[tpu]'"

run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --command="mkdir -p ${REMOTE_DIR}"
run gcloud compute tpus tpu-vm scp --recurse "${gcloud_args[@]}" \
  "$repo/mimjax" "$repo/configs" "$repo/requirements.txt" "${tpu}:${REMOTE_DIR}"
if [[ "$SETUP" == 1 ]]; then
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --command="$setup_cmd"
fi
run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --command="$train_cmd"
