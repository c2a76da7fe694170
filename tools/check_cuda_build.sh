#!/usr/bin/env bash
# Proof that the CUDA kernels in ops/*.cu compile, on a machine without a GPU: nvcc compiles each .cu file to
# an object file (no link, no device needed) against the headers of the installed torch, with the flags
# torch.utils.cpp_extension would use. The CPU wheel of torch ships the c10/cuda headers the kernels include
# except one header that CMake generates for CUDA builds (c10/cuda/impl/cuda_cmake_macros.h, a single
# `#define C10_CUDA_BUILD_SHARED_LIBS`); where it is missing the script writes that one line into a temporary
# include folder. So no 5.5 GB CUDA build of torch is needed for this check (about 40 s on 2 cores).
# The kernels avoid ATen/cuda/CUDAContext.h on purpose: it pulls in cuBLAS/cuSPARSE headers that a bare
# nvcc install lacks; the current stream comes from c10/cuda/CUDAStream.h.
#
#   tools/check_cuda_build.sh            # sm_90 (H100/H200)
#   CUDA_ARCH=sm_80 tools/check_cuda_build.sh
#
# Env: VENV (default .venv), NVCC (default $CUDA_HOME/bin/nvcc or nvcc on PATH), CUDA_ARCH (default sm_90).
# Exit status: 0 when every .cu file compiles, 1 on a compile error, 2 when nvcc is missing.
# To build the real extension on a GPU machine (CUDA torch + nvcc): `pip install --no-build-isolation -e .`
# (setup.py adds ops/*.cu when torch.version.cuda and CUDA_HOME are set; TORCH_CUDA_ARCH_LIST picks the arch).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  if [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC="$CUDA_HOME/bin/nvcc"; else NVCC=$(command -v nvcc || true); fi
fi
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
  echo "[check_cuda_build] nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 2
fi
CUDA_ARCH=${CUDA_ARCH:-sm_90}

mapfile -t flags < <("$VENV/bin/python" - <<'PY'
import sysconfig
import torch
from torch.utils import cpp_extension as ce
for p in ce.include_paths():
    print("-I" + p)
print("-I" + sysconfig.get_paths()["include"])
for f in ce.COMMON_NVCC_FLAGS:
    print(f)
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
PY
)

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
torch_inc=$("$VENV/bin/python" -c "from torch.utils import cpp_extension as ce; print(ce.include_paths()[0])")
if [ ! -f "$torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  # CPU wheel: supply the CMake-generated config header (the only CUDA header it lacks).
  mkdir -p "$out/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
  flags+=("-I$out/shim")
fi
status=0
shopt -s nullglob
for cu in ops/*.cu; do
  obj="$out/$(basename "${cu%.cu}").o"
  echo "[check_cuda_build] $("$NVCC" --version | tail -1 | sed 's/^Build //') : $cu -> $CUDA_ARCH"
  if "$NVCC" -c "$cu" -o "$obj" -arch="$CUDA_ARCH" -std=c++17 -O3 -Xcompiler -fPIC \
      -DSCENE3D_WITH_CUDA=1 -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -Iops "${flags[@]}" \
      -diag-suppress 3306 -Xcompiler -Wno-c++20-extensions; then
    echo "[check_cuda_build] ok: $cu ($(stat -c %s "$obj") bytes)"
  else
    echo "[check_cuda_build] FAILED: $cu" >&2
    status=1
  fi
done
exit $status
