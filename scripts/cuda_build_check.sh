#!/usr/bin/env bash
# Proves the real CUDA build of cnnext without a GPU: in a throwaway virtual environment,
#   1. installs the CUDA 13.0 wheel of torch 2.13.0 (2.13.0+cu130) with its CUDA packages;
#   2. builds cnnext from a copy of this tree (tracked and untracked-but-not-ignored files,
#      so no .so or build/ of the checkout is reused) with
#      FORCE_CUDA=1 pip install --no-build-isolation --no-deps, CUDA_HOME unset, so that
#      setup.py must find the toolkit behind the nvcc on PATH by itself;
#   3. imports it and checks (scripts/cuda_build_check.py): build_info()['cuda'] is True,
#      every cnnext op has a kernel for the CUDA dispatch key, and calling ops on tensors
#      whose device is CUDA enters cnnext's CUDA path and stops at the CUDA runtime's
#      missing-driver error (not a missing-kernel or "no CUDA kernels in this build" error).
# The virtual environment (about 5 GB) is deleted at the end, pass or fail.
#
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0),
# TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 2), KEEP_VENV=1 keeps the
# venv and prints its path, CUDA_BUILD_CHECK_DIR (default: a new folder under $TMPDIR).
# Takes 13-30 minutes on 2 cores (27 on a busy shared VM), almost all of it the compile.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
WORK="${CUDA_BUILD_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/cnnext-cuda-build.XXXXXX")}"
mkdir -p "$WORK"

cleanup() {
  rc=$?
  if [ "${KEEP_VENV:-0}" = 1 ]; then
    echo "cuda_build_check: kept $WORK"
  else
    rm -rf "$WORK"
  fi
  if [ "$rc" -ne 0 ]; then
    echo "cuda_build_check: FAILED (exit $rc) in stage: ${STAGE:-setup}" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT

T0=$SECONDS
stage() {  # name
  STAGE="$1"
  echo "== cuda_build_check [$(( SECONDS - T0 ))s]: $1"
}

stage "nvcc on PATH"
command -v nvcc >/dev/null || { echo "no nvcc on PATH" >&2; exit 1; }
nvcc --version | tail -n 1
echo "nvcc: $(command -v nvcc)  (CUDA_HOME=${CUDA_HOME:-unset}; the build below runs with CUDA_HOME unset)"

stage "virtual environment in $WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -qq --upgrade setuptools wheel ninja

stage "download $TORCH_SPEC, the default (CUDA) wheel"
# --isolated: the configuration's find-links may hold a CPU-only wheel of the same version.
"$VPY" -m pip download --quiet --isolated --disable-pip-version-check --no-deps --dest "$WORK/wheels" "$TORCH_SPEC"
ls "$WORK"/wheels/torch-*.whl

stage "install torch and its CUDA packages"
"$VPY" -m pip install -qq "$WORK"/wheels/torch-*.whl
"$VPY" -c 'import torch, sys; print("torch", torch.__version__, "CUDA", torch.version.cuda); sys.exit(0 if torch.version.cuda else "this torch is not a CUDA build")'
rm -rf "$WORK/wheels"

stage "copy the source tree"
mkdir "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
     [ -e "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
  tar -C "$ROOT" --exclude=build --exclude='*.so' --exclude='*.egg-info' --exclude=.git -cf - . | tar -xf - -C "$WORK/src"
fi
if find "$WORK/src" -name '*.so' -o -name build -type d | grep -q .; then
  echo "the copy holds a build product:" >&2
  find "$WORK/src" -name '*.so' -o -name build -type d >&2
  exit 1
fi

stage "build: FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS pip install --no-build-isolation --no-deps (CUDA_HOME unset)"
build_start=$SECONDS
(cd "$WORK/src" && env -u CUDA_HOME -u CUDA_PATH FORCE_CUDA=1 \
   "$VPY" -m pip install --no-build-isolation --no-deps --verbose . >"$WORK/build.log" 2>&1) || {
  echo "build failed; the end of its log:" >&2
  tail -n 80 "$WORK/build.log" >&2
  exit 1
}
grep -E '^cnnext:' "$WORK/build.log" || true
echo "built in $(( SECONDS - build_start ))s"

stage "import and check the CUDA registrations"
# Run from outside the source copy so that the installed package is the one imported.
(cd "$WORK" && "$VPY" -W "ignore:Failed to initialize NumPy" "$ROOT/scripts/cuda_build_check.py")

stage "done: the CUDA build of cnnext builds, imports and registers CUDA kernels for every op"
echo "total $(( SECONDS - T0 ))s"
