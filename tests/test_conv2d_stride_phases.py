"""Strided float32 convolutions by stride phases (csrc/cpu/conv2d_sgemm.cpp):

- the forward ("conv2d.sgemm.implicit_phases"): the padded input split into its SH x SW
  stride phases, so that the GEMM reads every tap at stride 1 in place, no im2col;
- the input gradient ("conv2d.input_grad.sgemm_phases", input_backward_phases), and so
  conv_transpose2d's forward: SH x SW stride-1 GEMMs on grad_output with each phase's taps
  of the weight, no col2im.

Checked against stock torch (float32 against a float64 stock reference, float64 to
rounding) over odd sizes, strides, paddings that crop, output_padding, phases no tap
reaches, groups, channels_last, thread counts, an empty batch and non-finite values; and
that other shapes keep their paths."""
import pytest
import torch
import torch.nn.functional as F

from cnnext._paths import counts, expect_path, runnable
from cnnext.functional import conv2d, conv_transpose2d
from conftest import assert_close_scaled, to_layout

PHASES = "conv2d.input_grad.sgemm_phases"
FWD_PHASES = "conv2d.sgemm.implicit_phases"

# conv2d forwards: (N, C, H, W, O, kernel, stride, padding, groups)
FORWARD = {
    "k3s2_odd": (2, 16, 45, 39, 24, 3, 2, 1, 1),
    "k11s4_one_channel": (2, 1, 99, 87, 12, 11, 4, 1, 1),
    "k7s2_pad3": (2, 3, 41, 40, 16, 7, 2, 3, 1),
    "rect": (2, 8, 21, 37, 16, (3, 2), (2, 1), (1, 0), 1),
    # A 2x2 kernel at stride 3: the taps read phase 0 and 1 only.
    "k2s3": (2, 8, 60, 62, 16, 2, 3, 0, 1),
    "k4s2_unpadded": (3, 8, 40, 41, 16, 4, 2, 0, 1),
    "groups": (2, 16, 36, 40, 24, 3, 2, 1, 2),
    "k5s3_groups": (2, 16, 62, 61, 24, 5, 3, 2, 2),
    "k3s3_rect_pad": (2, 8, 52, 70, 16, 3, (2, 3), (0, 1), 1),
}

# conv2d input gradients: (N, C, H, W, O, kernel, stride, padding, groups)
CONV = {
    "k3s2_odd": (3, 16, 37, 35, 24, 3, 2, 1, 1),
    "k4s2_pad2": (3, 20, 41, 45, 20, 4, 2, 2, 1),
    "k5s3": (4, 16, 60, 47, 8, 5, 3, 1, 1),
    "rect": (2, 16, 40, 33, 16, (3, 2), (2, 1), (1, 0), 1),
    # Padding 2 of a 3x3 stride 2: one phase reads grad_output cropped by a row.
    "k3s2_pad2": (4, 16, 30, 30, 16, 3, 2, 2, 1),
    "groups": (4, 32, 36, 36, 48, 3, 2, 1, 2),
}

# conv_transpose2d forwards: (N, C_in, H, W, C_out, kernel, stride, padding, output_padding, groups)
TRANSPOSED = {
    "k4s2": (2, 24, 23, 25, 16, 4, 2, 1, 0, 1),
    "k3s2_op1": (2, 24, 23, 25, 16, 3, 2, 1, 1, 1),
    "k3s3_op2": (3, 16, 20, 21, 16, 3, 3, 0, 2, 1),
    "groups": (2, 32, 24, 24, 32, 4, 2, 1, 0, 2),
}


def forward(fn, case, dtype, layout):
    n, c, h, w, o, k, s, p, g = FORWARD[case]
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(0)
    x = to_layout(torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype), layout)
    wt = torch.randn(o, c // g, kh, kw, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(o, generator=gen, dtype=torch.float64).to(dtype)
    return fn(x, wt, b, s, p, 1, g)


@pytest.mark.parametrize("case", list(FORWARD))
def test_forward_float32(case, threads):
    # The forward reads stride phases at a stride of 3 or more across (stride 2 gathers).
    sw = FORWARD[case][6] if isinstance(FORWARD[case][6], int) else FORWARD[case][6][1]
    before = counts()[FWD_PHASES]
    y = forward(conv2d, case, torch.float32, "contiguous")
    assert (counts()[FWD_PHASES] > before) == (sw > 2 and runnable(FWD_PHASES))
    ref = forward(F.conv2d, case, torch.float64, "contiguous")
    assert_close_scaled(y.double(), ref, 1e-5, "output")


def test_forward_strided_input():
    # A sliced input is read through its strides by the phase copy.
    big = torch.randn(2, 16, 74, 76)
    x = big[:, :, 2:-1, 3:-2]
    w = torch.randn(24, 16, 3, 3)
    with expect_path(FWD_PHASES):
        y = conv2d(x, w, None, 3, 1)
    assert_close_scaled(y.double(), F.conv2d(x.double(), w.double(), None, 3, 1), 1e-5, "output")


@pytest.mark.parametrize("case", list(FORWARD))
def test_forward_float64(case):
    torch.testing.assert_close(forward(conv2d, case, torch.float64, "contiguous"),
                               forward(F.conv2d, case, torch.float64, "contiguous"))


def test_forward_nonfinite_as_stock():
    x = torch.randn(2, 16, 58, 56)
    w = torch.randn(24, 16, 3, 3)
    x[0, 3, 0, 7] = float("inf")
    x[1, 2, 57, 55] = float("nan")
    x[1, 5, 20, 0] = float("-inf")
    with expect_path(FWD_PHASES):
        y = conv2d(x, w, None, 3, 1)
    ref = F.conv2d(x, w, None, 3, 1)
    assert y.isnan().any()
    assert torch.equal(y.isnan(), ref.isnan())
    assert torch.equal(y.isinf(), ref.isinf())
    fin = ref.isfinite()
    assert_close_scaled(y[fin], ref[fin], 1e-5, "output")


W_PHASES = "conv2d.weight_grad.sgemm_implicit_phases"


def weight_grad(fn, case, dtype, x_edit=None):
    n, c, h, w, o, k, s, p, g = FORWARD[case]
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    if x_edit:
        x_edit(x64)
    x = x64.to(dtype)
    wt = torch.randn(o, c // g, kh, kw, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    y = fn(x, wt, None, s, p, 1, g)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    return torch.autograd.grad(y, wt, gy)[0]


@pytest.mark.parametrize("case", list(FORWARD))
def test_weight_grad_float32(case, threads):
    # The weight gradient reads the stride phases of x in place (gemm_arows) where x has 4
    # channels per group or more; thinner inputs keep the gathered columns.
    n, c, h, w, o, k, s, p, g = FORWARD[case]
    before = counts()[W_PHASES]
    gw = weight_grad(conv2d, case, torch.float32)
    assert (counts()[W_PHASES] > before) == (c // g >= 4 and runnable(W_PHASES))
    ref = weight_grad(F.conv2d, case, torch.float64)
    assert_close_scaled(gw.double(), ref, 1e-5, "grad_weight")


def test_weight_grad_nonfinite_input_as_stock():
    # The extra columns multiply x by a zero of grad_output: a NaN there must not reach
    # entries that do not depend on it (the gathered recomputation takes over).
    def edit(x):
        x[0, 3, 0, 7] = float("nan")
        x[1, 2, 40, 33] = float("inf")
    with expect_path(W_PHASES, "conv2d.weight_grad.sgemm_gather"):
        gw = weight_grad(conv2d, "k3s2_odd", torch.float32, edit)
    ref = weight_grad(F.conv2d, "k3s2_odd", torch.float32, edit)
    assert gw.isnan().any()
    assert torch.equal(gw.isnan(), ref.isnan())
    assert torch.equal(gw.isinf(), ref.isinf())


def test_forward_dilated_and_pointwise_keep_gather():
    before = counts()[FWD_PHASES]
    for args in [((2, 16, 40, 40), (24, 16, 3, 3), 2, 1, 2), ((2, 16, 40, 40), (24, 16, 1, 1), 2, 0, 1)]:
        xs, ws, s, p, d = args
        x, w = torch.randn(xs), torch.randn(ws)
        assert_close_scaled(conv2d(x, w, None, s, p, d).double(),
                            F.conv2d(x.double(), w.double(), None, s, p, d), 1e-5, "output")
    assert counts()[FWD_PHASES] == before


def conv_input_grad(fn, case, dtype, layout, gy64=None):
    n, c, h, w, o, k, s, p, g = CONV[case]
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(0)
    x = to_layout(torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype), layout)
    wt = torch.randn(o, c // g, kh, kw, generator=gen, dtype=torch.float64).to(dtype)
    x.requires_grad_(True)
    y = fn(x, wt, None, s, p, 1, g)
    if gy64 is None:
        gy64 = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, to_layout(gy64.to(dtype), layout))
    return gx, gy64


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", list(CONV))
def test_conv2d_input_grad_float32(case, layout, threads):
    with expect_path(PHASES):
        gx, gy = conv_input_grad(conv2d, case, torch.float32, layout)
    ref, _ = conv_input_grad(F.conv2d, case, torch.float64, layout, gy)
    assert_close_scaled(gx.double(), ref, 1e-5, "grad_input")
    if layout == "channels_last":
        assert gx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", list(CONV))
def test_conv2d_input_grad_float64(case):
    gx, gy = conv_input_grad(conv2d, case, torch.float64, "contiguous")
    ref, _ = conv_input_grad(F.conv2d, case, torch.float64, "contiguous", gy)
    torch.testing.assert_close(gx, ref)


def transposed(fn, case, dtype, layout):
    n, c, h, w, o, k, s, p, op, g = TRANSPOSED[case]
    gen = torch.Generator().manual_seed(0)
    x = to_layout(torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype), layout)
    wt = torch.randn(c, o // g, k, k, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(o, generator=gen, dtype=torch.float64).to(dtype)
    return fn(x, wt, b, s, p, op, g)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", list(TRANSPOSED))
def test_conv_transpose2d_forward_float32(case, layout, threads):
    with expect_path(PHASES):
        y = transposed(conv_transpose2d, case, torch.float32, layout)
    ref = transposed(F.conv_transpose2d, case, torch.float64, layout)
    assert_close_scaled(y.double(), ref, 1e-5, "output")


@pytest.mark.parametrize("case", list(TRANSPOSED))
def test_conv_transpose2d_forward_float64(case):
    y = transposed(conv_transpose2d, case, torch.float64, "contiguous")
    ref = transposed(F.conv_transpose2d, case, torch.float64, "contiguous")
    torch.testing.assert_close(y, ref)


def test_empty_batch():
    x = torch.randn(0, 16, 40, 40, requires_grad=True)
    w = torch.randn(24, 16, 3, 3)
    y = conv2d(x, w, None, 2, 1)
    (gx,) = torch.autograd.grad(y, x, torch.randn(y.shape))
    assert gx.shape == x.shape
    y = conv_transpose2d(torch.randn(0, 24, 20, 20), w, None, 2, 1, 1)
    assert y.shape == (0, 16, 40, 40)


def test_nonfinite_grad_output_as_stock():
    x = torch.randn(3, 16, 40, 38, requires_grad=True)
    w = torch.randn(24, 16, 3, 3)
    y = conv2d(x, w, None, 2, 1)
    gy = torch.randn(y.shape)
    gy[0, 3, 5, 7] = float("inf")
    gy[1, 2, 0, 0] = float("nan")
    gy[1, 5, 19, 18] = float("-inf")
    with expect_path(PHASES):
        (gx,) = torch.autograd.grad(y, x, gy)
    xr = x.detach().requires_grad_(True)
    (ref,) = torch.autograd.grad(F.conv2d(xr, w, None, 2, 1), xr, gy)
    assert gx.isnan().any() and gx.isinf().any()
    assert torch.equal(gx.isnan(), ref.isnan())
    assert torch.equal(gx.isinf(), ref.isinf())
    fin = ref.isfinite()
    assert_close_scaled(gx[fin], ref[fin], 1e-5, "grad_input")


@pytest.mark.parametrize("shape", [
    (2, 16, 40, 40, 24, 3, 2, 1, 2),   # dilated
    (2, 4, 64, 64, 8, 3, 2, 1, 1),     # 4 input channels: thin panels, col2im
    (1, 16, 24, 24, 16, 3, 2, 1, 1),   # 144 output positions: a small map
    # Kernels smaller than their stride leave phases no tap reaches: col2im's path.
    (2, 32, 48, 48, 16, 1, 2, 0, 1),   # 1x1 stride 2
    (4, 16, 50, 50, 16, 2, 3, 0, 1),   # 2x2 stride 3
], ids=["dilated", "thin", "small", "pointwise_s2", "k2s3"])
def test_other_shapes_keep_col2im(shape):
    n, c, h, w, o, k, s, p, d = shape
    x = torch.randn(n, c, h, w, requires_grad=True)
    wt = torch.randn(o, c, k, k)
    y = conv2d(x, wt, None, s, p, d)
    gy = torch.randn(y.shape)
    before = counts()[PHASES]
    (gx,) = torch.autograd.grad(y, x, gy)
    assert counts()[PHASES] == before
    xr = x.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad(F.conv2d(xr, wt.double(), None, s, p, d), xr, gy.double())
    assert_close_scaled(gx.double(), ref, 1e-5, "grad_input")
