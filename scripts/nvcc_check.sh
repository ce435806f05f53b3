#!/usr/bin/env bash
# Compile-checks every CUDA source without a GPU and without a CUDA build of torch:
#   1. each csrc/**/*.cu with nvcc for sm_80 and sm_90, warnings as errors;
#   2. each csrc/cuda/*.cpp (the torch side of the CUDA path) with the host compiler,
#      -fsyntax-only against torch's headers, when torch is importable.
# Both in C++17 and C++20 (recent torch, e.g. 2.13, builds extensions as C++20).
# Prints each file with OK or FAIL and exits non-zero if any failed. CI runs it.
#
# Environment: NVCC (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc), CXX (default g++),
# PYTHON (default python3), CUDA_HOME (the toolkit, whose include/ has cuda_runtime.h;
# default: wherever nvcc takes its headers from), NVCC_ARCH_FLAGS.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NVCC="${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}"
CXX="${CXX:-g++}"
PYTHON="${PYTHON:-python3}"
# Pairs of "-gencode arch=...,code=..."; the C++20 pass uses the last pair only, as PTX.
ARCH_FLAGS="${NVCC_ARCH_FLAGS:--gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90}"

failed=0
checked=0
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

report() {  # name, status (0 = OK)
  checked=$((checked + 1))
  if [ "$2" -eq 0 ]; then
    echo "OK    $1"
  else
    echo "FAIL  $1"
    sed 's/^/      /' "$log"
    failed=$((failed + 1))
  fi
}

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "FAIL  nvcc not found (set NVCC or CUDA_HOME)"
  exit 1
fi
echo "nvcc: $("$NVCC" --version | tail -n 1)"

# The CUDA runtime headers, for the host compiler in step 2: $CUDA_HOME/include, or
# the directory nvcc itself searches (nvcc may be a wrapper script outside the toolkit).
cuda_include() {
  if [ -n "${CUDA_HOME:-}" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
    echo "$CUDA_HOME/include"
    return
  fi
  "$NVCC" --dryrun -x cu -c -o /dev/null /dev/null 2>&1 |
    sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1
}
CUDA_INC="$(cuda_include)"

# 1. CUDA sources. The flags mirror setup.py's nvcc flags, plus the half/bfloat16
#    operator switches torch.utils.cpp_extension adds, so code that only compiles
#    without them fails here too. C++17 (CMakeLists.txt, older torch) for every
#    architecture, and C++20 (what recent torch, e.g. 2.13, passes in cpp_extension) for the last.
NVCC_FLAGS=(--expt-relaxed-constexpr -O3 -Icsrc
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -Werror all-warnings -Xcompiler -Wall,-Wextra)
read -r -a ARCHS <<<"$ARCH_FLAGS"
# The C++20 pass checks the language, not the machine code: PTX of the last
# architecture only (code=compute_XX), without ptxas, which is most of the time of the
# large kernels (the C++17 pass assembles every architecture).
LAST_ARCH=("${ARCHS[@]: -2}")
LAST_ARCH[1]="${LAST_ARCH[1]/code=sm_/code=compute_}"
mapfile -t cu_files < <(find csrc -name '*.cu' | sort)
for f in "${cu_files[@]}"; do
  { "$NVCC" -std=c++17 "${NVCC_FLAGS[@]}" "${ARCHS[@]}" -c -o /dev/null "$f" &&
    "$NVCC" -std=c++20 "${NVCC_FLAGS[@]}" "${LAST_ARCH[@]}" -c -o /dev/null "$f"; } >"$log" 2>&1
  report "$f" $?
done

# 2. The torch side of the CUDA path: syntax only, against the installed torch's
#    headers (a CPU wheel ships the ATen/c10 CUDA headers too). The generated
#    c10/cuda/impl/cuda_cmake_macros.h exists only in CUDA wheels, hence
#    C10_CUDA_NO_CMAKE_CONFIGURE_FILE.
mapfile -t cpp_files < <(find csrc/cuda -maxdepth 1 -name '*.cpp' | sort)
if [ "${#cpp_files[@]}" -gt 0 ]; then
  if TORCH_INC="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null)"; then
    PY_INC="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    for f in "${cpp_files[@]}"; do
      status=0
      for std in c++17 c++20; do
        "$CXX" -std=$std -fsyntax-only -Wall -Wextra -Werror \
          -DCNNEXT_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Icsrc \
          -isystem "$TORCH_INC" -isystem "$TORCH_INC/torch/csrc/api/include" \
          -isystem "$CUDA_INC" -isystem "$PY_INC" \
          "$f" >"$log" 2>&1 || { status=1; break; }
      done
      report "$f" $status
    done
  else
    echo "SKIP  csrc/cuda/*.cpp (torch is not importable with $PYTHON)"
  fi
fi

echo "$checked checked, $failed failed"
[ "$failed" -eq 0 ] && [ "$checked" -gt 0 ]
