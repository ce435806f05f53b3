"""5x5 stride-1 convolutions as four 3x3 Winograd ones (csrc/cpu/conv2d_winograd.cpp,
split5_params / shifted_copies / cached_split_weight): the 5x5 kernel zero-extended to 6x6
is four 3x3 kernels, each reading the input shifted by (3a, 3b), so the convolution is one
3x3 Winograd convolution over 4 C channels. The forward and the input gradient (a 5x5
forward of grad_output by the flipped, transposed weight) run it; the weight gradient keeps
the GEMM. Each case asserts through the path counters which path ran, and compares against
a float64 reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import cnnext.backends.cpu as cpu_backend
from cnnext import _C
from cnnext._paths import counts, expect_path, runnable
from cnnext.functional import conv2d, conv_bn_relu2d
# The 3x3 Winograd tests' switch and tile fixtures and helpers (pytest takes fixtures
# imported into a test module as its own).
from test_conv2d_winograd import _winograd_on, ran, rel_err, tile  # noqa: F401

SPLIT = "conv2d.winograd.split5x5"
SPLIT_IN = "conv2d.input_grad.winograd_split5x5"
SPLIT_W = "conv2d.weight_grad.winograd_split5x5"
TILES = {2: "conv2d.winograd.f2x2", 4: "conv2d.winograd.f4x4"}
HIT, MISS = "conv2d.winograd.weight_cache_hit", "conv2d.winograd.weight_cache_miss"

pytestmark = pytest.mark.skipif(not _C._winograd_available(), reason="Winograd runs on CPUs with AVX-512F or AVX2 + FMA only")


def kaiming(o, c, k=5):
    return torch.randn(o, c, k, k) * math.sqrt(2.0 / (c * k * k))


# (N, C, H, W, O, padding): odd and non-square maps, every padding 0..4 (4: the input
# gradient's forward pads by 0), asymmetric padding, partial tiles; more than 8 channels
# (the AVX2 few-channel kernel takes up to 8: tests/test_conv2d_tiny_c.py).
SHAPES = [
    (2, 16, 13, 11, 24, 2),
    (3, 20, 9, 10, 17, 0),
    (1, 10, 7, 7, 16, 4),
    (2, 16, 12, 12, 32, 1),
    (2, 18, 6, 19, 20, 3),
    (2, 12, 10, 9, 8, (1, 3)),
]


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_and_input_gradient(m, shape, layout, tile):
    tile(m)
    n, c, h, w, o, p = shape
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(n, c, h, w).contiguous(memory_format=fmt).requires_grad_()
    wt = kaiming(o, c).contiguous(memory_format=fmt).requires_grad_()
    b = torch.randn(o).requires_grad_()
    with expect_path(SPLIT, SPLIT_IN, SPLIT_W, TILES[m]):
        y = conv2d(x, wt, b, 1, p)
        gy = torch.randn_like(y)
        gx, gw, gb = torch.autograd.grad(y, (x, wt, b), gy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, wt, b))
    ref = F.conv2d(xd, wd, bd, 1, p)
    rgx, rgw, rgb = torch.autograd.grad(ref, (xd, wd, bd), gy.double())
    bound = 2e-5 if m == 2 else 1e-4  # forced F(4x4) on tiny random layers: loose
    assert rel_err(y, ref) <= bound
    assert rel_err(gx, rgx) <= bound
    assert rel_err(gw, rgw) <= (1e-5 if m == 2 else 1e-4) and rel_err(gb, rgb) <= 1e-5
    cl = torch.channels_last
    assert y.is_contiguous(memory_format=cl) == ref.is_contiguous(memory_format=cl)
    assert gx.is_contiguous(memory_format=cl) == x.is_contiguous(memory_format=cl)


def test_no_bias_relu_and_bn_epilogue(tile):
    """conv_bn_relu2d in eval mode takes the split with the folded weight and the ReLU; in
    training mode the convolution, then the batch statistics."""
    tile(4)
    x = torch.randn(2, 16, 11, 12)
    wt = kaiming(24, 16)
    gamma, beta = torch.rand(24) + 0.5, torch.randn(24)
    rm, rv = torch.randn(24), torch.rand(24) + 0.5
    for training in (False, True):
        with expect_path(SPLIT):
            y = conv_bn_relu2d(x, wt, None, gamma, beta, rm.clone(), rv.clone(), training, padding=2)
        ref = F.relu(F.batch_norm(F.conv2d(x.double(), wt.double(), None, 1, 2), rm.double().clone(),
                                  rv.double().clone(), gamma.double(), beta.double(), training))
        assert rel_err(y, ref) <= 1e-4


def test_n_zero(tile):
    tile(4)
    x = torch.randn(0, 16, 9, 9, requires_grad=True)
    wt = kaiming(16, 16).requires_grad_()
    y = conv2d(x, wt, None, 1, 2)
    assert y.shape == (0, 16, 9, 9)
    gx, gw = torch.autograd.grad(y.sum(), (x, wt))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(wt))


@pytest.mark.parametrize("case", ["stride2", "dilation2", "groups", "kernel5x3", "kernel7", "float64", "switch_off"])
def test_fallbacks(case, tile):
    tile(4)
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    w = kaiming(16, 16)
    kw = dict(stride=1, padding=2)
    if case == "stride2":
        kw["stride"] = 2
    elif case == "dilation2":
        kw["dilation"], kw["padding"] = 2, 4
    elif case == "groups":
        w, kw["groups"] = kaiming(16, 8), 2
    elif case == "kernel5x3":
        w, kw["padding"] = w[..., 1:4], (2, 1)
    elif case == "kernel7":
        w, kw["padding"] = kaiming(16, 16, 7), 3
    elif case == "float64":
        x, w = x.detach().double().requires_grad_(), w.double()
    w = w.contiguous().requires_grad_()

    def run():
        y = conv2d(x, w, None, **kw)
        return (y, *torch.autograd.grad(y, (x, w), torch.ones_like(y)))

    if case == "switch_off":
        with cpu_backend.flags(winograd=False):
            out, paths = ran(run)
    else:
        out, paths = ran(run)
    assert not paths & {SPLIT, SPLIT_IN}, paths
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    r = F.conv2d(xd, wd, None, **kw)
    refs = (r, *torch.autograd.grad(r, (xd, wd), torch.ones_like(r)))
    for a, b in zip(out, refs):
        assert rel_err(a, b) <= 1e-5


def split_forward_then_input_grad(x, w, padding):
    """The forward of x (requires grad) by w, asserted to take the split, then its input
    gradient for a random gy: (gy, gx, the paths the gradient ran)."""
    y, fpaths = ran(lambda: conv2d(x, w, None, 1, padding))
    assert SPLIT in fpaths
    gy = torch.randn_like(y)
    (gx,), paths = ran(lambda: torch.autograd.grad(y, x, gy))
    return gy, gx, paths


def test_input_gradient_padding_past_4_falls_back(tile):
    """Padding 5 on a 5x5 kernel: the input gradient's forward would pad by -1 (crop), which
    the split does not do; the forward still takes it."""
    tile(4)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    w = kaiming(16, 16)
    gy, gx, paths = split_forward_then_input_grad(x, w, 5)
    assert SPLIT_IN not in paths
    xd = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(F.conv2d(xd, w.double(), None, 1, 5), xd, gy.double())
    assert rel_err(gx, ref) <= 1e-5


def test_nonfinite_falls_back(tile):
    """An Inf mixes into NaN across a Winograd tile (here also from the taps past the 5x5):
    the call falls back and Inf / NaN land where stock puts them."""
    tile(4)
    x = torch.randn(2, 16, 12, 12)
    x[0, 3, 5, 6] = float("inf")
    x[1, 0, 11, 11] = float("nan")
    w = kaiming(16, 16)
    y, paths = ran(lambda: conv2d(x, w, None, 1, 2))
    assert "conv2d.winograd.nonfinite_fallback" in paths
    ref = F.conv2d(x, w, None, 1, 2)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    fin = ref.isfinite()
    assert rel_err(y[fin], F.conv2d(x.double(), w.double(), None, 1, 2)[fin]) <= 1e-5


def test_default_choice_by_shape():
    """Unforced, the split takes wide layers on many tiles (AlexNet's second layer shape,
    smaller) and leaves GoogLeNet's thin 5x5 layers on small maps to the GEMM."""
    x = torch.randn(16, 32, 16, 16)
    _, paths = ran(lambda: conv2d(x, kaiming(64, 32), None, 1, 2))
    assert SPLIT in paths
    x = torch.randn(4, 32, 12, 12)
    _, paths = ran(lambda: conv2d(x, kaiming(96, 32), None, 1, 2))
    assert SPLIT not in paths


def wgrad(gy, x, o, p):
    return torch.ops.cnnext.conv2d_weight_backward(gy, x, [o, x.shape[1], 5, 5], [1, 1], list(p), [1, 1], 1)


def ref_wgrad(gy, x, o, p):
    w = torch.zeros(o, x.shape[1], 5, 5, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(gy.double(), x.double(), w, None, [1, 1], list(p), [1, 1], False,
                                               [0, 0], 1, [False, True, False])[1]


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("case", ["strided_gy", "channels_last", "n_zero", "nonfinite"])
def test_weight_gradient_cases(m, case, tile):
    """The split weight gradient under the views users pass (a sliced grad_output, channels_last
    input), N = 0 (zeros, nothing run), and a non-finite input (falls back to the GEMM path,
    Inf and NaN where stock puts them)."""
    tile(m)
    n, c, h, w, o, p = 2, 12, 11, 10, 28, (2, 1)
    x = torch.randn(n, c, h, w)
    gy = torch.randn(n, o, h + 2 * p[0] - 4, w + 2 * p[1] - 4)
    if case == "strided_gy":
        gy = torch.randn(n, 2 * o, gy.shape[2], gy.shape[3])[:, ::2]
    elif case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif case == "n_zero":
        x, gy = x[:0], gy[:0]
    elif case == "nonfinite":
        x[1, 3, 4, 5] = float("inf")
        x[0, 7, 2, 2] = float("nan")
    gw, paths = ran(lambda: wgrad(gy, x, o, p))
    ref = ref_wgrad(gy, x, o, p)
    if case == "n_zero":
        assert torch.equal(gw, torch.zeros_like(gw)) and SPLIT_W not in paths
    elif case == "nonfinite":
        assert SPLIT_W not in paths and "conv2d.winograd.nonfinite_fallback" in paths
        assert torch.equal(gw.isnan(), ref.isnan()) and torch.equal(gw.isinf(), ref.isinf())
    else:
        assert SPLIT_W in paths and TILES[m] in paths
        assert rel_err(gw, ref) <= (1e-5 if m == 2 else 1e-4)


def test_weight_gradient_default_choice_and_accuracy():
    """Unforced, on AVX-512 the split weight gradient takes AlexNet's 96 -> 256 layer (at least
    twice the outputs a channel) within the 2e-5 promise against float64, and leaves 64 -> 64
    to the GEMM path; AVX2 keeps the GEMM path for both."""
    torch.manual_seed(0)
    x = torch.randn(4, 96, 26, 26)
    gy = torch.randn(4, 256, 26, 26)
    gw, paths = ran(lambda: wgrad(gy, x, 256, (2, 2)))
    assert (SPLIT_W in paths) == runnable("conv2d.fwd.sgemm")
    assert rel_err(gw, ref_wgrad(gy, x, 256, (2, 2))) <= 2e-5
    x = torch.randn(8, 64, 26, 26)
    gy = torch.randn(8, 64, 26, 26)
    _, paths = ran(lambda: wgrad(gy, x, 64, (2, 2)))
    assert SPLIT_W not in paths


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_weight_gradient_deterministic(threads, tile):
    """Bit for bit the same on 1, 2 or 3 threads (torch.use_deterministic_algorithms)."""
    tile(4)
    x = torch.randn(3, 16, 14, 13)
    gy = torch.randn(3, 40, 14, 13)
    saved, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        ref = wgrad(gy, x, 40, (2, 2))
        torch.set_num_threads(threads)
        with expect_path(SPLIT_W):
            outs = [wgrad(gy, x, 40, (2, 2)) for _ in range(3)]
    finally:
        torch.set_num_threads(saved)
        torch.use_deterministic_algorithms(det)
    for g in outs:
        assert torch.equal(g, ref)


def test_avx512_leaves_many_inputs_to_few_outputs_to_the_gemm():
    """On AVX-512 the split is not taken where the input channels outnumber twice the
    output channels (as a forward): AlexNet's 5x5 input gradient (256 -> 96) and a 256 -> 96
    forward run the GEMM path; its 96 -> 256 forward keeps the split."""
    if not runnable("conv2d.fwd.sgemm"):
        pytest.skip("the AVX-512 rule (this CPU runs the AVX2 kernels)")
    x = torch.randn(8, 96, 26, 26, requires_grad=True)
    w = kaiming(256, 96)
    gy, gx, paths = split_forward_then_input_grad(x, w, 2)
    assert SPLIT_IN not in paths and SPLIT not in paths
    assert rel_err(gx, torch.ops.aten.convolution_backward(
        gy.double(), x.detach().double(), w.double(), None, [1, 1], [2, 2], [1, 1], False, [0, 0], 1,
        [True, False, False])[0]) <= 1e-5
    x2 = torch.randn(8, 256, 26, 26)
    _, paths = ran(lambda: conv2d(x2, kaiming(96, 256), None, 1, 2))
    assert SPLIT not in paths


def test_accuracy_bound_alexnet_conv2():
    """AlexNet's 96 -> 256 5x5 at 26x26 (batch 2), unit-normal input, Kaiming weights, the
    tile chosen by shape: within #15's promise of 2e-5 of max |y| against float64, forward
    and input gradient (on AVX-512 the input gradient is the GEMM's: see the test above)."""
    torch.manual_seed(0)
    x = torch.randn(8, 96, 26, 26, requires_grad=True)
    w = kaiming(256, 96)
    with expect_path(SPLIT, *([] if runnable("conv2d.fwd.sgemm") else [SPLIT_IN])):
        y = conv2d(x, w, None, 1, 2)
        gy = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, gy)
    xd = x.detach().double().requires_grad_()
    ref = F.conv2d(xd, w.double(), None, 1, 2)
    (rgx,) = torch.autograd.grad(ref, xd, gy.double())
    assert rel_err(y, ref) <= 2e-5
    assert rel_err(gx, rgx) <= 2e-5


def test_weight_cache_follows_the_version(tile):
    """The split, transformed weight is cached per weight version (its own key, and the
    flipped one for the input gradient); an in-place update is seen by the next call."""
    tile(4)
    cpu_backend.clear_winograd_cache()
    x = torch.randn(2, 16, 10, 10)
    w = kaiming(24, 16)
    y1, paths = ran(lambda: conv2d(x, w, None, 1, 2))
    assert MISS in paths and SPLIT in paths
    y2, paths = ran(lambda: conv2d(x, w, None, 1, 2))
    y3, paths = ran(lambda: conv2d(x, w, None, 1, 2))
    assert HIT in paths and MISS not in paths
    assert torch.equal(y1, y2) and torch.equal(y1, y3)
    with torch.no_grad():
        w.mul_(-1)
    y4, paths = ran(lambda: conv2d(x, w, None, 1, 2))
    assert MISS in paths
    assert rel_err(y4, F.conv2d(x.double(), w.double(), None, 1, 2)) <= 1e-4
    cpu_backend.clear_winograd_cache()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_deterministic_and_thread_independent(threads, tile):
    tile(4)
    x = torch.randn(3, 16, 14, 13)
    w = kaiming(32, 16)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = conv2d(x, w, None, 1, 2)
        torch.set_num_threads(threads)
        with expect_path(SPLIT):
            outs = [conv2d(x, w, None, 1, 2) for _ in range(3)]
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(o, ref) for o in outs)
