#!/usr/bin/env bash
# Build Horovod 0.28.1 from the PyPI sdist with PyTorch + Gloo only (no MPI, TensorFlow, MXNet) into a
# wheel cached under .cache/wheels, then install it into the venv given as $1.
#
# Why a patch: Horovod 0.28.1 (the last release) compiles with C++14, but torch >= 2.1 headers need C++17.
# Upstream fixed this after the release (horovod PR #3998) by raising CMAKE_CXX_STANDARD to 17. We make the
# same change in the top-level CMakeLists.txt (it sets the standard for the vendored gloo too: gloo and the
# torch extension must agree or the link fails) and in horovod/torch/CMakeLists.txt.
# CMAKE_POLICY_VERSION_MINIMUM=3.5: pip's cmake 4 refuses gloo's cmake_minimum_required(VERSION 2.8).
#
# Variants (second argument, default cpu):
#   cpu   Gloo for every collective (what this project's CPU stack and CI use).
#   nccl  GPU ranks: HOROVOD_GPU_OPERATIONS=NCCL (allreduce/allgather/broadcast of CUDA tensors over NCCL),
#         Gloo still the controller and the CPU path. Needs, in the venv, a CUDA build of torch (the build
#         compiles against its CUDA headers) and nvcc on PATH (or CUDA_HOME); NCCL from pip
#         (nvidia-nccl-cu12 / -cu13, whichever matches torch's CUDA) is found through HOROVOD_NCCL_HOME, set
#         here from the installed package unless given. The wheel is cached separately (.cache/wheels-nccl),
#         and `horovodrun --check-build` must list NCCL under "Available Tensor Operations" or the script fails.
#         Untested: no GPU machine has built it yet (see the README's GPU section).
set -euo pipefail
venv=$(cd "${1:?usage: build_horovod.sh VENV [cpu|nccl]}" && pwd)
variant=${2:-cpu}
root=$(cd "$(dirname "$0")/.." && pwd)
py="$venv/bin/python"
case "$variant" in
  cpu) cache="$root/.cache/wheels"; gpu_env=() ;;
  nccl)
    cache="$root/.cache/wheels-nccl"
    "$py" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' || {
      echo "build_horovod: the nccl variant needs a CUDA build of torch in $venv (found a CPU build)" >&2; exit 1; }
    command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ] || {
      echo "build_horovod: the nccl variant needs nvcc on PATH or CUDA_HOME set" >&2; exit 1; }
    nccl_home=${HOROVOD_NCCL_HOME:-$("$py" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null || true)}
    [ -n "$nccl_home" ] || { echo "build_horovod: no NCCL: pip install nvidia-nccl-cu12 (or set HOROVOD_NCCL_HOME)" >&2; exit 1; }
    gpu_env=(HOROVOD_GPU_OPERATIONS=NCCL "HOROVOD_NCCL_HOME=$nccl_home" HOROVOD_NCCL_LINK=SHARED)
    ;;
  *) echo "build_horovod: unknown variant $variant (cpu or nccl)" >&2; exit 2 ;;
esac
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
  echo "build_horovod: building horovod 0.28.1 ($variant: PyTorch + Gloo${gpu_env:+ + NCCL}), a few minutes on 2 cores..."
  (cd "$src" && \
    env ${gpu_env[@]+"${gpu_env[@]}"} \
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
"$venv/bin/horovodrun" --check-build | tee "$cache/check-build.txt"
if [ "$variant" = nccl ] && ! grep -q '\[X\] NCCL' "$cache/check-build.txt"; then
  echo "build_horovod: horovod was built without NCCL (see $cache/check-build.txt)" >&2; exit 1
fi
