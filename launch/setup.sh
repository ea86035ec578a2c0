#!/usr/bin/env bash
# Installs what mimjax needs on a fresh Debian/Ubuntu machine with Python 3.11:
#   bash launch/setup.sh          runtime: the offline Fashion-MNIST files and requirements.txt
#   bash launch/setup.sh --test   also the test tools (pytest, PyTorch + timm, open_clip, ...)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -d /usr/share/datasets/fashion-mnist ]]; then
  if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
    apt-get update -qq
    apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: install the Debian package dataset-fashion-mnist for the offline default data" >&2
  fi
fi

python3 -m pip install -q --disable-pip-version-check -r requirements.txt
if [[ "${1:-}" == "--test" ]]; then
  python3 -m pip install -q --disable-pip-version-check -r requirements-test.txt
fi
