"""The CPU vector layer (csrc/cpu/vec.h) through its test entries on cnnext._C: float32 ->
bfloat16 / float16 narrowing bit for bit as torch's .to() (round to nearest even), the
exact widening back, and the bfloat16 dot product (vdpbf16ps on CPUs with AVX512_BF16)
against float64; each with the instruction set this CPU allows and, in a subprocess, with
CNNEXT_CPU_ISA=scalar (csrc/cpu/cpu_features.h), which runs the scalar fallbacks."""
import os
import subprocess
import sys

import pytest
import torch

import cnnext
from cnnext import _C


def special_floats(n, seed):
    """Random floats of every magnitude (normal, subnormal in bfloat16 and float16, values
    over float16's range), exact ties between two bfloat16 / float16 neighbours, and the
    specials: +-0, +-inf, NaN."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2**31, 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[torch.isfinite(x)]
    scaled = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 20, (n,), generator=gen).float())
    # halfway cases: a bfloat16 value plus half an ulp (ties to even), and float16 likewise
    b = torch.randn(n // 4, generator=gen).to(torch.bfloat16).float()
    b_ties = (b.view(torch.int32) + 0x8000).view(torch.float32)
    h = torch.randn(n // 4, generator=gen).to(torch.float16).float()
    h_ties = (h.view(torch.int32) + 0x1000).view(torch.float32)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65520.0, 1e-8, -1e-8,
                             3.0e38, 5.96e-8, 2.98e-8])
    return torch.cat([x, scaled, b_ties, h_ties, specials])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 33, 1000])
def test_narrow_matches_torch_bitwise(dtype, n):
    x = special_floats(4 * n, n)[: max(n, 64)]
    got = _C._vec_narrow(x, dtype)
    want = x.to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    back = _C._vec_widen(got)
    assert torch.equal(back.view(torch.int32), want.float().view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nan_stays_nan(dtype):
    x = torch.tensor([float("nan"), -float("nan"), 1.0] * 11)
    y = _C._vec_narrow(x, dtype)
    assert torch.equal(torch.isnan(y), torch.isnan(x))
    assert torch.equal(torch.isnan(_C._vec_widen(y)), torch.isnan(x))


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 64, 1000])
def test_bf16_dot_against_float64(n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16)
    want = float((a.double() * b.double()).sum())
    got = _C._vec_dot_bf16(a, b)
    # float accumulation of exact products (bfloat16 x bfloat16 fits in float)
    assert abs(got - want) <= 1e-6 * float((a.double() * b.double()).abs().sum()) + 1e-30


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_capped_isa(isa):
    """The scalar fallbacks, and the AVX2 conversions (which an AVX-512 CPU would not run
    otherwise), under CNNEXT_CPU_ISA."""
    if isa == "avx2" and _C._cpu_isa() == "scalar":
        pytest.skip("this CPU has no AVX2")
    script = """
import torch, sys
sys.path.insert(0, {tests!r})
import test_cpu_vec as T
from cnnext import _C
assert _C._cpu_isa() == {isa!r}, _C._cpu_isa()
for dtype in (torch.bfloat16, torch.float16):
    for n in (1, 17, 1000):
        T.test_narrow_matches_torch_bitwise(dtype, n)
    T.test_nan_stays_nan(dtype)
for n in (0, 33, 1000):
    T.test_bf16_dot_against_float64(n)
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(cnnext.__file__)))
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", script.format(tests=tests, isa=isa)], cwd=root,
                         env=dict(os.environ, CNNEXT_CPU_ISA=isa), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "ok"
