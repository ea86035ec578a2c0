#!/usr/bin/env bash
# One-command accelerator check (README "Benchmarks", docs/gpu.md): MAE ViT-B/16 and ViT-L/16 at
# 224 px in bfloat16 at their largest batch, plug-in overheads, the PyTorch peer (eager and
# torch.compile) and a bfloat16-vs-float32 loss check, written as OUT_DIR/device_check.{json,md}.
#
#   bash benchmarks/device_check.sh                          # one GPU, about 8 minutes
#   bash benchmarks/device_check.sh /tmp/check --tiny        # the CPU smoke setting of the tests
#   bash benchmarks/device_check.sh OUT_DIR --parts models --set 'models=L/16;max_batch=512'
#
# Needs JAX (with CUDA on a GPU), flax, optax, orbax (which brings absl-py: every flag is an absl
# flag, `--help` lists them), timm, torch and ml-collections; neither
# TensorFlow nor a network. ml-collections is pure Python: carry it as a wheel made elsewhere with
#   pip download --no-deps -d wheels ml-collections   and install it with
#   pip install --no-index --no-deps wheels/ml_collections-*.whl
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-benchmarks/device_check}"
shift || true
if ! python3 -c 'import ml_collections' 2>/dev/null; then
  echo 'error: ml_collections is not installed; carry its wheel (see the top of this script).' >&2
  exit 2
fi
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
exec python3 -m mimjax.bench.device_check --out_dir "${out}" "$@"
