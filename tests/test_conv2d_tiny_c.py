"""The float32 forward for few input channels under large kernels (csrc/cpu/conv2d_tinyc.cpp:
output channels in the vector lanes, positions broadcast, no unfolding): AlexNet's first layer,
the ResNet stem, LeNet's layers, in NCHW and channels_last, against a float64 reference and
stock torch (forward and every gradient), with the path asserted through the path counters;
and the shapes it must leave to the other paths (groups, many channels, small kernels, few
output channels).

Which shapes it takes depends on the CPU's kernel: the AVX-512 one takes 1 to 4 input
channels and at least 16 output channels; the AVX2 one (path ``.avx2``) up to 8 input
channels and at least 4 output channels. ``on_path`` asserts the path a shape must take
here."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import cnnext
from cnnext._paths import counts, expect_path, require, runnable
from cnnext.functional import conv2d
from conftest import assert_close_scaled, to_layout

P = "conv2d.fwd.tiny_c_lanes"
PCL = P + ".channels_last_store"
PIX = P + ".pixel_rows"
P8 = P + ".avx2"
# The AVX-512 kernel runs where the AVX-512 GEMM does; else the AVX2 one (where P can run).
WIDE = runnable("sgemm.gemm")

# name: (N, C, H, W, O, kernel, stride, padding, dilation)
CASES = {
    # AlexNet's first layer, odd map: 3 blocks of 32 channels, stride 4.
    "alexnet_like": (2, 1, 61, 58, 96, 11, 4, 1, 1),
    # The ResNet stem on an odd map: 2 blocks, stride 2, padding 3.
    "stem_like": (2, 3, 37, 41, 64, 7, 2, 3, 1),
    # 48 channels: a last block of 16 (one vector); 40: a last block of 8 lanes.
    "last_block_16": (1, 2, 20, 23, 48, 5, 1, 2, 1),
    "last_block_8": (3, 4, 19, 17, 40, 5, 3, 0, 1),
    # 17 channels: one block, one lane of its second vector; 7 output columns (one short
    # tile), asymmetric kernel, stride and padding, dilation.
    "odd_channels": (2, 3, 15, 21, 17, (5, 7), (2, 3), (2, 1), 1),
    "dilated": (2, 1, 30, 33, 32, 5, (1, 2), (4, 3), (2, 3)),
    # Rows past one segment of 48 positions: 110 columns (48 + 48 + 14), and 60 (48 + 12)
    # with 3 channels, 64 output channels.
    "wide_row": (1, 1, 9, 110, 32, 5, 1, 2, 1),
    "wide_row_rgb": (2, 3, 8, 120, 64, 5, 2, 2, 1),
    # One output column; padding larger than the kernel reach on one side.
    "one_column": (2, 2, 12, 5, 16, 5, 2, 2, 1),
    # The AVX2 kernel's wider reach (the AVX-512 one leaves these to the GEMM paths): LeNet's
    # second layer (6 channels), 5 and 8 channels (pixel steps 5 and 8 in channels_last),
    # 8 and 6 output channels (LeNet's first layer: one vector, lanes unused).
    "lenet_conv2_like": (3, 6, 14, 13, 16, 5, 1, 0, 1),
    "five_channels": (2, 5, 20, 20, 32, 5, 1, 2, 1),
    "eight_channels": (2, 8, 11, 12, 12, 5, 1, 2, 1),
    "eight_outputs": (2, 1, 20, 20, 8, 5, 1, 2, 1),
    "lenet_conv1_like": (3, 1, 17, 19, 6, 5, 1, 2, 1),
}


def takes(xs, ws):
    """Whether this CPU's kernel takes a call of input shape xs, weight shape ws (groups 1,
    stride across at most 4, at least 25 taps)."""
    c, o, taps = xs[1], ws[0], ws[2] * ws[3]
    if WIDE:
        return c <= 4 and o >= 16
    return c <= 8 and o >= 4 and c * taps <= 1024


@contextlib.contextmanager
def on_path(xs, ws, *extra):
    """Asserts the path runs inside the block (with `extra` paths, and the kernel's own: the
    AVX2 one or not) where this CPU's kernel takes the shape, else that it does not run."""
    require(P)
    if takes(xs, ws):
        before = counts()[P8]
        with expect_path(P, *extra, *(() if WIDE else (P8,))):
            yield
        assert (counts()[P8] > before) == (not WIDE)
    else:
        before = counts()[P]
        yield
        assert counts()[P] == before


def shape_args(case):
    n, c, h, w, o, k, s, p, d = CASES[case]
    kh, kw = (k, k) if isinstance(k, int) else k
    return (n, c, h, w), (o, c, kh, kw), dict(stride=s, padding=p, dilation=d)


def run(xshape, wshape, args, layout, n=None, bias=True, groups=1):
    if n is not None:
        xshape = (n,) + tuple(xshape[1:])
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(*xshape, dtype=torch.float64, generator=gen)
    w0 = torch.randn(*wshape, dtype=torch.float64, generator=gen)
    b0 = torch.randn(wshape[0], dtype=torch.float64, generator=gen) if bias else None
    out = {}
    for name, fn, dt in (("ours", conv2d, torch.float32), ("stock", F.conv2d, torch.float32),
                         ("ref", F.conv2d, torch.float64)):
        x = to_layout(x0.to(dt), layout).requires_grad_(True)
        wt = to_layout(w0.to(dt), layout).requires_grad_(True)
        b = b0.to(dt).requires_grad_(True) if bias else None
        y = fn(x, wt, b, groups=groups, **args)
        gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dt)
        grads = torch.autograd.grad(y, (x, wt) + ((b,) if bias else ()), to_layout(gy, layout))
        out[name] = (y.detach(),) + grads
    return out


def check(res):
    for i, name in enumerate(["output", "grad_input", "grad_weight", "grad_bias"][: len(res["ours"])]):
        ours = res["ours"][i]
        assert ours.shape == res["ref"][i].shape
        assert_close_scaled(ours.double(), res["ref"][i], 1e-5, f"{name} vs float64")
        assert_close_scaled(ours, res["stock"][i], 1e-5, f"{name} vs stock")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients(case, threads):
    xs, ws, args = shape_args(case)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with on_path(xs, ws):
            res = run(xs, ws, args, "contiguous")
    finally:
        torch.set_num_threads(old)
    check(res)


@pytest.mark.parametrize("case", list(CASES))
def test_channels_last(case):
    """channels_last in and out: channels stored contiguous, no layout conversion (one
    input channel: a channels_last input is also contiguous, and the output is NCHW, as
    stock's)."""
    xs, ws, args = shape_args(case)
    c, s = xs[1], args["stride"] if isinstance(args["stride"], int) else args["stride"][1]
    # Pixels read whole from x where the step between positions (stride x channels) has
    # a tile instance (1, 2, 3, 4, 6, 8 floats); planar copies otherwise (last_block_8: 12,
    # odd_channels: 9).
    extra = [] if c == 1 else [PCL] + ([PIX] if s * c in (2, 3, 4, 6, 8) else [])
    before = counts()[PIX]
    with on_path(xs, ws, *extra):
        res = run(xs, ws, args, "channels_last")
    assert (counts()[PIX] > before) == (PIX in extra and takes(xs, ws))
    cl = torch.channels_last
    assert res["ours"][0].is_contiguous(memory_format=cl) == res["stock"][0].is_contiguous(memory_format=cl)
    assert res["ours"][0].is_contiguous(memory_format=cl) or xs[1] == 1
    check(res)


@pytest.mark.parametrize("layout", ["sliced", "permuted", "offset"])
@pytest.mark.parametrize("case", ["alexnet_like", "stem_like"])
def test_input_strides(case, layout):
    xs, ws, args = shape_args(case)
    with on_path(xs, ws):
        res = run(xs, ws, args, layout)
    check(res)


@pytest.mark.parametrize("case", ["stem_like", "odd_channels", "lenet_conv2_like"])
def test_no_bias_and_batch_of_one(case):
    xs, ws, args = shape_args(case)
    with on_path(xs, ws):
        check(run(xs, ws, args, "contiguous", bias=False))
        check(run(xs, ws, args, "contiguous", n=1))


def test_empty_batch():
    xs, ws, args = shape_args("stem_like")
    res = run(xs, ws, args, "contiguous", n=0)
    check(res)
    assert res["ours"][0].shape[0] == 0


@pytest.mark.parametrize("case", ["stem_like", "last_block_8", "lenet_conv1_like"])
def test_relu_epilogue(case):
    """conv_bn_relu2d's eval path: the folded weight through this kernel, ReLU as it stores."""
    xs, ws, args = shape_args(case)
    x, wt = torch.randn(*xs), torch.randn(*ws)
    o = ws[0]
    gamma, beta = torch.rand(o) + 0.5, torch.randn(o)
    mean, var = torch.randn(o), torch.rand(o) + 0.5
    with on_path(xs, ws):
        ours = cnnext.functional.conv_bn_relu2d(x, wt, None, gamma, beta, mean, var, False, relu=True, **args)
    ref = F.relu(F.batch_norm(F.conv2d(x, wt, None, **args), mean, var, gamma, beta, False))
    assert_close_scaled(ours, ref, 1e-5, "conv_bn_relu2d")


def test_deterministic_across_threads():
    xs, ws, args = shape_args("alexnet_like")
    x, wt = torch.randn(*xs), torch.randn(*ws)
    old = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(conv2d(x, wt, None, **args))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(y, outs[0]) for y in outs[1:])


# Shapes left to the other paths by either kernel: groups, 9 channels, a 3x3 kernel, 3
# output channels, stride 5 across, more than 1024 taps (8 x 11 x 12); float64 below.
FALLBACKS = {
    "groups": ((2, 4, 20, 20), (32, 2, 5, 5), dict(stride=1, padding=2), 2),
    "nine_channels": ((2, 9, 20, 20), (32, 9, 5, 5), dict(stride=1, padding=2), 1),
    "small_kernel": ((2, 3, 20, 20), (32, 3, 3, 3), dict(stride=1, padding=1), 1),
    "few_outputs": ((2, 1, 20, 20), (3, 1, 5, 5), dict(stride=1, padding=2), 1),
    "stride5": ((2, 1, 30, 30), (32, 1, 7, 7), dict(stride=5, padding=1), 1),
    "many_taps": ((1, 8, 16, 16), (16, 8, 11, 12), dict(stride=1, padding=2), 1),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_fallbacks(case):
    xs, ws, args, groups = FALLBACKS[case]
    before = counts()[P]
    check(run(xs, ws, args, "contiguous", groups=groups))
    assert counts()[P] == before


def test_float64_exact_path_untouched():
    xs, ws, args = shape_args("stem_like")
    x = torch.randn(*xs, dtype=torch.float64)
    wt = torch.randn(*ws, dtype=torch.float64)
    before = counts()[P]
    y = conv2d(x, wt, None, **args)
    assert counts()[P] == before
    torch.testing.assert_close(y, F.conv2d(x, wt, None, **args))


def test_nonfinite_as_stock():
    """Each output sums only its own window's taps: inf and NaN reach exactly the outputs
    whose windows hold them, as in stock."""
    xs, ws, args = shape_args("stem_like")
    x, wt = torch.randn(*xs), torch.randn(*ws)
    x[0, 1, 0, 5] = float("inf")
    x[1, 2, 20, 40] = float("nan")
    x[1, 0, 9, 0] = float("-inf")
    for fmt in (torch.contiguous_format, torch.channels_last):
        with on_path(xs, ws):
            y = conv2d(x.contiguous(memory_format=fmt), wt, None, **args)
        ref = F.conv2d(x, wt, None, **args)
        assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
        finite = ref.isfinite()
        assert_close_scaled(y[finite], ref[finite], 1e-5, "finite outputs")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_relu_keeps_nan(layout):
    """The fused ReLU maps x < 0 to 0 and keeps NaN as NaN, as stock's ReLU does (a
    max(x, 0) with x first in the vector instruction would turn NaN into 0), and +-inf as
    stock gives them."""
    xs, ws, args = shape_args("stem_like")
    x, wt = torch.randn(*xs), torch.randn(*ws)
    x[0, 1, 0, 5] = float("inf")
    x[1, 2, 20, 40] = float("nan")
    x[1, 0, 9, 0] = float("-inf")
    o = ws[0]
    gamma, beta = torch.rand(o) + 0.5, torch.randn(o)
    mean, var = torch.randn(o), torch.rand(o) + 0.5
    with on_path(xs, ws):
        ours = cnnext.functional.conv_bn_relu2d(x.contiguous(memory_format=layout), wt, None, gamma, beta, mean,
                                                var, False, relu=True, **args)
    ref = F.relu(F.batch_norm(F.conv2d(x, wt, None, **args), mean, var, gamma, beta, False))
    assert ref.isnan().any()
    assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.isinf(), ref.isinf())
    finite = ref.isfinite()
    assert_close_scaled(ours[finite], ref[finite], 1e-5, "finite outputs")
