"""Kernel paths' instruction-set requirements (csrc/paths.h CNNEXT_PATH_NEEDS,
cnnext._paths.require): a path marked as needing an instruction set never runs where the
CPU (under the CNNEXT_CPU_ISA cap) lacks it, and expect_path skips instead of failing there.

The workload runs in a subprocess per cap (the cap is read once per process), so an
AVX-512 machine checks the markings under the avx2 and scalar caps too: a marked path that
runs without its instruction set (its kernel ignoring the cap) fails here, and so does a
workload that no longer reaches the gated paths where the CPU has their instruction set."""
import json
import os
import subprocess
import sys

import pytest

from cnnext import _C
from cnnext._paths import counts, expect_path, needs, runnable

# Float32 and bfloat16 convolutions (forward and both gradients, NCHW and channels_last,
# a 3x3 that Winograd takes on AVX-512, a 1 -> 16 channel 5x5 stem, a small map), pooling
# forward and backward: enough to reach every ISA-gated family where the CPU has the ISA.
WORKLOAD = r"""
import json, torch, cnnext
from cnnext import _C
F = cnnext.functional
torch.manual_seed(0)
def conv(dtype, shape, o, k, stride=1, pad=1, cl=False):
    x = torch.randn(*shape, dtype=dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(o, shape[1], k, k, dtype=dtype, requires_grad=True)
    F.conv2d(x, w, None, stride, pad).sum().backward()
for dt in (torch.float32, torch.bfloat16):
    conv(dt, (2, 16, 20, 20), 32, 3)
    conv(dt, (2, 64, 28, 28), 64, 3)
    conv(dt, (2, 16, 20, 20), 32, 3, cl=True)
    conv(dt, (2, 1, 28, 28), 16, 5, pad=2)
    conv(dt, (4, 64, 3, 3), 64, 3)
    conv(dt, (2, 16, 17, 17), 24, 3, stride=2)
for dt in (torch.float32, torch.bfloat16):
    for cl in (False, True):
        x = torch.randn(2, 32, 16, 16, dtype=dt)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        y, i = F.max_pool2d(x, 3, 2, 1, return_indices=True)
        (y.float().sum() + F.avg_pool2d(x, 3, 2, 1).float().sum()).backward()
print(json.dumps({"isa": _C._cpu_isa(), "counts": _C._path_counts(), "needs": _C._path_needs()}))
"""


def run_workload(cap):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CNNEXT_CPU_ISA=cap)
    out = subprocess.run([sys.executable, "-c", WORKLOAD], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cap", ["avx512", "avx2", "scalar"])
def test_gated_paths_run_only_where_the_cpu_has_their_isa(cap):
    got = run_workload(cap)
    ran = {n for n, c in got["counts"].items() if c}
    gated = {n: ok for n, (what, ok) in got["needs"].items() if what != "nothing"}
    # Something ran, and whatever needs an ISA the capped CPU lacks did not.
    assert ran
    bad = sorted(n for n in ran if n in gated and not gated[n])
    assert not bad, f"paths ran without their instruction set under CNNEXT_CPU_ISA={cap}: {bad}"
    if cap == "scalar":
        assert got["isa"] == "scalar" and not any(gated.values())
    if got["isa"] == "avx512":
        # With the ISA at hand the workload reaches the float32 GEMM's family, and the
        # bfloat16 GEMM's where the CPU has AVX512_BF16.
        assert "conv2d.fwd.sgemm" in ran or "conv2d.winograd.f4x4" in ran
        if gated["conv2d.fwd.bf16_gemm"]:
            assert "conv2d.fwd.bf16_gemm" in ran or "conv2d.fwd.bf16_gemm_pairs" in ran


# Winograd's float32 forward, input and weight gradients (and the packed GEMM they run on)
# have AVX2 kernels too, and so do its bfloat16 forward and input gradient. So do the
# few-channel forward's paths (tiny_c: an AVX-512 and an AVX2 kernel) and its AVX2 gradients.
AVX2_WINOGRAD = {"sgemm.gemm_avx2", "conv2d.winograd.avx2", "conv2d.winograd.avx2_row_loads",
                 "conv2d.winograd.avx2_row_stores", "conv2d.input_grad.winograd", "conv2d.weight_grad.winograd",
                 "conv2d.winograd.split5x5", "conv2d.input_grad.winograd_split5x5", "conv2d.weight_grad.winograd_split5x5",
                 "conv2d.fwd.winograd_bf16",
                 "conv2d.input_grad.winograd_bf16"} | {
    f"conv2d.winograd.{p}" for p in ("f2x2", "f4x4", "f6x6", "nonfinite_fallback", "weight_cache_hit",
                                     "weight_cache_miss", "shared_input")}


def test_every_gated_family_is_marked():
    # The float32 GEMM's paths, the bfloat16 GEMM's and direct kernels', the vector max pooling's: each names
    # what it needs, so expect_path can skip it where it cannot run.
    table = _C._path_needs()
    for name, (what, _) in table.items():
        if name in AVX2_WINOGRAD or "tiny_c" in name:
            assert what == "avx2", (name, what)
        elif name.startswith("sgemm.") or ".sgemm" in name or "winograd" in name:
            assert what == "avx512f", (name, what)
        elif ("bf16_gemm" in name or "bf16_sweeps" in name or "bf16_direct" in name
              or name.endswith(("bf16_flip", "bf16_phases"))):
            assert what == "avx512_bf16", (name, what)
        elif "avx512" in name:
            assert what == "avx512", (name, what)
        elif name.endswith("avx2"):
            assert what == "avx2", (name, what)
        else:
            assert what == "nothing", (name, what)


def test_expect_path_skips_a_path_this_cpu_cannot_run():
    gated = [n for n, (what, ok) in _C._path_needs().items() if not ok]
    if not gated:
        pytest.skip(f"this CPU ({_C._cpu_isa()}) can run every kernel path")
    before = counts()
    with pytest.raises(pytest.skip.Exception, match="needs"):
        with expect_path(gated[0]):
            raise AssertionError("the block must not run")
    assert counts() == before
    assert not runnable(gated[0]) and needs(gated[0])[0] != "nothing"


def test_unknown_path_still_fails():
    with pytest.raises(AssertionError, match="unknown kernel path"):
        with expect_path("conv2d.no_such_path"):
            pass
