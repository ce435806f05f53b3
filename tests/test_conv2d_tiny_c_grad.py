"""The float32 gradients of few-channel convolutions on CPUs with AVX2 + FMA and no AVX-512F
(csrc/cpu/conv2d_tinyc_grad.cpp): the input gradient as a direct convolution of grad_output
zero-padded (8 positions of a gx row a vector), the weight gradient as dot products over
rows padded to the input's padded width. Against a float64 reference (float32 sums over at
most a few thousand terms: within 1e-5 of the largest value), every output channel and tap
count the register tiles split unevenly, both layouts, bands of rows, thread counts, the
NaN / Inf patterns of stock, and the shapes they leave to the other paths.

On an AVX-512 CPU the float32 gradients take the AVX-512 GEMM instead: the whole file then
runs in a subprocess under CNNEXT_CPU_ISA=avx2 (test_under_avx2_cap)."""
import os

import pytest
import torch
import torch.nn.functional as F

from cnnext._paths import counts, expect_path, runnable
from cnnext.functional import conv2d
from conftest import assert_close_scaled, rerun_under_avx2_cap, to_layout

GX = "conv2d.input_grad.tiny_c_rows"
GW = "conv2d.weight_grad.tiny_c_flat"
NONFINITE = "conv2d.tiny_c_grad.nonfinite_fallback"
# The kernels run where the AVX2 transforms can and the AVX-512 GEMM does not.
HERE = runnable(GX) and not runnable("sgemm.gemm")
needs_avx2 = pytest.mark.skipif(not HERE, reason="the AVX2 few-channel gradients do not run on this CPU")

# (N, C, H, W, O, (KH, KW), (PH, PW))
CASES = {
    "lenet_conv2": (5, 6, 14, 14, 16, (5, 5), (0, 0)),
    "lenet_conv1": (3, 1, 32, 32, 6, (5, 5), (2, 2)),
    # 7 channels: blocks of 6 and 1 (2 x 6 and 8 x 1 accumulator tiles); 9 output channels:
    # a part block of the weight gradient's 4.
    "seven_channels": (2, 7, 11, 13, 9, (5, 5), (1, 2)),
    # 8 channels (6 + 2), 13 output channels, a 5 x 7 kernel padded to its reach minus one.
    "eight_channels": (2, 8, 9, 10, 13, (5, 7), (4, 6)),
    # 3 and 4 channels: row tiles of 4 and of 3 (a band's last tile runs past it).
    "three_channels": (3, 3, 17, 9, 4, (5, 5), (2, 2)),
    "four_channels": (2, 4, 19, 21, 16, (6, 6), (5, 0)),
    "five_channels": (1, 5, 10, 8, 5, (5, 5), (3, 3)),
    "two_channels": (2, 2, 13, 16, 8, (5, 5), (2, 2)),
    # One output position.
    "one_output": (1, 2, 5, 5, 4, (5, 5), (0, 0)),
    # Several bands of rows in both gradients (the weight gradient's of 9 rows here).
    "bands": (1, 8, 40, 200, 16, (5, 5), (2, 2)),
}


def make(case, layout="contiguous", seed=0):
    n, c, h, w, o, k, p = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    wt = torch.randn(o, c, *k, generator=gen, dtype=torch.float64)
    gy = torch.randn(F.conv2d(x, wt, None, 1, p).shape, generator=gen, dtype=torch.float64)
    return to_layout(x, layout), wt, to_layout(gy, layout), p


def grads(fn, x, wt, gy, p):
    xs, ws = x.clone().requires_grad_(), wt.clone().requires_grad_()
    return torch.autograd.grad(fn(xs, ws, None, 1, p), (xs, ws), gy)


@needs_avx2
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradients(case, layout):
    x, wt, gy, p = make(case, layout)
    with expect_path(GX, GW):
        gx, gw = grads(conv2d, x.float(), wt.float(), gy.float(), p)
    rx, rw = grads(F.conv2d, x, wt, gy, p)
    assert_close_scaled(gx.double(), rx, 1e-5, "grad_input")
    assert_close_scaled(gw.double(), rw, 1e-5, "grad_weight")
    # gx in the input's layout, as stock's.
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert gx.is_contiguous(memory_format=fmt)


@needs_avx2
def test_strided_views():
    """grad_output and the input through views with gaps (every stride read as given)."""
    x, wt, gy, p = make("seven_channels")
    xv = torch.randn(2, 7, 11, 26, dtype=torch.float64)[..., ::2]
    xv.copy_(x)
    gyv = torch.randn(2, 9, gy.shape[2], gy.shape[3] * 3, dtype=torch.float64)[..., 1::3]
    gyv.copy_(gy)
    with expect_path(GX, GW):
        gx, gw = grads(conv2d, xv.float(), wt.float(), gyv.float(), p)
    rx, rw = grads(F.conv2d, x, wt, gy, p)
    assert_close_scaled(gx.double(), rx, 1e-5, "grad_input")
    assert_close_scaled(gw.double(), rw, 1e-5, "grad_weight")


@needs_avx2
@pytest.mark.parametrize("case", ["lenet_conv2", "bands", "seven_channels"])
def test_deterministic_across_threads(case):
    """Each gx element is one item's sum and the weight gradient's sets of bands are fixed by
    the shape: the results are bitwise the same for any thread count."""
    x, wt, gy, p = make(case)
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(grads(conv2d, x.float(), wt.float(), gy.float(), p))
    finally:
        torch.set_num_threads(old)
    for gx, gw in outs[1:]:
        assert torch.equal(gx, outs[0][0]) and torch.equal(gw, outs[0][1])


def assert_same_pattern(a, ref, what):
    assert torch.equal(a.isnan(), ref.isnan()), what
    assert torch.equal(a.isinf(), ref.isinf()) and torch.equal(a[a.isinf()], ref[ref.isinf()]), what
    fin = ref.isfinite()
    assert_close_scaled(a[fin].double(), ref[fin].double(), 1e-5, what)


@needs_avx2
def test_nonfinite_as_stock():
    """Stock sums only the terms inside the input. A non-finite weight would meet the input
    gradient's zero padding, a non-finite input or grad_output value the weight gradient's:
    those calls hand over (the GEMM path's input gradient, the direct loops' weight gradient)
    and give stock's NaN / Inf pattern; a non-finite grad_output keeps the input gradient's
    kernel, which then matches stock too."""
    x, wt, gy, p = make("lenet_conv1")
    x, wt, gy = x.float(), wt.float(), gy.float()
    gy_bad = gy.clone()
    gy_bad[0, 2, 0, 0] = float("inf")
    gy_bad[1, 4, 31, 5] = float("-inf")
    gy_bad[2, 1, 6, 6] = float("nan")
    x_bad = x.clone()
    x_bad[1, 0, 0, 3] = float("inf")
    w_bad = wt.clone()
    w_bad[3, 0, 0, 4] = float("-inf")
    for xx, ww, gg, paths in [(x, wt, gy_bad, (GX, NONFINITE, "conv2d.weight_grad.direct")),
                              (x_bad, wt, gy, (GX, NONFINITE, "conv2d.weight_grad.direct")),
                              (x, w_bad, gy, (GW, NONFINITE))]:
        with expect_path(*paths):
            gx, gw = grads(conv2d, xx, ww, gg, p)
        rx, rw = grads(F.conv2d, xx, ww, gg, p)
        assert_same_pattern(gx, rx, "grad_input")
        assert_same_pattern(gw, rw, "grad_weight")
        assert gx.isfinite().all() or not rx.isfinite().all()


# Shapes the kernels leave to the other paths: stride, dilation, groups, too many or too few
# channels, a small kernel, padding as large as the kernel.
FALLBACKS = {
    "stride_2": ((2, 3, 15, 15), (8, 3, 5, 5), dict(stride=2, padding=2)),
    "dilation_2": ((2, 3, 15, 15), (8, 3, 5, 5), dict(dilation=2, padding=1)),
    "groups_2": ((2, 4, 12, 12), (8, 2, 5, 5), dict(groups=2)),
    "seventeen_outputs": ((2, 3, 12, 12), (17, 3, 5, 5), dict(padding=2)),
    "three_outputs": ((2, 3, 12, 12), (3, 3, 5, 5), dict(padding=2)),
    "nine_channels": ((2, 9, 12, 12), (8, 9, 5, 5), dict(padding=2)),
    "kernel_3x3": ((2, 3, 12, 12), (8, 3, 3, 3), dict(padding=1)),
    "padding_5": ((1, 2, 8, 8), (4, 2, 5, 5), dict(padding=5)),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_fallbacks(case):
    xs, ws, kw = FALLBACKS[case]
    gen = torch.Generator().manual_seed(3)
    x, wt = torch.randn(xs, generator=gen, dtype=torch.float64), torch.randn(ws, generator=gen, dtype=torch.float64)
    stride, padding, dilation, groups = (kw.get(k, d) for k, d in
                                         (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)))
    gy = torch.randn(F.conv2d(x, wt, None, stride, padding, dilation, groups).shape, generator=gen,
                     dtype=torch.float64)
    before = counts()

    def run(fn, xx, ww, gg):
        xr, wr = xx.clone().requires_grad_(), ww.clone().requires_grad_()
        return torch.autograd.grad(fn(xr, wr, None, stride, padding, dilation, groups), (xr, wr), gg)

    gx, gw = run(conv2d, x.float(), wt.float(), gy.float())
    after = counts()
    assert after[GX] == before[GX] and after[GW] == before[GW]
    rx, rw = run(F.conv2d, x, wt, gy)
    assert_close_scaled(gx.double(), rx, 1e-5, "grad_input")
    assert_close_scaled(gw.double(), rw, 1e-5, "grad_weight")


@pytest.mark.skipif(HERE or not runnable(GX) or os.environ.get("CNNEXT_CPU_ISA") == "avx2",
                    reason="runs the file under the AVX2 cap on CPUs with AVX-512F")
def test_under_avx2_cap():
    """On an AVX-512 CPU: this file again with CNNEXT_CPU_ISA=avx2, where the kernels run."""
    rerun_under_avx2_cap(__file__, "test_under_avx2_cap")
