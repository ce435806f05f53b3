"""cnnext's packed float32 GEMM (csrc/cpu/sgemm.cpp), built on its own with the C++
compiler, against a plain triple loop: the AVX-512 micro-kernel (where this CPU has
it), the portable version built without AVX-512 code, and the native build with AVX-512
turned off at run time (CNNEXT_CPU_ISA=avx2, csrc/cpu/cpu_features.h), which must report
the micro-kernel unavailable and not call it."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler found")


@pytest.mark.parametrize("variant", ["native", "portable", "capped"])
def test_sgemm_matches_triple_loop(tmp_path, variant):
    exe = tmp_path / "sgemm_check"
    flags = ["-DCNNEXT_NO_AVX512"] if variant == "portable" else []
    subprocess.run(
        [CXX, "-std=c++17", "-O2", *flags, "-I", os.path.join(ROOT, "csrc"),
         *(os.path.join(ROOT, "csrc", f) for f in ("cpu/sgemm.cpp", "cpu/cpu_features.cpp", "paths.cpp")),
         os.path.join(ROOT, "tests", "cpp", "sgemm_check.cpp"),
         "-o", str(exe)],
        check=True,
    )
    env = dict(os.environ, CNNEXT_CPU_ISA="avx2" if variant == "capped" else "avx512")
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True, env=env).stdout.splitlines()
    avx512 = lines[0] == "avx512=1"
    if variant != "native":
        assert not avx512
    if variant == "capped" or (variant == "native" and not avx512):
        # The micro-kernel is not called where it may not run.
        assert lines[1:] == []
        if variant == "native":
            pytest.skip("this CPU has no AVX-512F: the micro-kernel cannot run here")
        return
    cases = [line.split() for line in lines[1:]]
    assert len(cases) == 6 * 4
    bad = [c for c in cases if float(c[5]) != 0.0]
    assert not bad, f"inexact results (M N K accumulate bias maxerr): {bad}"
