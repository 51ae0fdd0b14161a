#!/usr/bin/env bash
# Build Horovod 0.28.1 from the PyPI sdist with PyTorch + Gloo only (no MPI, TensorFlow, MXNet) into a
# wheel cached under .cache/wheels, then install it into the venv given as $1.
#
# Why a patch: Horovod 0.28.1 (the last release) compiles with C++14, but torch >= 2.1 headers need C++17.
# Upstream fixed this after the release (horovod PR #3998) by raising CMAKE_CXX_STANDARD to 17. We make the
# same change in the top-level CMakeLists.txt (it sets the standard for the vendored gloo too: gloo and the
# torch extension must agree or the link fails) and in horovod/torch/CMakeLists.txt.
# CMAKE_POLICY_VERSION_MINIMUM=3.5: pip's cmake 4 refuses gloo's cmake_minimum_required(VERSION 2.8).
set -euo pipefail
venv=$(cd "${1:?usage: build_horovod.sh VENV}" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
cache="$root/.cache/wheels"
py="$venv/bin/python"
mkdir -p "$cache"
whl=$(ls "$cache"/horovod-0.28.1-*.whl 2>/dev/null | head -1 || true)
if [ -z "$whl" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$py" -m pip download --quiet horovod==0.28.1 --no-binary :all: --no-deps -d "$work"
  tar -xzf "$work"/horovod-0.28.1.tar.gz -C "$work"
  src="$work/horovod-0.28.1"
  for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || { echo "build_horovod: expected C++14 line not found in $f" >&2; exit 1; }
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
  done
  echo "build_horovod: building horovod 0.28.1 (PyTorch + Gloo), a few minutes on 2 cores..."
  (cd "$src" && \
    CMAKE_POLICY_VERSION_MINIMUM=3.5 \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo \
    MAKEFLAGS="-j$(nproc)" \
    "$py" -m pip wheel --quiet --no-build-isolation --no-deps -w "$cache" .)
  whl=$(ls "$cache"/horovod-0.28.1-*.whl | head -1)
fi
"$py" -m pip install --quiet --no-deps "$whl"
# horovod's own runtime deps (cloudpickle, psutil, pyyaml, packaging) come with the project install.
"$py" -m pip install --quiet cloudpickle psutil packaging pyyaml
"$venv/bin/horovodrun" --check-build
