#!/usr/bin/env bash
# Build Horovod 0.28.1 from the PyPI sdist with PyTorch + Gloo only (no MPI, TensorFlow, MXNet) into a
# wheel cached under .cache/wheels/torch-<torch version>/, then install it into the venv given as $1.
# The cache is keyed by the torch the wheel was compiled against: the extension links against torch's C++
# ABI, so a wheel built for one torch must never be installed beside another (the pinned stack's 2.13.0+cpu
# and the modern stack's 2.14.1 each get their own).
#
# Why a patch: Horovod 0.28.1 (the last release) compiles with C++14, but torch >= 2.1 headers need C++17
# and torch >= 2.14 headers C++20 (torch/all.h and ATen/ATen.h `#error` below it). Upstream raised
# CMAKE_CXX_STANDARD to 17 after the release (horovod PR #3998). We raise it in the top-level CMakeLists.txt
# (it sets the standard for the vendored gloo too: gloo and the torch extension must agree or the link
# fails) and in horovod/torch/CMakeLists.txt, to the lowest standard the installed torch's headers accept:
# detected by preprocessing `#include <torch/extension.h>` with -std=c++17 and, if that hits an #error,
# -std=c++20 (under a second; nothing is hard-coded per torch version).
# CMAKE_POLICY_VERSION_MINIMUM=3.5: pip's cmake 4 refuses gloo's cmake_minimum_required(VERSION 2.8).
#
# Variants (second argument, default cpu):
#   cpu   Gloo for every collective (what this project's CPU stacks and CI use). With a CUDA build of torch
#         (the modern stack's torch 2.14.1+cu130) Horovod's CMake would detect CUDA on its own wherever a
#         toolkit is found (nvcc on PATH, /usr/local/cuda: top-level check_language(CUDA)/CUDAToolkit, and
#         FindPytorch's `torch.version.cuda and CUDA_HOME`, which then compiles the CUDA ops and links
#         torch_cuda/cudart). Horovod has no switch for that, so the script patches it off: CMakeLists.txt
#         gets CMAKE_CUDA_COMPILER="" and CMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit, FindPytorch.cmake
#         Pytorch_CUDA FALSE (a CppExtension build); the result is checked to link no CUDA library.
#         With a CPU build of torch (the pinned stack's 2.13.0+cpu) nothing is patched for CUDA, as before.
#   nccl  GPU ranks: HOROVOD_GPU_OPERATIONS=NCCL (allreduce/allgather/broadcast of CUDA tensors over NCCL),
#         Gloo still the controller and the CPU path. Needs, in the venv, a CUDA build of torch (the build
#         compiles against its CUDA headers) and nvcc on PATH (or CUDA_HOME); NCCL from pip
#         (nvidia-nccl-cu12 / -cu13, whichever matches torch's CUDA) is found through HOROVOD_NCCL_HOME, set
#         here from the installed package unless given. The wheel is cached separately
#         (.cache/wheels-nccl/torch-<version>/), and `horovodrun --check-build` must list NCCL under
#         "Available Tensor Operations" or the script fails.
#         Untested: no GPU machine has built it yet (see the README's GPU section).
set -euo pipefail
venv=$(cd "${1:?usage: build_horovod.sh VENV [cpu|nccl]}" && pwd)
variant=${2:-cpu}
root=$(cd "$(dirname "$0")/.." && pwd)
py="$venv/bin/python"
torch_version=$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null) || {
  echo "build_horovod: no torch in $venv (horovod compiles against the installed torch)" >&2; exit 1; }
torch_cuda=$("$py" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)
cuda_off=0
case "$variant" in
  cpu)
    cache="$root/.cache/wheels/torch-$torch_version"; gpu_env=()
    [ -z "$torch_cuda" ] || cuda_off=1
    ;;
  nccl)
    cache="$root/.cache/wheels-nccl/torch-$torch_version"
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
  # The C++ standard: the lowest of 17 and 20 at which torch's headers preprocess (an `#error` on
  # __cplusplus fails here, in under a second, instead of minutes into the build).
  cxx=${CXX:-c++}
  torch_includes=$("$py" -c 'import sysconfig; from torch.utils.cpp_extension import include_paths
print(" ".join("-I" + p for p in [*include_paths(), sysconfig.get_paths()["include"]]))' 2>/dev/null)
  cxx_std=
  for std in 17 20; do
    # shellcheck disable=SC2086  # word-split the -I list
    if echo '#include <torch/extension.h>' | "$cxx" -std=c++$std -E -x c++ $torch_includes - -o /dev/null 2>"$work/std$std.log"; then
      cxx_std=$std; break
    fi
  done
  [ -n "$cxx_std" ] || { echo "build_horovod: torch $torch_version's headers preprocess with neither -std=c++17 nor -std=c++20:" >&2
    cat "$work/std20.log" >&2; exit 1; }
  for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || { echo "build_horovod: expected C++14 line not found in $f" >&2; exit 1; }
    sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $cxx_std)/" "$f"
  done
  if [ "$cuda_off" = 1 ]; then
    # CPU variant against a CUDA build of torch: no CUDA detection (see the header). Both anchors are checked
    # so that a different sdist fails here rather than silently building with CUDA.
    grep -q '^# CUDA and ROCM$' "$src/CMakeLists.txt" &&
      grep -q '^string(TOUPPER "${Pytorch_CUDA}" Pytorch_CUDA)$' "$src/cmake/Modules/FindPytorch.cmake" || {
      echo "build_horovod: the CUDA-detection anchors were not found in the horovod sdist" >&2; exit 1; }
    sed -i 's/^# CUDA and ROCM$/# build_horovod.sh: CPU variant, CUDA detection off\nset(CMAKE_CUDA_COMPILER "")\nset(CMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit TRUE)\n&/' "$src/CMakeLists.txt"
    sed -i 's/^string(TOUPPER "${Pytorch_CUDA}" Pytorch_CUDA)$/&\nset(Pytorch_CUDA FALSE)  # build_horovod.sh: CPU variant/' \
      "$src/cmake/Modules/FindPytorch.cmake"
  fi
  echo "build_horovod: building horovod 0.28.1 ($variant: PyTorch + Gloo${gpu_env:+ + NCCL}) against torch $torch_version" \
    "with C++$cxx_std${torch_cuda:+, torch CUDA $torch_cuda}$([ "$cuda_off" = 1 ] && echo ', CUDA detection off'), a few minutes on 2 cores..."
  (cd "$src" && \
    env ${gpu_env[@]+"${gpu_env[@]}"} \
    CMAKE_POLICY_VERSION_MINIMUM=3.5 \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo \
    MAKEFLAGS="-j$(nproc)" \
    "$py" -m pip wheel --quiet --no-build-isolation --no-deps -w "$cache" .)
  whl=$(ls "$cache"/horovod-0.28.1-*.whl | head -1)
  if [ "$cuda_off" = 1 ] && unzip -l "$whl" | grep -q 'horovod/torch/mpi_lib_v2.*\.so$'; then
    # Nothing CUDA may be needed by the CPU variant's extension (patching the detection off must have held).
    lib=$(unzip -Z1 "$whl" | grep 'horovod/torch/mpi_lib_v2.*\.so$' | head -1)
    unzip -q -o "$whl" "$lib" -d "$work/check"
    if readelf -d "$work/check/$lib" | grep -Ei 'NEEDED.*(cuda|cudart|nccl)'; then
      rm -f "$whl"; echo "build_horovod: the cpu variant links CUDA libraries (above); wheel removed" >&2; exit 1
    fi
  fi
  printf 'torch %s\nC++%s\ncuda detection off: %s\n' "$torch_version" "$cxx_std" "$cuda_off" > "$cache/build-info.txt"
fi
# --force-reinstall: a horovod 0.28.1 already in the venv may have been built against another torch.
"$py" -m pip install --quiet --no-deps --force-reinstall "$whl"
# horovod's own runtime deps (cloudpickle, psutil, pyyaml, packaging) come with the project install.
"$py" -m pip install --quiet cloudpickle psutil packaging pyyaml
"$venv/bin/horovodrun" --check-build | tee "$cache/check-build.txt"
for want in PyTorch Gloo; do
  grep -q "\[X\] $want" "$cache/check-build.txt" || {
    echo "build_horovod: horovod was built without $want (see $cache/check-build.txt)" >&2; exit 1; }
done
if [ "$variant" = nccl ] && ! grep -q '\[X\] NCCL' "$cache/check-build.txt"; then
  echo "build_horovod: horovod was built without NCCL (see $cache/check-build.txt)" >&2; exit 1
fi
