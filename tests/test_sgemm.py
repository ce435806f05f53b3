"""cnnext's packed float32 GEMM (csrc/cpu/sgemm.cpp), built on its own with the C++
compiler, against a plain triple loop: gemm() runs the AVX-512 micro-kernel where this CPU
has AVX-512F, the AVX2 one where it has AVX2 + FMA only, and plain loops elsewhere. Each
variant builds it natively or without AVX-512 code (CNNEXT_NO_AVX512) and runs it under a
CNNEXT_CPU_ISA cap (csrc/cpu/cpu_features.h), and must report the kernel that cap allows."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler found")


def _cpu_has(flag):
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


# variant: (build flags, CNNEXT_CPU_ISA cap)
VARIANTS = {"native": ([], "avx512"), "portable": (["-DCNNEXT_NO_AVX512"], "avx512"),
            "capped_avx2": ([], "avx2"), "capped_scalar": ([], "scalar")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sgemm_matches_triple_loop(tmp_path, variant):
    exe = tmp_path / "sgemm_check"
    flags, cap = VARIANTS[variant]
    subprocess.run(
        [CXX, "-std=c++17", "-O2", *flags, "-I", os.path.join(ROOT, "csrc"),
         *(os.path.join(ROOT, "csrc", f) for f in ("cpu/sgemm.cpp", "cpu/cpu_features.cpp", "paths.cpp")),
         os.path.join(ROOT, "tests", "cpp", "sgemm_check.cpp"),
         "-o", str(exe)],
        check=True,
    )
    env = dict(os.environ, CNNEXT_CPU_ISA=cap)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True, env=env).stdout.splitlines()
    avx2 = _cpu_has("avx2") and _cpu_has("fma")
    avx512 = avx2 and _cpu_has("avx512f")
    want = {"native": "avx512" if avx512 else "avx2" if avx2 else "plain", "portable": "plain",
            "capped_avx2": "avx2" if avx2 else "plain", "capped_scalar": "plain"}[variant]
    assert lines[0] == f"kernel={want}"
    cases = [line.split() for line in lines[1:]]
    assert len(cases) == 11 * 8  # the sizes of tests/cpp/sgemm_check.cpp, 8 variants each
    bad = [c for c in cases if float(c[6]) != 0.0]
    assert not bad, f"inexact results (M N K accumulate bias relu maxerr): {bad}"
