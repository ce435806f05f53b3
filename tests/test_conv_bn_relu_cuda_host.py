"""The arithmetic of the CUDA conv_bn_relu2d kernels, run on the CPU: no GPU needed, only nvcc.

csrc/cuda/conv_bn_relu2d.cu writes each kernel as a thin loop around a __host__ __device__
body (bn_moment_partial, bn_normalize_element, bn_backward_partial, bn_backward_element).
tests/cuda_host/conv_bn_relu2d_host.cu includes that file and runs the bodies on the host
as the kernels would (the reductions as `split` partial sums added in order; block_sum's
tree order is device-only), for float16, bfloat16, float32 and float64, contiguous and
channels_last strides. Each case is compared with a float64 reference computed from the
very (rounded) inputs the program read. Not covered here: the __global__ wrappers, the
launch configuration and block_sum (tests/test_conv_bn_relu.py covers them on a GPU).
"""
import itertools
import struct

import pytest
import torch

from cnnext.testing import DTYPE_CODE, TOLERANCES, needs_nvcc, run_host_harness

pytestmark = needs_nvcc

# Relative to max |reference|. The statistics accumulate in float (double for float64);
# outputs are rounded once to the dtype at the end.
RTOL = TOLERANCES["host_conv_bn_relu"]
SHAPES = [(2, 3, 5, 4), (4, 5, 9, 11), (1, 2, 1, 3)]
CASES = list(itertools.product(SHAPES, RTOL, (False, True), (True, False), (True, False), (1, 256)))
EPS = 1e-3


def case_id(case):
    shape, dtype, cl, relu, affine, split = case
    return (f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{'cl' if cl else 'contig'}-"
            f"{'relu' if relu else 'norelu'}-{'affine' if affine else 'noaffine'}-split{split}")


def inputs(case, seed):
    shape, dtype, cl, relu, affine, split = case
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    y = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype).double()
    gr = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).double()
    gamma = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype).double()
    beta = torch.randn(c, generator=g, dtype=torch.float64).to(dtype).double()
    return y, gr, gamma, beta


def dense(t, cl):
    return (t.permute(0, 2, 3, 1) if cl else t).contiguous().reshape(-1)


def record(case, y, gr, gamma, beta):
    shape, dtype, cl, relu, affine, split = case
    head = struct.pack("<9q", DTYPE_CODE[dtype], *shape, int(cl), int(relu), int(affine), split)
    arrays = [struct.pack("<d", EPS)] + [struct.pack(f"<{t.numel()}d", *t.tolist()) for t in
                                         (dense(y, cl), dense(gr, cl), gamma, beta)]
    return head + b"".join(arrays)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    data = [inputs(case, seed) for seed, case in enumerate(CASES)]
    raw = run_host_harness(tmp_path_factory, "conv_bn_relu2d_host.cu", [record(c, *t) for c, t in zip(CASES, data)],
                           CASES)
    values = torch.tensor(struct.unpack(f"<{len(raw) // 8}d", raw), dtype=torch.float64)
    out, pos = {}, 0
    for case, t in zip(CASES, data):
        shape, c, n = case[0], case[0][1], case[0][0] * case[0][1] * case[0][2] * case[0][3]
        parts = []
        for size in (c, c, n, 2 * c, n):
            parts.append(values[pos:pos + size])
            pos += size
        out[case] = t, parts
    assert pos == values.numel()
    return out


def from_dense(v, shape, cl):
    n, c, h, w = shape
    return v.view(n, h, w, c).permute(0, 3, 1, 2) if cl else v.view(shape)


def assert_close(got, want, rtol, what):
    scale = max(want.abs().max().item(), 1e-30)
    err = (got - want).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} * {scale:.3e}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_bodies(results, case):
    shape, dtype, cl, relu, affine, split = case
    (y, gr, gamma, beta), (mean, var, out, sums, dy) = results[case]
    out, dy = from_dense(out, shape, cl), from_dense(dy, shape, cl)
    rtol = RTOL[dtype]
    m = y.shape[0] * y.shape[2] * y.shape[3]
    want_mean = y.mean((0, 2, 3))
    want_var = y.var((0, 2, 3), unbiased=False)
    assert_close(mean, want_mean, rtol, "mean")
    assert_close(var, want_var, rtol, "var")
    view = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    invstd = (want_var + EPS).rsqrt()
    xhat = (y - view(want_mean)) * view(invstd)
    g_aff, b_aff = (gamma, beta) if affine else (torch.ones_like(gamma), torch.zeros_like(beta))
    want_out = xhat * view(g_aff) + view(b_aff)
    if relu:
        want_out = want_out.clamp_min(0)
    # Output rounding to the dtype: half an ulp of max |out| on top of the statistics' error.
    assert_close(out, want_out, rtol, "out")
    gm = torch.where(out > 0, gr, torch.zeros_like(gr)) if relu else gr  # the program's own mask
    want_dgamma, want_dbeta = (gm * xhat).sum((0, 2, 3)), gm.sum((0, 2, 3))
    assert_close(sums[:shape[1]], want_dgamma, rtol * 4, "grad_bn_weight")
    assert_close(sums[shape[1]:], want_dbeta, rtol * 4, "grad_bn_bias")
    want_dy = view(g_aff * invstd) * (gm - view(want_dbeta) / m - xhat * view(want_dgamma) / m)
    assert_close(dy, want_dy, rtol * 4, "grad_conv_out")
