"""The at::mm convolution on small maps multiplies samples in blocks (csrc/cpu/conv2d.cpp
sample_blocks: fewer than 64 output positions a sample, or a GEMM under 2^20 MACs a
sample; the columns of several samples side by side, one GEMM a block and group) in the
forward and both gradients; and its channels_last forward (rows of taps per output position,
one GEMM writing the output's rows).

That code runs for float64 on every CPU and for float32 where the CPU has no AVX-512F (the
float32 GEMM of csrc/cpu/sgemm.cpp needs it), so the float64 cases here reach it anywhere
and the float32 ones where it is float32's path. Winograd (which takes float32 3x3 stride-1
layers on AVX2 CPUs too: tests/test_conv2d_winograd.py) is off here."""
import pytest
import torch
import torch.nn.functional as F

import cnnext.backends.cpu as cpu_backend

from cnnext._paths import counts, expect_path, runnable
from cnnext.functional import conv2d, conv_bn_relu2d
from conftest import assert_close_scaled



@pytest.fixture(autouse=True)
def _no_winograd():
    with cpu_backend.flags(winograd=False):
        yield


BLOCKS = ("conv2d.fwd.mm_sample_blocks", "conv2d.input_grad.mm_sample_blocks",
          "conv2d.weight_grad.mm_sample_blocks")

# (N, C, H, W, O, kernel, stride, padding, dilation, groups): small maps (< 64 output
# positions), a partial last block (odd N), groups, strides, dilation, a 1x1 stride-1
# unpadded ("pointwise": gx copied, not added), a rectangular map and kernel.
CASES = {
    "resnet_l4": (5, 32, 3, 3, 24, 3, 1, 1, 1, 1),
    "down": (7, 16, 7, 7, 24, 3, 2, 1, 1, 1),
    "groups": (6, 12, 5, 6, 18, 3, 1, 1, 1, 3),
    "dilated": (7, 8, 8, 7, 8, (3, 2), 1, (2, 1), (2, 3), 1),
    "pointwise": (9, 16, 5, 5, 8, 1, 1, 0, 1, 1),
    "shortcut": (4, 16, 6, 6, 32, 1, 2, 0, 1, 1),
    "one_position": (11, 8, 2, 2, 8, 2, 1, 0, 1, 1),
    # 100 positions, but a GEMM of 16 x 150 x 100 MACs a sample (LeNet's second layer): tiny.
    # (float32's forward takes the AVX2 few-channel kernel where it runs.)
    "tiny_gemm": (9, 6, 14, 14, 16, 5, 1, 0, 1, 1),
    # One input channel, 6 output channels, 5x5 (LeNet's first layer): no longer the direct
    # loops, a GEMM in blocks (float32's forward: as tiny_gemm).
    "lenet_first": (7, 1, 12, 12, 6, 5, 1, 2, 1, 1),
}


def make(case, dtype, layout="contiguous", bias=True):
    n, c, h, w, o, k, s, p, d, g = CASES[case]
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    wt = torch.randn(o, c // g, kh, kw, generator=gen, dtype=torch.float64)
    b = torch.randn(o, generator=gen, dtype=torch.float64) if bias else None
    gy = torch.randn(F.conv2d(x, wt, b, s, p, d, g).shape, generator=gen, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_(True)
    return (cast(x), cast(wt), cast(b), s, p, d, g), gy.to(dtype)


def grads(fn, args, gy):
    x, wt, b = args[:3]
    y = fn(*args)
    inputs = [t for t in (x, wt, b) if t is not None]
    return (y, *torch.autograd.grad(y, inputs, gy))


def _float32_on_mm():
    return not runnable("conv2d.fwd.sgemm")


DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_forward_and_gradients(dtype, case, layout, threads):
    if dtype == torch.float32 and not _float32_on_mm():
        pytest.skip("float32 takes the AVX-512 GEMM on this CPU, not at::mm")
    args, gy = make(case, dtype, layout)
    n, c, h, w, o, k, s, p, d, g = CASES[case]
    pointwise = k == 1 and s == 1 and p == 0
    # A channels_last forward of >= 8 channels a group takes the rows of taps (below). In
    # float32 the AVX2 few-channel kernel (tests/test_conv2d_tiny_c.py) takes LeNet's shapes'
    # forward: up to 8 input channels, >= 4 output channels, >= 25 taps a channel.
    rows = layout == "channels_last" and c // g >= 8 and not pointwise
    kh, kw = (k, k) if isinstance(k, int) else k
    tiny_c = (dtype == torch.float32 and runnable("conv2d.fwd.tiny_c_lanes") and g == 1 and c <= 8 and o >= 4
              and kh * kw >= 25)
    fwd = "conv2d.fwd.tiny_c_lanes" if tiny_c else CL_ROWS if rows else BLOCKS[0]
    # Its gradients too, at stride 1 with at most 16 output channels (the AVX2 few-channel
    # gradients of csrc/cpu/conv2d_tinyc_grad.cpp: tests/test_conv2d_tiny_c.py).
    tiny_grads = tiny_c and s == 1 and d == 1 and o <= 16 and p < min(kh, kw)
    bwd = ("conv2d.input_grad.tiny_c_rows", "conv2d.weight_grad.tiny_c_flat") if tiny_grads else BLOCKS[1:]
    with expect_path(fwd, *bwd):
        ours = grads(conv2d, args, gy)
    ref_args, ref_gy = make(case, torch.float64, layout)
    ref = grads(F.conv2d, ref_args, ref_gy)
    names = ("output", "grad_input", "grad_weight", "grad_bias")
    for a, r, name in zip(ours, ref, names):
        if dtype == torch.float64:
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=name)
        else:
            assert_close_scaled(a.double(), r, 1e-5, name)
    # The output keeps the input's layout, as stock's.
    cl = torch.channels_last
    assert ours[0].is_contiguous(memory_format=cl) == ref[0].is_contiguous(memory_format=cl)


def test_no_bias():
    args, gy = make("resnet_l4", torch.float64, bias=False)
    with expect_path(*BLOCKS):
        ours = grads(conv2d, args, gy)
    ref = grads(F.conv2d, args, gy)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_one_sample_and_large_maps_keep_one_gemm_a_sample():
    # A single sample, or 64 positions and more under a GEMM of over 2^20 MACs a sample,
    # take the per-sample GEMM.
    for shape in [(1, 64, 3, 3), (4, 64, 8, 8)]:
        x = torch.randn(*shape, dtype=torch.float64)
        w = torch.randn(64, 64, 3, 3, dtype=torch.float64)
        before = counts()
        with expect_path("conv2d.fwd.mm"):
            y = conv2d(x, w, None, 1, 1)
        assert counts()[BLOCKS[0]] == before[BLOCKS[0]]
        torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("n, stride", [(4, 1), (3, 1), (2, 2)])
def test_weight_bound_blocks_take_the_whole_batch(dtype, n, stride):
    # A few columns a thread against a weight of >= 2^17 values (128 -> 128 at 3x3, 9
    # positions a sample): one block for all samples, at::mm threading over the weight,
    # instead of a block a thread that each reads the whole weight.
    if dtype == torch.float32 and not _float32_on_mm():
        pytest.skip("float32 takes the AVX-512 GEMM on this CPU, not at::mm")
    gen = torch.Generator().manual_seed(3)
    h = 3 if stride == 1 else 5
    x = torch.randn(n, 128, h, h, generator=gen, dtype=torch.float64)
    w = torch.randn(128, 128, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(128, generator=gen, dtype=torch.float64)
    gy = torch.randn(F.conv2d(x, w, b, stride, 1).shape, generator=gen, dtype=torch.float64)
    args = [t.to(dtype).requires_grad_(True) for t in (x, w, b)] + [stride, 1]
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with expect_path("conv2d.sample_blocks.weight_bound", *BLOCKS):
            ours = grads(conv2d, args, gy.to(dtype))
    finally:
        torch.set_num_threads(prev)
    ref = grads(F.conv2d, [t.requires_grad_(True) for t in (x, w, b)] + [stride, 1], gy)
    for a, r, name in zip(ours, ref, ("output", "grad_input", "grad_weight", "grad_bias")):
        if dtype == torch.float64:
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=name)
        else:
            assert_close_scaled(a.double(), r, 1e-5, name)


def test_weight_bound_needs_a_large_weight():
    # The same few columns against a small weight (32 -> 32): a block a thread, as before.
    x = torch.randn(4, 32, 3, 3, dtype=torch.float64)
    w = torch.randn(32, 32, 3, 3, dtype=torch.float64)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = counts()
        with expect_path(BLOCKS[0]):
            y = conv2d(x, w, None, 1, 1)
        assert counts()["conv2d.sample_blocks.weight_bound"] == before["conv2d.sample_blocks.weight_bound"]
    finally:
        torch.set_num_threads(prev)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1), rtol=1e-12, atol=1e-12)


def test_empty_batch():
    x = torch.randn(0, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    y = conv2d(x, w, None, 1, 1)
    assert y.shape == (0, 8, 3, 3)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w))


def test_non_finite_as_stock():
    args, gy = make("down", torch.float64)
    x = args[0].detach().clone()
    x[0, 3, 1, 2] = float("nan")
    x[2, 1, 6, 6] = float("inf")
    x[4, 0, 0, 0] = float("-inf")
    args = (x.requires_grad_(True), *args[1:])
    with expect_path(*BLOCKS):
        ours = grads(conv2d, args, gy)
    ref = grads(F.conv2d, args, gy)
    for a, r in zip(ours, ref):
        assert torch.equal(a.isnan(), r.isnan())
        assert torch.equal(a.isinf(), r.isinf())
        fin = r.isfinite()
        torch.testing.assert_close(a[fin], r[fin], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [False, True])
def test_conv_bn_relu(training):
    # The fused op's inference forward takes the blocks with the ReLU (and its per-row
    # callback); training runs the convolution, then the batch statistics.
    args, _ = make("resnet_l4", torch.float64)
    x, wt, b = (t.detach() for t in args[:3])
    o = wt.shape[0]
    gamma, beta = torch.rand(o, dtype=torch.float64) + 0.5, torch.randn(o, dtype=torch.float64)
    rm, rv = torch.randn(o, dtype=torch.float64), torch.rand(o, dtype=torch.float64) + 0.5
    with expect_path(BLOCKS[0]):
        y = conv_bn_relu2d(x, wt, b, gamma, beta, rm.clone(), rv.clone(), training, padding=1)
    ref = F.batch_norm(F.conv2d(x, wt, b, 1, 1), rm.clone(), rv.clone(), gamma, beta, training).relu()
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_deterministic():
    args, gy = make("groups", torch.float64)
    first = grads(conv2d, args, gy)
    for _ in range(3):
        again = grads(conv2d, args, gy)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


# channels_last in and out, >= 8 channels a group (conv2d.fwd.mm_rows_channels_last): a row
# of taps per output position, (kh, kw, c) ordered, and one GEMM writing the output's rows;
# per (sample, band) or, on small maps, per block of samples.
CL_ROWS = "conv2d.fwd.mm_rows_channels_last"
CL_CASES = {
    "resnet": (3, 16, 12, 13, 24, 3, 1, 1, 1, 1),
    "strided_groups": (3, 16, 9, 9, 24, 3, 2, 1, 1, 2),
    "dilated_rect": (2, 8, 11, 12, 10, (3, 5), (1, 2), (2, 1), (1, 2), 1),
    "small_map_blocks": (5, 32, 3, 3, 24, 3, 1, 1, 1, 1),
    "one_sample": (1, 8, 7, 7, 8, 3, 1, 0, 1, 1),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(CL_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_channels_last_rows(dtype, case, bias):
    if dtype == torch.float32 and not _float32_on_mm():
        pytest.skip("float32 takes the AVX-512 GEMM on this CPU, not at::mm")
    n, c, h, w, o, k, s, p, d, g = CL_CASES[case]
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(memory_format=torch.channels_last)
    wt = torch.randn(o, c // g, kh, kw, generator=gen, dtype=torch.float64)
    b = torch.randn(o, generator=gen, dtype=torch.float64) if bias else None
    with expect_path(CL_ROWS):
        y = conv2d(x.to(dtype), wt.to(dtype), None if b is None else b.to(dtype), s, p, d, g)
    ref = F.conv2d(x, wt, b, s, p, d, g)
    assert y.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float64:
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    else:
        assert_close_scaled(y.double(), ref, 1e-5, "output")


def test_channels_last_rows_relu_and_non_finite():
    # The fused op's inference forward (ReLU on the GEMM's rows; NaN kept) on NaN / Inf.
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    x[0, 3, 2, 2] = float("nan")
    x[1, 5, 0, 0] = float("inf")
    wt = torch.randn(8, 16, 3, 3, dtype=torch.float64)
    b, gamma, beta = torch.randn(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)
    rm, rv = torch.randn(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64) + 0.5
    with expect_path(CL_ROWS):
        y = conv_bn_relu2d(x, wt, b, gamma, beta, rm, rv, False, padding=1)
    ref = F.batch_norm(F.conv2d(x, wt, b, 1, 1), rm, rv, gamma, beta, False).relu()
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    fin = ref.isfinite()
    torch.testing.assert_close(y[fin], ref[fin], rtol=1e-10, atol=1e-10)


def test_few_channels_keep_im2col():
    # An RGB stem (3 channels a group) keeps the strided im2col.
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64).to(memory_format=torch.channels_last)
    wt = torch.randn(8, 3, 7, 7, dtype=torch.float64)
    before = counts()[CL_ROWS]
    y = conv2d(x, wt, None, 2, 3)
    assert counts()[CL_ROWS] == before
    torch.testing.assert_close(y, F.conv2d(x, wt, None, 2, 3), rtol=1e-12, atol=1e-12)
