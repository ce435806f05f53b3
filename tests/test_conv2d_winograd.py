"""Winograd F(m x m, 3 x 3) convolutions of the CPU backend (csrc/cpu/conv2d_winograd.cpp):
every tile, its fallbacks, the switch (cnnext.backends.cpu), the accuracy bound, determinism
and the transformed-weight cache. Each case asserts through the path counters which path ran."""
import math

import pytest
import torch
import torch.nn.functional as F

import cnnext
import cnnext.backends.cpu as cpu_backend
from cnnext import _C
from cnnext._paths import counts, expect_path, require, runnable
from cnnext.functional import conv2d, conv_bn_relu2d, conv_transpose2d

TILES = {2: "conv2d.winograd.f2x2", 4: "conv2d.winograd.f4x4", 6: "conv2d.winograd.f6x6"}
WINO = list(TILES.values())
# Where the AVX-512 GEMM runs (AVX-512F), Winograd's fallbacks are its conv2d.*.sgemm paths;
# on an AVX2 CPU they are the at::mm paths (conv2d.*.mm, .mm_sample_blocks, .mm_rows_*).
SGEMM = runnable("sgemm.gemm")
AVX2_KERNELS = "conv2d.winograd.avx2"


def gemm_ran(paths, kind, nhwc=False):
    """Whether the GEMM fallback of `kind` (fwd, input_grad, weight_grad) is among paths."""
    if SGEMM:
        return f"conv2d.{kind}.sgemm{'_nhwc' if nhwc else ''}" in paths
    return any(p.startswith(f"conv2d.{kind}.mm") for p in paths)

pytestmark = pytest.mark.skipif(not _C._winograd_available(), reason="Winograd runs on CPUs with AVX-512F or AVX2 + FMA only")


@pytest.fixture(autouse=True)
def _winograd_on():
    """Winograd on for these tests whatever the process-wide switch (on by default)."""
    with cpu_backend.flags(winograd=True):
        yield


@pytest.fixture
def tile():
    """Forces a tile (2, 4, 6) wherever Winograd applies; restored after the test."""
    old = _C._get_winograd_tile()
    yield _C._set_winograd_tile
    _C._set_winograd_tile(old)


def ran(fn):
    before = counts()
    out = fn()
    after = counts()
    return out, {k for k, v in after.items() if v != before.get(k, 0)}


def kaiming(o, c, k=3, dtype=torch.float32):
    return torch.randn(o, c, k, k, dtype=dtype) * math.sqrt(2.0 / (c * k * k))


def single_thread_then(threads, fn, *paths):
    """Under torch.use_deterministic_algorithms: fn() on one thread (the reference), then
    three calls on `threads` threads inside expect_path(*paths); both restored after."""
    saved = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        ref = fn()
        torch.set_num_threads(threads)
        with expect_path(*paths):
            outs = [fn() for _ in range(3)]
    finally:
        torch.set_num_threads(saved)
        torch.use_deterministic_algorithms(det)
    return ref, outs


def rel_err(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


# (N, C, H, W, O, padding): odd sizes, partial tiles in both directions, one-row maps.
CL = torch.channels_last

SHAPES = [
    (2, 16, 9, 11, 24, 1),
    (1, 17, 5, 7, 19, 0),      # no padding, 3x5 output: one partial tile
    (3, 33, 13, 6, 40, 2),     # padding 2: output larger than the input
    (2, 20, 1, 9, 18, 1),      # one input row
    (5, 24, 7, 7, 70, 1),      # 7x7 maps: tiles of several samples share a GEMM panel
    (1, 40, 30, 31, 8, 1),     # 8 output channels: one panel
]


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False])
def test_forward_every_tile(m, shape, bias, tile):
    n, c, h, w, o, pad = shape
    x = torch.randn(n, c, h, w)
    wt = kaiming(o, c)
    b = torch.randn(o) if bias else None
    tile(m)
    y, paths = ran(lambda: conv2d(x, wt, b, 1, pad))
    assert TILES[m] in paths, paths
    assert "conv2d.fwd.sgemm" not in paths
    ref = F.conv2d(x.double(), wt.double(), None if b is None else b.double(), 1, pad)
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= 2e-5


def test_n_zero_and_switch(tile):
    tile(4)
    x = torch.randn(0, 16, 8, 8)
    y, paths = ran(lambda: conv2d(x, kaiming(16, 16), None, 1, 1))
    assert y.shape == (0, 16, 8, 8)
    assert not paths & set(WINO)
    x = torch.randn(2, 16, 8, 8)
    wt = kaiming(16, 16)
    with cpu_backend.flags(winograd=False):
        assert cpu_backend.winograd is False
        y_off, paths = ran(lambda: conv2d(x, wt, None, 1, 1))
    assert cpu_backend.winograd is True  # restored to the fixture's setting
    assert not paths & set(WINO) and gemm_ran(paths, "fwd")
    cpu_backend.winograd = False
    try:
        _, paths = ran(lambda: conv2d(x, wt, None, 1, 1))
        assert not paths & set(WINO)
    finally:
        cpu_backend.winograd = True
    y_on, paths = ran(lambda: conv2d(x, wt, None, 1, 1))
    assert TILES[4] in paths
    torch.testing.assert_close(y_on, y_off, rtol=0, atol=2e-5 * y_off.abs().max().item())
    with pytest.raises(TypeError, match="must be a bool"):
        cpu_backend.winograd = 0


@pytest.mark.parametrize("case", ["groups", "stride2", "dilation2", "kernel7", "float64"])
def test_fallbacks(case, tile):
    tile(4)
    x = torch.randn(2, 16, 10, 10)
    w = kaiming(16, 16)
    kw = dict(stride=1, padding=1)
    if case == "groups":
        w = kaiming(16, 8)
        kw["groups"] = 2
    elif case == "stride2":
        kw["stride"] = 2
    elif case == "dilation2":
        kw["dilation"] = 2
        kw["padding"] = 2
    elif case == "kernel7":  # (5x5 kernels: tests/test_conv2d_winograd_split5.py)
        w = kaiming(16, 16, 7)
        kw["padding"] = 3
    elif case == "float64":
        x, w = x.double(), w.double()
    y, paths = ran(lambda: conv2d(x, w, None, **kw))
    assert not paths & set(WINO), paths
    ref = F.conv2d(x.double(), w.double(), None, **kw)
    assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("m", [2, 4])
def test_avx2_row_loads_and_stores(m, tile):
    """On a CPU without AVX-512F the transforms take 8 tiles a vector: 8 whole tiles side by
    side in a row of tiles are loaded and stored as rows (whole vectors and lane shuffles),
    other groups (across a row's end, a partial last tile) gathered and stored lane by lane.
    A 40-wide map mixes both in one call. The channels_last output (stored lane by lane from
    the same padded input) must be bitwise the same, and both within the accuracy bound."""
    require("conv2d.winograd.avx2_row_loads")
    if SGEMM:
        pytest.skip("this CPU runs the AVX-512 transforms")
    tile(m)
    x = torch.randn(2, 16, 20, 40)
    w = kaiming(24, 16)
    b = torch.randn(24)
    with expect_path(AVX2_KERNELS, "conv2d.winograd.avx2_row_loads", "conv2d.winograd.avx2_row_stores"):
        y = conv2d(x, w, b, 1, 1)
    assert rel_err(y, F.conv2d(x.double(), w.double(), b.double(), 1, 1)) <= 2e-5
    y_cl, paths = ran(lambda: conv2d(x.contiguous(memory_format=CL), w.contiguous(memory_format=CL), b, 1, 1))
    assert y_cl.is_contiguous(memory_format=CL) and "conv2d.winograd.avx2_row_stores" not in paths, paths
    assert torch.equal(y, y_cl)


def test_channels_last_input_contiguous_output(tile):
    # An NHWC input with a contiguous weight: torch gives an NCHW output here? Then the
    # input is read through its strides.
    tile(4)
    x = torch.randn(2, 16, 10, 10)[:, :, :, :].transpose(2, 3)  # non-contiguous, NCHW-like output
    w = kaiming(24, 16)
    y, paths = ran(lambda: conv2d(x, w, None, 1, 1))
    assert y.is_contiguous()
    assert TILES[4] in paths
    assert rel_err(y, F.conv2d(x.double(), w.double(), None, 1, 1)) <= 2e-5


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_channels_last(m, shape, tile):
    """channels_last input and weight: Winograd reads the input and writes the
    channels_last output through their strides, to the same bound."""
    tile(m)
    n, c, h, w_, o, pad = shape
    x = torch.randn(n, c, h, w_).contiguous(memory_format=CL)
    w = kaiming(o, c).contiguous(memory_format=CL)
    b = torch.randn(o)
    y, paths = ran(lambda: conv2d(x, w, b, 1, pad))
    assert TILES[m] in paths and "conv2d.fwd.sgemm_nhwc" not in paths
    assert y.is_contiguous(memory_format=CL)
    ref = F.conv2d(x.double(), w.double(), b.double(), 1, pad)
    assert rel_err(y, ref) <= 2e-5
    # The same tiles and sums as the NCHW call: bitwise the same values.
    assert torch.equal(y, conv2d(x.contiguous(), w.contiguous(), b, 1, pad))


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_fused(training, tile):
    """The fused op in channels_last on Winograd: batch statistics from the Winograd output
    (training) or the folded weight (inference), against float64."""
    tile(4)
    x = torch.randn(4, 32, 13, 11).contiguous(memory_format=CL)
    w = kaiming(40, 32).contiguous(memory_format=CL)
    b, g, be = torch.randn(40) * 0.1, torch.rand(40) + 0.5, torch.randn(40) * 0.1
    rm, rv = torch.randn(40) * 0.1, torch.rand(40) + 0.5
    y, paths = ran(lambda: conv_bn_relu2d(x, w, b, g, be, rm.clone(), rv.clone(), training, padding=1))
    assert TILES[4] in paths
    assert y.is_contiguous(memory_format=CL)
    z = F.conv2d(x.double(), w.double(), b.double(), 1, 1)
    ref = F.batch_norm(z, rm.double(), rv.double(), g.double(), be.double(), training, 0.0, 1e-5).relu()
    assert rel_err(y, ref) <= 2e-4 if training else rel_err(y, ref) <= 2e-5


def test_channels_last_nonfinite_falls_back(tile):
    tile(4)
    x = torch.randn(2, 16, 12, 12)
    x[0, 3, 5, 7] = float("inf")
    x = x.contiguous(memory_format=CL)
    w = kaiming(16, 16).contiguous(memory_format=CL)
    y, paths = ran(lambda: conv2d(x, w, None, 1, 1))
    assert "conv2d.winograd.nonfinite_fallback" in paths and gemm_ran(paths, "fwd", nhwc=True)
    ref = F.conv2d(x.double(), w.double(), None, 1, 1)
    assert torch.equal(y.isinf(), ref.isinf()) and torch.equal(y.isnan(), ref.isnan())


def test_nonfinite_falls_back(tile):
    tile(4)
    x = torch.randn(2, 16, 12, 12)
    x[0, 3, 5, 7] = float("inf")
    x[1, 2, 0, 0] = float("nan")
    w = kaiming(16, 16)
    y, paths = ran(lambda: conv2d(x, w, None, 1, 1))
    assert "conv2d.winograd.nonfinite_fallback" in paths and gemm_ran(paths, "fwd")
    with cpu_backend.flags(winograd=False):
        y_ref = conv2d(x, w, None, 1, 1)
    assert torch.equal(y.isnan(), y_ref.isnan())
    assert torch.equal(y.isinf(), y_ref.isinf())


def test_relu_and_bn_epilogue(tile):
    """conv_bn_relu2d in evaluation folds the BN into the weight and bias: the output
    transform applies the shift and the ReLU; in training its batch statistics are read
    from the Winograd output."""
    tile(4)
    x = torch.randn(3, 32, 14, 14)
    w = kaiming(48, 32)
    b = torch.randn(48)
    gamma, beta = torch.rand(48) + 0.5, torch.randn(48)
    rm, rv = torch.randn(48) * 0.1, torch.rand(48) + 0.5
    with expect_path(TILES[4]):
        y = conv_bn_relu2d(x, w, b, gamma, beta, rm.clone(), rv.clone(), training=False, padding=1)
    ref = F.relu(F.batch_norm(F.conv2d(x.double(), w.double(), b.double(), 1, 1), rm.double(), rv.double(),
                              gamma.double(), beta.double(), False, 0.1, 1e-5))
    assert rel_err(y, ref) <= 2e-5
    assert (y >= 0).all()
    with expect_path(TILES[4]):
        y = conv_bn_relu2d(x, w, b, gamma, beta, rm.clone(), rv.clone(), training=True, padding=1)
    ref = F.relu(F.batch_norm(F.conv2d(x.double(), w.double(), b.double(), 1, 1), None, None,
                              gamma.double(), beta.double(), True, 0.1, 1e-5))
    assert rel_err(y, ref) <= 5e-5


IN_GRAD = "conv2d.input_grad.winograd"
W_GRAD = "conv2d.weight_grad.winograd"


def input_grad(x, w, gy, **kw):
    """(grad_input of cnnext's conv2d, the paths its backward ran, the float64 reference)."""
    x = x.detach().requires_grad_()
    y = conv2d(x, w, None, **kw)
    (gx,), paths = ran(lambda: torch.autograd.grad(y, x, gy))
    xd = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(F.conv2d(xd, w.detach().double(), None, **kw), xd, gy.double())
    return gx, paths, ref


@pytest.mark.parametrize("m", [2, 4, 6])
def test_input_gradient(m, tile):
    """The stride-1 input gradient runs as a Winograd forward with the flipped, transposed
    weight (its own path); the weight gradient stays the GEMM."""
    tile(m)
    x = torch.randn(2, 24, 11, 13, requires_grad=True)
    w = kaiming(32, 24).requires_grad_()
    gy = torch.randn(2, 32, 11, 13)
    y = conv2d(x, w, None, 1, 1)
    (gx, gw), paths = ran(lambda: torch.autograd.grad(y, (x, w), gy))
    assert {IN_GRAD, TILES[m]} <= paths, paths
    assert W_GRAD in paths, paths
    assert (AVX2_KERNELS in paths) == (not SGEMM), paths
    assert "conv2d.input_grad.sgemm" not in paths and "conv2d.input_grad.sgemm_as_forward" not in paths
    assert "conv2d.weight_grad.sgemm" not in paths
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    gx_ref, gw_ref = torch.autograd.grad(F.conv2d(xd, wd, None, 1, 1), (xd, wd), gy.double())
    assert rel_err(gx, gx_ref) <= 2e-5
    assert rel_err(gw, gw_ref) <= 2e-5


# (N, C, H, W, O, padding): odd sizes, partial tiles of gx in both directions (gx is
# H x W), padding 0 (gx larger than gy: the forward pads gy by 2), 1 and 2 (gx smaller
# than gy: padded by 0), one-row maps, more input than output channels and fewer.
IN_GRAD_SHAPES = [
    (2, 24, 9, 11, 16, 1),
    (1, 19, 5, 7, 17, 0),
    (3, 40, 13, 6, 33, 2),
    (2, 18, 3, 9, 20, 1),
    (2, 17, 4, 4, 16, 2),      # 6x6 gy to a 4x4 gx: one partial tile for F(6x6)
    (5, 70, 7, 7, 24, 1),
    (1, 8, 30, 31, 40, 1),     # 8 input channels: the flipped forward has 8 outputs, one panel
]


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("shape", IN_GRAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_input_gradient_every_tile(m, shape, tile):
    n, c, h, w, o, pad = shape
    x = torch.randn(n, c, h, w)
    wt = kaiming(o, c)
    oh, ow = h + 2 * pad - 2, w + 2 * pad - 2
    gy = torch.randn(n, o, oh, ow)
    tile(m)
    gx, paths, ref = input_grad(x, wt, gy, padding=pad)
    assert {IN_GRAD, TILES[m]} <= paths, paths
    assert "conv2d.input_grad.sgemm" not in paths
    assert gx.shape == ref.shape and gx.is_contiguous()
    assert rel_err(gx, ref) <= 2e-5


def test_input_gradient_strided_grad_output(tile):
    """gy read through its strides (a transposed view); the weight non-contiguous too."""
    tile(4)
    x = torch.randn(2, 24, 12, 12)
    w = kaiming(32, 24, 3).transpose(2, 3).contiguous().transpose(2, 3)
    assert not w.is_contiguous()
    y = conv2d(x.requires_grad_(), w, None, 1, 1)
    gy = torch.randn(2, 32, 12, 12).transpose(2, 3).contiguous().transpose(2, 3)
    (gx,), paths = ran(lambda: torch.autograd.grad(y, x, gy))
    assert IN_GRAD in paths
    xd = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(F.conv2d(xd, w.double(), None, 1, 1), xd, gy.double())
    assert rel_err(gx, ref) <= 2e-5


# The input gradients of the classic networks' 3x3 layers (a subset of CLASSIC_3X3: the
# deep, the wide and the thin-output ones), every tile the choice may take.
IN_GRAD_CLASSIC = ["vgg11_28_512", "resnet18_56_64", "resnet18_28_128", "resnet18_14_256",
                   "resnet18_7_512", "googlenet_b3", "densenet_l"]


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("name", IN_GRAD_CLASSIC)
def test_input_gradient_accuracy_bound(name, m, tile):
    """The forward's promise for the input gradient: max |error| <= 2e-5 * max |gx| against
    float64 (unit-normal gy, Kaiming weights)."""
    assert m in _C._winograd_allowed_tiles()
    n, c, h, w, o = CLASSIC_3X3[name]
    tile(m)
    gx, paths, ref = input_grad(torch.randn(n, c, h, w), kaiming(o, c), torch.randn(n, o, h, w), padding=1)
    assert {IN_GRAD, TILES[m]} <= paths
    err = rel_err(gx, ref)
    assert err <= 2e-5, f"F({m}x{m}) input gradient on {name}: {err:.2e}"


@pytest.mark.parametrize("case", ["stride2", "dilation2", "groups", "padding3", "float64", "switch_off",
                                  "channels_last", "thin"])
def test_input_gradient_fallbacks(case, tile):
    """Where the input gradient's Winograd does not apply, the GEMM paths compute it (and the
    forward may still take Winograd: a padding of 3 is a forward Winograd accepts but its
    input gradient would crop gy). A channels_last layer is the other way round: its forward
    keeps the GEMM (conv2d_nhwc), its gradients take Winograd."""
    tile(0 if case == "thin" else 4)
    x = torch.randn(2, 16, 10, 10)
    w = kaiming(16, 16)
    kw = dict(stride=1, padding=1)
    expected = "conv2d.input_grad.sgemm"
    if case == "stride2":
        kw["stride"] = 2
    elif case == "dilation2":
        kw.update(dilation=2, padding=2)
    elif case == "groups":
        w = kaiming(16, 8)
        kw["groups"] = 2
    elif case == "padding3":
        kw["padding"] = 3
    elif case == "float64":
        x, w = x.double(), w.double()
        expected = "conv2d.input_grad.mm"
    elif case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "thin":  # 8 output channels: the choice by shape keeps the GEMM
        w = kaiming(8, 16)
    x.requires_grad_()
    with cpu_backend.flags(winograd=case != "switch_off"):
        y = conv2d(x, w, None, **kw)
        gy = torch.randn_like(y)
        if case == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        (gx,), paths = ran(lambda: torch.autograd.grad(y, x, gy))
    gx_winograd = IN_GRAD in paths
    if case == "channels_last":  # the forward keeps the GEMM (channels_last output), not its gradients
        assert {IN_GRAD, TILES[4]} <= paths and gx.is_contiguous(memory_format=torch.channels_last), paths
    else:
        assert IN_GRAD not in paths and not paths & set(WINO), paths
        assert expected in paths if SGEMM else gemm_ran(paths, "input_grad"), paths
    # The weight gradient falls back alike, except where it applies: any padding, and
    # channels_last x and gy (read through their strides; gw is O x C x 3 x 3 either way).
    w.requires_grad_()
    with cpu_backend.flags(winograd=case != "switch_off"):
        y = conv2d(x, w, None, **kw)
        (gw,), paths = ran(lambda: torch.autograd.grad(y, w, gy))
    if case in ("padding3", "channels_last"):
        assert {W_GRAD, TILES[4]} <= paths, paths
    else:
        assert W_GRAD not in paths and not paths & set(WINO), paths
        assert expected.replace("input_grad", "weight_grad") in paths if SGEMM else gemm_ran(paths, "weight_grad"), paths
    wd = w.detach().double().requires_grad_()
    (gw_ref,) = torch.autograd.grad(F.conv2d(x.detach().double(), wd, None, **kw), wd, gy.double())
    assert rel_err(gw, gw_ref) <= (2e-5 if W_GRAD in paths else 1e-5)
    if case == "padding3":
        assert TILES[4] in ran(lambda: conv2d(x.detach(), w, None, **kw))[1]
    xd = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(F.conv2d(xd, w.detach().double(), None, **kw), xd, gy.double())
    assert rel_err(gx, ref) <= (2e-5 if gx_winograd else 1e-5)


def test_input_gradient_n_zero(tile):
    tile(4)
    x = torch.randn(0, 16, 8, 8, requires_grad=True)
    w = kaiming(24, 16)
    y = conv2d(x, w, None, 1, 1)
    (gx,), paths = ran(lambda: torch.autograd.grad(y, x, torch.randn(0, 24, 8, 8)))
    assert gx.shape == (0, 16, 8, 8)
    assert IN_GRAD not in paths and not paths & set(WINO)


def test_input_gradient_nonfinite_falls_back(tile):
    tile(4)
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    w = kaiming(24, 16)
    y = conv2d(x, w, None, 1, 1)
    gy = torch.randn(2, 24, 12, 12)
    gy[0, 3, 5, 7] = float("inf")
    gy[1, 2, 0, 0] = float("nan")
    (gx,), paths = ran(lambda: torch.autograd.grad(y, x, gy, retain_graph=True))
    assert "conv2d.winograd.nonfinite_fallback" in paths and gemm_ran(paths, "input_grad")
    assert IN_GRAD not in paths
    with cpu_backend.flags(winograd=False):
        (gx_ref,) = torch.autograd.grad(y, x, gy)
    assert torch.equal(gx.isnan(), gx_ref.isnan())
    assert torch.equal(gx.isinf(), gx_ref.isinf())
    fin = gx_ref.isfinite()
    torch.testing.assert_close(gx[fin], gx_ref[fin], rtol=0, atol=1e-5 * gx_ref[fin].abs().max().item())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_input_gradient_deterministic(threads, tile):
    tile(0)
    x = torch.randn(4, 64, 20, 20, requires_grad=True)
    w = kaiming(64, 64)
    gy = torch.randn(4, 64, 20, 20)
    y = conv2d(x, w, None, 1, 1)
    ref, outs = single_thread_then(threads, lambda: torch.autograd.grad(y, x, gy, retain_graph=True)[0],
                                   IN_GRAD, TILES[4])
    for gx in outs:
        assert torch.equal(gx, ref)


# ---- the weight gradient ----

def weight_grad(x, w, gy, **kw):
    """(grad_weight of cnnext's conv2d, the paths its backward ran, the float64 reference)."""
    w = w.detach().requires_grad_()
    y = conv2d(x, w, None, **kw)
    (gw,), paths = ran(lambda: torch.autograd.grad(y, w, gy))
    wd = w.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(F.conv2d(x.detach().double(), wd, None, **kw), wd, gy.double())
    return gw, paths, ref


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("shape", IN_GRAD_SHAPES + [(2, 16, 5, 6, 20, 3)], ids=lambda s: "x".join(map(str, s)))
def test_weight_gradient_every_tile(m, shape, tile):
    """Odd sizes, partial tiles (gy past the output reads as zero), padding 0 to 3."""
    n, c, h, w, o, pad = shape
    x = torch.randn(n, c, h, w)
    wt = kaiming(o, c)
    gy = torch.randn(n, o, h + 2 * pad - 2, w + 2 * pad - 2)
    tile(m)
    gw, paths, ref = weight_grad(x, wt, gy, padding=pad)
    assert {W_GRAD, TILES[m]} <= paths, paths
    assert "conv2d.weight_grad.sgemm" not in paths
    assert gw.shape == ref.shape and gw.is_contiguous()
    assert rel_err(gw, ref) <= 2e-5


@pytest.mark.parametrize("m,shape", [(2, (2, 256, 40, 37)), (4, (3, 256, 44, 44))])
def test_weight_gradient_many_chunks(m, shape, tile):
    """More tiles than one chunk holds (at least 256 tiles, Z and V near 16 MiB: 512 tiles of
    F(2x2) and 256 of F(4x4) at 256 channels in and out): the sums over chunks accumulate
    and the last chunk is shorter. With a bias."""
    tile(m)
    x = torch.randn(*shape, requires_grad=True)
    w = kaiming(256, 256).requires_grad_()
    b = torch.randn(256, requires_grad=True)
    y = conv2d(x, w, b, 1, 1)
    gy = torch.randn_like(y)
    with expect_path(W_GRAD, TILES[m]):
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(F.conv2d(xd, wd, bd, 1, 1), (xd, wd, bd), gy.double())
    assert rel_err(gw, gw_ref) <= 2e-5 and rel_err(gx, gx_ref) <= 2e-5 and rel_err(gb, gb_ref) <= 1e-6


def test_weight_gradient_strided(tile):
    """x and gy read through their strides (transposed views)."""
    tile(4)
    x = torch.randn(2, 24, 12, 12).transpose(2, 3)
    gy = torch.randn(2, 32, 12, 12).transpose(2, 3)
    assert not x.is_contiguous() and not gy.is_contiguous()
    gw, paths, ref = weight_grad(x, kaiming(32, 24), gy, padding=1)
    assert W_GRAD in paths
    assert rel_err(gw, ref) <= 2e-5


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("name", IN_GRAD_CLASSIC)
def test_weight_gradient_accuracy_bound(name, m, tile):
    """max |error| <= 2e-5 * max |gw| against float64 (unit-normal x and gy)."""
    n, c, h, w, o = CLASSIC_3X3[name]
    tile(m)
    gw, paths, ref = weight_grad(torch.randn(n, c, h, w), kaiming(o, c), torch.randn(n, o, h, w), padding=1)
    assert {W_GRAD, TILES[m]} <= paths
    err = rel_err(gw, ref)
    assert err <= 2e-5, f"F({m}x{m}) weight gradient on {name}: {err:.2e}"


def test_weight_gradient_n_zero(tile):
    tile(4)
    x = torch.randn(0, 16, 8, 8)
    gw, paths, ref = weight_grad(x, kaiming(24, 16), torch.randn(0, 24, 8, 8), padding=1)
    assert W_GRAD not in paths and not paths & set(WINO)
    assert torch.equal(gw, torch.zeros(24, 16, 3, 3))


def test_weight_gradient_nonfinite_falls_back(tile):
    tile(4)
    x = torch.randn(2, 16, 12, 12)
    x[0, 3, 5, 7] = float("inf")
    x[1, 2, 0, 0] = float("nan")
    w = kaiming(24, 16).requires_grad_()
    y = conv2d(x, w, None, 1, 1)
    gy = torch.randn(2, 24, 12, 12)
    (gw,), paths = ran(lambda: torch.autograd.grad(y, w, gy))
    assert "conv2d.winograd.nonfinite_fallback" in paths and gemm_ran(paths, "weight_grad")
    assert W_GRAD not in paths
    with cpu_backend.flags(winograd=False):
        (gw_ref,) = torch.autograd.grad(conv2d(x, w, None, 1, 1), w, gy)
    assert torch.equal(gw.isnan(), gw_ref.isnan()) and torch.equal(gw.isinf(), gw_ref.isinf())
    assert gw.isnan().any()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_weight_gradient_deterministic(threads, tile):
    tile(0)
    x = torch.randn(4, 64, 20, 20)
    w = kaiming(64, 64).requires_grad_()
    gy = torch.randn(4, 64, 20, 20)
    y = conv2d(x, w, None, 1, 1)
    ref, outs = single_thread_then(threads, lambda: torch.autograd.grad(y, w, gy, retain_graph=True)[0],
                                   W_GRAD, TILES[4])
    for gw in outs:
        assert torch.equal(gw, ref)


def cache_counts(fn):
    before = counts()
    out = fn()
    after = counts()
    return out, tuple(after[k] - before.get(k, 0) for k in ("conv2d.winograd.weight_cache_hit",
                                                            "conv2d.winograd.weight_cache_miss"))


def test_input_gradient_weight_cache(tile):
    """The flipped weight's transform is cached per weight version under its own key (a
    square weight's forward transform is never taken for it), and an in-place change (an
    optimizer step, copy_ under no_grad) is seen by the next backward."""
    tile(4)
    cpu_backend.clear_winograd_cache()
    x = torch.randn(2, 32, 12, 12, requires_grad=True)
    w = kaiming(32, 32).requires_grad_()
    gy = torch.randn(2, 32, 12, 12)

    def check(gx):
        xd = x.detach().double().requires_grad_()
        (ref,) = torch.autograd.grad(F.conv2d(xd, w.detach().double(), None, 1, 1), xd, gy.double())
        assert rel_err(gx, ref) <= 2e-5

    y, (hit, miss) = cache_counts(lambda: conv2d(x, w, None, 1, 1))
    assert (hit, miss) == (0, 1)  # the forward's transform
    (gx1,), (hit, miss) = cache_counts(lambda: torch.autograd.grad(y, x, gy, retain_graph=True))
    assert (hit, miss) == (0, 1)  # the flipped one: a second entry
    assert cpu_backend.winograd_cache_info()[0] == 2
    check(gx1)
    # The second backward at this weight version snapshots the weight (a miss), the third hits.
    (gx2,), (hit, miss) = cache_counts(lambda: torch.autograd.grad(y, x, gy, retain_graph=True))
    assert (hit, miss) == (0, 1)
    assert torch.equal(gx1, gx2)
    (gx2,), (hit, miss) = cache_counts(lambda: torch.autograd.grad(y, x, gy, retain_graph=True))
    assert (hit, miss) == (1, 0)
    assert torch.equal(gx1, gx2)
    # An optimizer step changes w in place: the next forward and backward recompute both.
    opt = torch.optim.SGD([w], lr=0.5)
    w.grad = torch.randn_like(w) * w.detach().abs().max()
    opt.step()
    y, (hit, miss) = cache_counts(lambda: conv2d(x, w, None, 1, 1))
    (gx3,), (hit2, miss2) = cache_counts(lambda: torch.autograd.grad(y, x, gy))
    assert (hit, miss, hit2, miss2) == (0, 1, 0, 1)
    check(gx3)
    assert not torch.equal(gx3, gx1)
    # copy_ under no_grad (load_state_dict) between the forward and a second backward of
    # the same graph is autograd's error; before the forward it is seen.
    with torch.no_grad():
        w.copy_(kaiming(32, 32))
    y = conv2d(x, w, None, 1, 1)
    (gx4,), (hit, miss) = cache_counts(lambda: torch.autograd.grad(y, x, gy))
    assert (hit, miss) == (0, 1)
    check(gx4)
    cpu_backend.clear_winograd_cache()


def test_input_gradient_cache_under_training(tile):
    """cnnext.nn.Conv2d over optimizer steps: each step's input gradient matches float64 on
    the weight of that step (never a stale flipped transform), in train mode with a third
    backward through the same graph hitting the cache (the second snapshots the weight)."""
    tile(4)
    torch.manual_seed(0)
    mod = cnnext.nn.Conv2d(24, 24, 3, padding=1, bias=False)
    opt = torch.optim.SGD(mod.parameters(), lr=0.3, momentum=0.9)
    for step in range(4):
        x = torch.randn(2, 24, 9, 10, requires_grad=True)
        y = mod(x)
        gy = torch.randn_like(y)
        with expect_path(IN_GRAD):
            (gx,) = torch.autograd.grad(y, x, gy, retain_graph=True)
        with expect_path(IN_GRAD, "conv2d.winograd.weight_cache_miss"):
            (gx_again,) = torch.autograd.grad(y, x, gy, retain_graph=True)
        assert torch.equal(gx, gx_again)
        with expect_path(IN_GRAD, "conv2d.winograd.weight_cache_hit"):
            (gx_again,) = torch.autograd.grad(y, x, gy, retain_graph=True)
        assert torch.equal(gx, gx_again)
        xd = x.detach().double().requires_grad_()
        (ref,) = torch.autograd.grad(F.conv2d(xd, mod.weight.detach().double(), None, 1, 1), xd, gy.double())
        assert rel_err(gx, ref) <= 2e-5, step
        y.backward(gy)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("fused", [False, True], ids=["conv", "conv_bn_relu"])
def test_training_steps_never_see_a_stale_transform(fused, tile):
    """Hypothesis (b) of the ResNet-18 investigation (docs/DESIGN.md): one weight serves the
    forward and the input gradient (two transforms, both cached per version), then an
    optimizer step changes it in place. Over several steps, in train mode and in an eval
    forward between them, every forward output and input gradient matches float64 on the
    weight as it is at that moment."""
    tile(4)
    torch.manual_seed(0)
    if fused:
        mod = cnnext.nn.ConvBNReLU2d(24, 32, 3, padding=1)
    else:
        mod = cnnext.nn.Conv2d(24, 32, 3, padding=1)
    ref = (torch.nn.Sequential(torch.nn.Conv2d(24, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU())
           if fused else torch.nn.Conv2d(24, 32, 3, padding=1)).double()
    opt = torch.optim.SGD(mod.parameters(), lr=0.2, momentum=0.9)
    for step in range(4):
        ref.load_state_dict({k: v.double() for k, v in mod.state_dict().items()})
        mod.train(), ref.train()
        x = torch.randn(3, 24, 10, 9, requires_grad=True)
        xd = x.detach().double().requires_grad_()
        y, yd = mod(x), ref(xd)
        gy = torch.randn_like(y)
        with expect_path(TILES[4]):
            (gx,) = torch.autograd.grad(y, x, gy, retain_graph=True)
        (gxd,) = torch.autograd.grad(yd, xd, gy.double())
        assert rel_err(y, yd) <= 2e-5, step
        assert rel_err(gx, gxd) <= 1e-4, step
        y.backward(gy)
        opt.step()
        mod.eval(), ref.eval()
        ref.load_state_dict({k: v.double() for k, v in mod.state_dict().items()})
        with torch.no_grad(), expect_path(TILES[4]):
            ye = mod(x.detach())
        assert rel_err(ye, ref(x.detach().double())) <= 2e-5, step


def test_conv_transpose_stride1(tile):
    tile(4)
    x = torch.randn(2, 32, 9, 9)
    w = torch.randn(32, 24, 3, 3) * 0.1
    with expect_path(TILES[4]):
        y = conv_transpose2d(x, w, None, 1, 1)
    assert rel_err(y, F.conv_transpose2d(x.double(), w.double(), None, 1, 1)) <= 2e-5


def _ref(x, w):
    return F.conv2d(x.double(), w.double(), None, 1, 1)


# The 3x3 stride-1 layers of the classic networks (cnnext.models at their input sizes,
# batch 2; channel counts as built): VGG-11, ResNet-18, AlexNet, GoogLeNet's 3x3 branches.
CLASSIC_3X3 = {
    "vgg11_112_128": (2, 128, 112, 112, 256),
    "vgg11_56_256": (1, 256, 56, 56, 256),
    "vgg11_28_512": (2, 256, 28, 28, 512),
    "vgg11_14_512": (2, 512, 14, 14, 512),
    "resnet18_56_64": (2, 64, 56, 56, 64),
    "resnet18_28_128": (2, 128, 28, 28, 128),
    "resnet18_14_256": (2, 256, 14, 14, 256),
    "resnet18_7_512": (2, 512, 7, 7, 512),
    "resnet18_96_l1": (2, 64, 24, 24, 64),
    "alexnet_conv4": (2, 384, 12, 12, 384),
    "googlenet_b3": (2, 128, 12, 12, 192),
    "densenet_l": (2, 128, 24, 24, 32),
}


def accuracy_cases():
    for name, s in CLASSIC_3X3.items():
        for m in (2, 4, 6):
            yield pytest.param(name, m, id=f"{name}-f{m}")


@pytest.mark.parametrize("name,m", list(accuracy_cases()))
def test_accuracy_bound(name, m, tile):
    """The promise (docs/DESIGN.md): max |error| <= 2e-5 * max |y| against float64, with
    unit-normal input and Kaiming weights, for every tile Winograd may choose. F(6x6) is
    only asserted where the shape's choice may pick it (it is never chosen otherwise)."""
    n, c, h, w, o = CLASSIC_3X3[name]
    x = torch.randn(n, c, h, w)
    wt = kaiming(o, c)
    tile(m)
    y, paths = ran(lambda: conv2d(x, wt, None, 1, 1))
    assert TILES[m] in paths
    err = rel_err(y, _ref(x, wt))
    bound = 2e-5 if m in _C._winograd_allowed_tiles() else 1e-3
    assert err <= bound, f"F({m}x{m}) on {name}: {err:.2e}"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_deterministic_and_thread_independent(threads, tile):
    tile(0)
    x = torch.randn(4, 64, 20, 20)
    w = kaiming(64, 64)
    b = torch.randn(64)
    ref, outs = single_thread_then(threads, lambda: conv2d(x, w, b, 1, 1), TILES[4])
    for y in outs:
        assert torch.equal(y, ref)


def test_weight_cache_follows_the_version(tile):
    tile(4)
    cpu_backend.clear_winograd_cache()
    x = torch.randn(2, 32, 12, 12)
    conv = cnnext.nn.Conv2d(32, 32, 3, padding=1).eval()
    with torch.no_grad():
        with expect_path("conv2d.winograd.weight_cache_miss"):
            y1 = conv(x)
        with expect_path("conv2d.winograd.weight_cache_miss"):  # the second sighting: snapshot
            conv(x)
        with expect_path("conv2d.winograd.weight_cache_hit"):
            y2 = conv(x)
    assert torch.equal(y1, y2)
    assert cpu_backend.winograd_cache_info()[0] >= 1
    # An optimizer step changes the weight in place: the next call must see it.
    conv.train()
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    conv(x).square().sum().backward()
    opt.step()
    conv.eval()
    with torch.no_grad():
        with expect_path("conv2d.winograd.weight_cache_miss"):
            y3 = conv(x)
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 1)
    assert rel_err(y3, ref) <= 2e-5
    assert not torch.equal(y3, y1)
    # copy_ under no_grad (load_state_dict) too.
    with torch.no_grad():
        conv.weight.copy_(kaiming(32, 32))
        y4 = conv(x)
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 1)
    assert rel_err(y4, ref) <= 2e-5
    # A weight freed and another allocated (perhaps at the same address) never hits.
    del conv
    for _ in range(3):
        w = kaiming(32, 32)
        y = conv2d(x, w, None, 1, 1)
        assert rel_err(y, _ref(x, w)) <= 2e-5
    cpu_backend.clear_winograd_cache()
    assert cpu_backend.winograd_cache_info() == (0, 0)


def test_default_choice_by_shape():
    """Without a forced tile the choice follows the shape: thin or tiny layers keep the GEMM."""
    x = torch.randn(2, 8, 16, 16)
    _, paths = ran(lambda: conv2d(x, kaiming(8, 8), None, 1, 1))
    assert not paths & set(WINO)
    x = torch.randn(4, 64, 28, 28)
    _, paths = ran(lambda: conv2d(x, kaiming(64, 64), None, 1, 1))
    assert paths & set(WINO)


def _picked_tile_runs(shape, m):
    """A C -> C 3x3 layer of `shape`: its forward and input gradient run F(m x m) (not the
    other tile) within the bound of float64. Returns x, the weight, gy and the float64
    gradients (input, weight)."""
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(c + h)
    x = torch.randn(n, c, h, w, generator=gen)
    wt = torch.randn(c, c, 3, 3, generator=gen) * math.sqrt(2.0 / (c * 9))
    gy = torch.randn(n, c, h, w, generator=gen)
    y, paths = ran(lambda: conv2d(x, wt, None, 1, 1))
    assert TILES[m] in paths and TILES[6 - m] not in paths
    assert rel_err(y, _ref(x, wt)) <= 2e-5
    gx, paths = ran(lambda: torch.ops.cnnext.conv2d_input_backward(gy, wt, list(x.shape), [1, 1], [1, 1], [1, 1], 1))
    assert {TILES[m], "conv2d.input_grad.winograd"} <= paths and TILES[6 - m] not in paths
    ref_g = torch.ops.aten.convolution_backward(gy.double(), x.double(), wt.double(), None, [1, 1], [1, 1], [1, 1],
                                                False, [0, 0], 1, [True, True, False])
    assert (gx.double() - ref_g[0]).abs().max() <= 2e-5 * ref_g[0].abs().max()
    return x, wt, gy, ref_g


@pytest.mark.parametrize("shape", [(4, 128, 12, 12), (4, 256, 6, 6), (1, 256, 14, 14)])
def test_avx2_small_maps_pick_the_tile_on_16_column_halves(shape):
    """On AVX2 the forward and the input gradient pick F(2x2) or F(4x4) on the AVX2 kernel's
    16-column halves (these maps have 9-36 F(4x4) tiles, which whole 32-column panels
    priced out); the weight gradient keeps the panel count, and F(2x2) here. Against
    float64 within the accuracy bound."""
    if runnable("conv2d.fwd.sgemm") or not runnable("conv2d.winograd.avx2"):
        pytest.skip("the 16-column pick is the AVX2 kernel's (this CPU has AVX-512F, or no AVX2)")
    x, wt, gy, ref_gx = _picked_tile_runs(shape, 4)
    gw, paths = ran(lambda: torch.ops.cnnext.conv2d_weight_backward(gy, x, list(wt.shape), [1, 1], [1, 1], [1, 1], 1))
    assert {TILES[2], "conv2d.weight_grad.winograd"} <= paths and TILES[4] not in paths
    assert (gw.double() - ref_gx[1]).abs().max() <= 2e-5 * ref_gx[1].abs().max()


@pytest.mark.parametrize("shape,m", [((4, 128, 12, 12), 4), ((4, 256, 6, 6), 2), ((1, 256, 14, 14), 4),
                                     ((8, 64, 56, 56), 4)])
def test_avx512_picks_the_tile_on_16_column_halves(shape, m):
    """On AVX-512 the forward and the input gradient pick F(2x2) or F(4x4) again on the
    micro-kernel's 16-column halves plus the transformed weight's traffic: F(4x4) on the
    12x12 maps and 14x14 at batch 1, F(2x2) on 6x6 (its F(4x4) weight is 2.25x bigger, read
    for 16 tiles); the weight gradient keeps its own pick. Against float64 within the bound."""
    if not runnable("conv2d.fwd.sgemm"):
        pytest.skip("the AVX-512 pick (this CPU runs the AVX2 kernels)")
    _picked_tile_runs(shape, m)


SHARED = "conv2d.winograd.shared_input"


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [(4, 256, 6, 6, 256), (4, 128, 12, 12, 128), (1, 37, 5, 7, 72), (2, 40, 9, 3, 200)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_shared_input_transform(m, shape, threads, tile):
    """Few tiles and many output channels: the output channels are split over items and each
    chunk's input is transformed once, its channels over the threads, for all blocks. The
    result does not depend on the split (1, 2 or 3 threads: bit for bit the same) and is
    within the bound of float64, NCHW and channels_last output alike."""
    tile(m)
    n, c, h, w, o = shape
    gen = torch.Generator().manual_seed(c + o)
    x = torch.randn(n, c, h, w, generator=gen)
    wt = kaiming(o, c)
    b = torch.randn(o, generator=gen)
    # One thread splits the channels only where the tiles make one chunk.
    ref, outs = single_thread_then(threads, lambda: conv2d(x, wt, b, 1, 1), TILES[m], *([SHARED] if threads > 1 else []))
    for y in outs:
        assert torch.equal(y, ref)
    ref64 = F.conv2d(x.double(), wt.double(), b.double(), 1, 1)
    assert rel_err(ref, ref64) <= 2e-5
    xl = x.to(memory_format=torch.channels_last)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with expect_path(TILES[m], SHARED):
            yl = conv2d(xl, wt, b, 1, 1)
    finally:
        torch.set_num_threads(saved)
    assert yl.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(yl, ref64) <= 2e-5


def test_on_by_default():
    """A fresh process starts with Winograd on (docs/DESIGN.md: why it may be)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import cnnext, cnnext.backends.cpu as c; print(c.winograd, cnnext.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    flag, where = out.split()
    assert flag == "True"
    assert where.startswith(root)
