"""float16 and bfloat16 on the CPU: every op against stock torch in the same dtype and
against torch in float64 from the same rounded values (forward and every gradient).

Tolerances (cnnext.testing.TOLERANCES["half_cpu"] and ["half_cpu_bn"]), as a fraction of
the largest magnitude of the reference:
- cnnext accumulates in float and rounds each output once, so against float64 its error
  is the final rounding, at most the unit roundoff u of max |reference| (bfloat16
  u = 2^-8 = 3.9e-3, float16 2^-11 = 4.9e-4), plus float accumulation error (~1e-6) and,
  for conv_transpose2d with bias, a second rounding (the bias added to the rounded
  convolution): bounds 1e-2 / 2e-3.
- stock rounds once too (its accumulate type is float as well), but may sum in another
  order: cnnext against stock is within the two roundings, 2u: the same bounds.
- conv_bn_relu2d rounds the convolution's output to the half type before normalising it
  (as stock's Conv2d -> BatchNorm2d does), and the normalisation magnifies that rounding
  by max |conv_out - mean| / std: bounds 8e-2 / 2e-2 (as for CUDA's half types).
- max pooling compares and copies: outputs and indices bit-exact against stock.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnext
import cnnext.functional as cf
from cnnext.testing import TOLERANCES, assert_close_to_reference, to_layout

HALF = [torch.bfloat16, torch.float16]
RTOL = TOLERANCES["half_cpu"]
RTOL_BN = TOLERANCES["half_cpu_bn"]
LAYOUTS = ["contiguous", "channels_last", "sliced"]


def _leaves(dtype, layout, *tensors):
    """Each float64 tensor rounded to dtype, as a leaf requiring grad (the first in `layout`),
    and the float64 copies of the rounded values, also leaves."""
    half, wide = [], []
    for i, t in enumerate(tensors):
        h = t.to(dtype)
        if i == 0:
            h = to_layout(h, layout)
        half.append(h.detach().requires_grad_())
        wide.append(h.detach().double().requires_grad_())
    return half, wide


def _run(fn, leaves, gy_seed=1):
    out = fn(*leaves)
    g = torch.Generator().manual_seed(gy_seed)
    gy = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, gy)
    return [out.detach(), *grads]


def _compare(ours_fn, stock_fn, dtype, layout, tensors, rtol, what):
    (ours_in, wide_in) = _leaves(dtype, layout, *tensors)
    stock_in, _ = _leaves(dtype, layout, *tensors)
    ours = _run(ours_fn, ours_in)
    stock = _run(stock_fn, stock_in)
    ref = _run(stock_fn, wide_in)
    names = ["output"] + [f"grad_{i}" for i in range(len(tensors))]
    for name, a, s, r in zip(names, ours, stock, ref):
        assert a.dtype == dtype, f"{what} {name}: dtype {a.dtype}"
        assert a.shape == s.shape, f"{what} {name}: shape"
        assert_close_to_reference(a, r, rtol, f"{what} {name} vs float64")
        assert_close_to_reference(a, s.double(), rtol + _stock_error(s, r), f"{what} {name} vs stock {dtype}")
    return ours, stock


def _stock_error(stock, ref):
    """Stock's own error against float64, relative to max |ref|: some of its float16 paths
    (depthwise, the input gradient) round partial sums to float16, up to ~2.5e-3. cnnext
    within rtol of float64 is then within rtol + that of stock."""
    scale = max(ref.abs().max().item(), 1e-30) if ref.numel() else 1.0
    return (stock.double() - ref).abs().max().item() / scale if ref.numel() else 0.0


CONV = [
    # input shape, weight shape, stride, padding, dilation, groups
    ((2, 8, 12, 11), (16, 8, 3, 3), 1, 1, 1, 1),
    ((2, 6, 9, 9), (12, 3, 3, 2), 2, (1, 0), (1, 2), 2),
    ((1, 32, 7, 7), (32, 32, 1, 1), 1, 0, 1, 1),
    ((3, 4, 10, 10), (4, 1, 5, 5), 1, 2, 1, 4),   # depthwise
    ((1, 1, 28, 28), (6, 1, 5, 5), 1, 0, 1, 1),   # LeNet's first layer
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("cfg", range(len(CONV)))
def test_conv2d(cfg, dtype, layout):
    xs, ws, s, p, d, g = CONV[cfg]
    gen = torch.Generator().manual_seed(cfg)
    x, w, b = (torch.randn(sh, generator=gen, dtype=torch.float64) for sh in (xs, ws, (ws[0],)))
    _compare(lambda x, w, b: cf.conv2d(x, w, b, s, p, d, g), lambda x, w, b: F.conv2d(x, w, b, s, p, d, g),
             dtype, layout, (x, w, b), RTOL[dtype], "conv2d")


CONVT = [
    ((2, 8, 6, 5), (8, 6, 3, 3), 2, 1, 1, 1, 1),
    ((1, 6, 7, 7), (6, 2, 4, 3), (2, 1), (1, 0), (1, 0), 3, (1, 2)),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("cfg", range(len(CONVT)))
def test_conv_transpose2d(cfg, dtype, layout):
    xs, ws, s, p, op, g, d = CONVT[cfg]
    gen = torch.Generator().manual_seed(cfg)
    x, w, b = (torch.randn(sh, generator=gen, dtype=torch.float64) for sh in (xs, ws, (ws[1] * g,)))
    _compare(lambda x, w, b: cf.conv_transpose2d(x, w, b, s, p, op, g, d),
             lambda x, w, b: F.conv_transpose2d(x, w, b, s, p, op, g, d), dtype, layout, (x, w, b), RTOL[dtype],
             "conv_transpose2d")


POOL = [
    ((2, 3, 9, 8), dict(kernel_size=3, stride=2, padding=1)),
    ((1, 4, 8, 8), dict(kernel_size=2)),
    ((2, 16, 7, 7), dict(kernel_size=(2, 3), stride=(1, 2), ceil_mode=True)),
    ((1, 2, 20, 20), dict(kernel_size=3, stride=1, dilation=2)),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("cfg", range(len(POOL)))
def test_max_pool2d_exact(cfg, dtype, layout):
    """Outputs and indices bit-exact against stock in the same dtype (ties and a NaN
    included); the gradient within rounding of stock (bit-exact where windows do not
    overlap: each input then receives at most one gradient)."""
    shape, kw = POOL[cfg]
    gen = torch.Generator().manual_seed(cfg)
    x = (2 * torch.randn(shape, generator=gen, dtype=torch.float64)).round() / 2  # many ties
    xh = to_layout(x.to(dtype), layout)
    with torch.no_grad():
        xh[0, 0, 1, 1] = float("nan")
    out, idx = cf.max_pool2d(xh, return_indices=True, **kw)
    ref, ref_idx = F.max_pool2d(xh, return_indices=True, **kw)
    assert out.dtype == dtype
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16)) or torch.equal(out.isnan(), ref.isnan()) and \
        torch.equal(out.nan_to_num(), ref.nan_to_num())
    assert torch.equal(idx, ref_idx)
    x = x.nan_to_num()
    ours, stock = _compare(lambda t: cf.max_pool2d(t, **kw), lambda t: F.max_pool2d(t, **kw), dtype, layout, (x,),
                           RTOL[dtype], "max_pool2d")
    if kw.get("stride", kw["kernel_size"]) == kw["kernel_size"]:
        assert torch.equal(ours[1], stock[1])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("cfg", range(len(POOL)))
def test_avg_pool2d(cfg, dtype, layout):
    shape, kw = POOL[cfg]
    kw = {k: v for k, v in kw.items() if k != "dilation"}
    gen = torch.Generator().manual_seed(cfg)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    _compare(lambda t: cf.avg_pool2d(t, **kw), lambda t: F.avg_pool2d(t, **kw), dtype, layout, (x,), RTOL[dtype],
             "avg_pool2d")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("out_size", [1, (3, 2), 5])
def test_adaptive_avg_pool2d(out_size, dtype, layout):
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    _compare(lambda t: cf.adaptive_avg_pool2d(t, out_size), lambda t: F.adaptive_avg_pool2d(t, out_size), dtype,
             layout, (x,), RTOL[dtype], "adaptive_avg_pool2d")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_max_unpool2d(dtype, layout):
    """Unpooling copies: bit-exact against stock, and so is its gradient (a gather)."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64).to(dtype)
    _, idx = F.max_pool2d(x, 2, return_indices=True)
    y = to_layout(torch.randn(idx.shape, dtype=torch.float64).to(dtype), layout).requires_grad_()
    ours = cf.max_unpool2d(y, idx, 2)
    ref = F.max_unpool2d(y, idx, 2)
    assert ours.dtype == dtype and torch.equal(ours, ref)
    gu = torch.randn(ours.shape, dtype=torch.float64).to(dtype)
    assert torch.equal(torch.autograd.grad(ours, y, gu)[0], torch.autograd.grad(ref, y, gu)[0])


def _bn_pair(dtype, cin=6, cout=10, bn_dtype=None):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-0.5, 0.5)
        ref[1].running_mean.uniform_(-0.5, 0.5)
        ref[1].running_var.uniform_(0.5, 1.5)
    ours = cnnext.nn.ConvBNReLU2d(cin, cout, 3, padding=1)
    ours.load_state_dict(ref.state_dict())
    return ref.to(dtype), ours.to(dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_conv_bn_relu2d(dtype, training, layout):
    """The fused op in the half type (parameters and buffers too) against the stock triple
    in the same dtype and in float64: output, grad_input, every parameter's gradient, and
    the running statistics (kept in the half type, as stock keeps them)."""
    ref, ours = _bn_pair(dtype)
    wide, _ = _bn_pair(torch.float64)
    wide.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    for m in (ref, ours, wide):
        m.train(training)
    x = torch.randn(4, 6, 9, 8, dtype=torch.float64)
    results = []
    for m, dt in ((ours, dtype), (ref, dtype), (wide, torch.float64)):
        xi = to_layout(x.to(dtype).to(dt), layout).requires_grad_()
        out = m(xi)
        gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dt)
        params = [m[0].weight, m[0].bias, m[1].weight, m[1].bias]  # ConvBNReLU2d is (conv, bn) too
        grads = torch.autograd.grad(out, [xi, *params], gy)
        buffers = [m[1].running_mean, m[1].running_var]
        results.append([out.detach(), *grads, *[b.clone() for b in buffers]])
    names = ["output", "grad_input", "grad_weight", "grad_bias", "grad_bn_weight", "grad_bn_bias", "running_mean",
             "running_var"]
    for name, a, s, r in zip(names, *results):
        assert a.dtype == s.dtype, f"{name}: dtype {a.dtype} != stock's {s.dtype}"
        if name == "grad_bias" and training:
            continue  # zero up to rounding (the batch mean removes it), in every implementation
        assert_close_to_reference(a, s.double(), RTOL_BN[dtype], f"{name} vs stock {dtype}")
        assert_close_to_reference(a, r, RTOL_BN[dtype], f"{name} vs float64")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_conv_bn_relu2d_float32_bn_parameters(dtype):
    """Half input and weight with float32 bn_weight, bn_bias and running statistics (what
    autocast hands the op): accepted, statistics and running statistics float32, the BN
    parameters' gradients float32, everything within rounding of float64."""
    gen = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in ((2, 3, 6, 6), (5, 3, 3, 3),
                                                                                       (5,)))
    gamma = (torch.rand(5, generator=gen) + 0.5).requires_grad_()
    beta = torch.randn(5, generator=gen).requires_grad_()
    rm, rv = torch.zeros(5), torch.ones(5)
    xl, wl = x.requires_grad_(), w.requires_grad_()
    out = cf.conv_bn_relu2d(xl, wl, b, gamma, beta, rm, rv, True, 0.1, 1e-5, 1, 1)
    assert out.dtype == dtype and rm.dtype == torch.float32
    gg, gb = torch.autograd.grad(out.float().sum(), (gamma, beta))
    assert gg.dtype == torch.float32 and gb.dtype == torch.float32
    xd, wd = x.detach().double().requires_grad_(), w.detach().double()
    gd, bd = gamma.detach().double().requires_grad_(), beta.detach().double().requires_grad_()
    rmd, rvd = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    want = F.relu(F.batch_norm(F.conv2d(xd, wd, b.double(), 1, 1), rmd, rvd, gd, bd, True, 0.1, 1e-5))
    assert_close_to_reference(out, want, RTOL_BN[dtype], "output")
    wg, wb = torch.autograd.grad(want.sum(), (gd, bd))
    assert_close_to_reference(gg, wg, RTOL_BN[dtype], "grad_bn_weight")
    assert_close_to_reference(gb, wb, RTOL_BN[dtype], "grad_bn_bias")
    assert_close_to_reference(rm, rmd, 1e-3, "running_mean")
    assert_close_to_reference(rv, rvd, 1e-3, "running_var")
    # eval with the float32 statistics
    ev = cf.conv_bn_relu2d(x.detach(), w.detach(), b, gamma.detach(), beta.detach(), rm, rv, False, 0.1, 1e-5, 1, 1)
    want = F.relu(F.batch_norm(F.conv2d(x.double(), w.double(), b.double(), 1, 1), rm.double(), rv.double(),
                               gamma.detach().double(), beta.detach().double(), False, 0.1, 1e-5))
    assert ev.dtype == dtype
    assert_close_to_reference(ev, want, RTOL_BN[dtype], "eval output")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_fake_kernels_give_torch_dtypes(dtype):
    """Under FakeTensorMode every op's output has the dtype its eager CPU run gives."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def calls(x, w, gamma):
        ops = torch.ops.cnnext
        out, conv_out, mean, var = ops.conv_bn_relu2d_train(x, w, None, gamma, None, 1e-5, [1, 1], [1, 1], [1, 1],
                                                            1, True)
        back = ops.conv_bn_relu2d_train_backward(out, out, conv_out, mean, var, gamma, 1e-5, True)
        pooled, idx = ops.max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
        return [ops.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1), out, conv_out, mean, var, *back, pooled, idx,
                ops.avg_pool2d(x, [2, 2], [2, 2], [0, 0], False, True, None),
                ops.adaptive_avg_pool2d(x, [3, 3]),
                ops.max_unpool2d(pooled, idx, [6, 6]),
                ops.conv_transpose2d(x, w.transpose(0, 1).contiguous(), None, [1, 1], [0, 0], [0, 0], 1, [1, 1])]

    args = (torch.randn(2, 3, 6, 6).to(dtype), torch.randn(4, 3, 3, 3).to(dtype), torch.rand(4) + 0.5)
    eager = calls(*args)
    with FakeTensorMode() as mode:
        fake = calls(*(mode.from_tensor(a) for a in args))
    for i, (e, f) in enumerate(zip(eager, fake)):
        assert (e.dtype, e.shape) == (f.dtype, f.shape), f"result {i}: eager {e.dtype} {tuple(e.shape)}, fake {f.dtype}"


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_opcheck(dtype):
    x = torch.randn(2, 3, 7, 7).to(dtype)
    w = torch.randn(4, 3, 3, 3).to(dtype)
    torch.library.opcheck(torch.ops.cnnext.conv2d, (x, w, None, [1, 1], [1, 1], [1, 1], 1))
    torch.library.opcheck(torch.ops.cnnext.max_pool2d_with_indices, (x, [2, 2], [2, 2], [0, 0], [1, 1], False))
    torch.library.opcheck(torch.ops.cnnext.avg_pool2d, (x, [3, 3], [2, 2], [1, 1], False, True, None))


def test_other_dtypes_still_raise():
    with pytest.raises(NotImplementedError, match=r"conv2d: expected input to be float16, bfloat16, float32 or float64, "
                                        r"got Int on cpu"):
        cf.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.int32), torch.ones(1, 1, 1, 1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="expected weight to have the same dtype as input"):
        cf.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.bfloat16), torch.ones(1, 1, 1, 1))
    with pytest.raises(RuntimeError, match=r"expected bn_weight to have dtype BFloat16 or float32, got Double"):
        cf.conv_bn_relu2d(torch.ones(2, 1, 3, 3, dtype=torch.bfloat16), torch.ones(1, 1, 1, 1, dtype=torch.bfloat16),
                          None, torch.ones(1, dtype=torch.float64), None, None, None, True)


def _has_avx512_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read() and cnnext._C._cpu_isa() == "avx512"
    except OSError:
        return False


GEMM = [
    # input, weight, stride, padding, dilation, groups: the shapes the vdpbf16ps GEMM takes,
    # panels with tails (pixels not a multiple of 32, channels not of 8, odd K)
    ((2, 16, 14, 14), (24, 16, 3, 3), 1, 1, 1, 1),
    ((1, 3, 33, 35), (5, 3, 7, 7), 2, 3, 1, 1),       # a stem: stride 2 (the gathered panels), odd K
    ((2, 8, 7, 7), (16, 4, 3, 3), 1, (2, 0), (2, 1), 2),
    ((1, 32, 9, 40), (8, 32, 1, 1), 1, 0, 1, 1),      # 1x1, rows longer than a panel
    ((3, 5, 4, 3), (7, 5, 2, 2), 1, 0, 1, 1),         # panels spanning many short rows
    ((1, 64, 9, 9), (16, 64, 3, 3), 1, 1, 1, 1),      # K = 576: two K blocks of <= 256 pairs
    ((2, 130, 6, 7), (20, 130, 2, 2), 1, 0, 1, 1),    # K = 520: a 4-pair last block
    ((1, 130, 5, 5), (8, 130, 3, 3), 1, 1, 1, 1),     # K = 1170: three blocks, the last odd
    # pixel panels spanning samples (pixels numbered across the batch): a 7x7 map (ResNet's
    # layer4: 3 x 49 pixels, sample ends inside panels and rows), stride 2 with 9 pixels a
    # sample (four samples to a panel), stride 3 (the gathered panels) with 4
    ((3, 16, 7, 7), (24, 16, 3, 3), 1, 1, 1, 1),
    ((5, 8, 5, 6), (16, 8, 3, 3), 2, 1, 1, 1),
    ((9, 4, 8, 8), (8, 4, 3, 3), 3, 0, 1, 1),
    # the channel-pair GEMM with groups: each group's pairs from its own channels (K = 288
    # in three groups, 25 pixel panels a group)
    ((2, 96, 20, 20), (48, 32, 3, 3), 1, 1, 1, 3),
]


@pytest.fixture
def bf16_direct_off():
    prev = cnnext._C._get_bf16_direct()
    cnnext._C._set_bf16_direct(False)
    yield
    cnnext._C._set_bf16_direct(prev)


@pytest.mark.skipif(not _has_avx512_bf16(), reason="needs a CPU with AVX512_BF16")
@pytest.mark.parametrize("relu_bias", [False, True])
@pytest.mark.parametrize("cfg", range(len(GEMM)))
def test_bf16_gemm_path(cfg, relu_bias, bf16_direct_off):
    """The vdpbf16ps GEMM runs (path counter) and is within one rounding of float64 (the
    float sums of exact bfloat16 products: ~1e-6 before the final rounding to 2^-8). The
    direct forward, which takes most of these shapes first, is off here
    (tests/test_conv2d_bf16_direct.py tests it)."""
    from cnnext._paths import expect_path

    xs, ws, s, p, d, g = GEMM[cfg]
    gen = torch.Generator().manual_seed(cfg)
    x, w, b = (torch.randn(sh, generator=gen).bfloat16() for sh in (xs, ws, (ws[0],)))
    # The channel-pair GEMM: even channels a group, more than one tap, column stride 1.
    pairs = ws[1] % 2 == 0 and ws[2] * ws[3] > 1 and torch.nn.modules.utils._pair(s)[1] == 1
    before = cnnext._C._path_counts()["conv2d.fwd.bf16_gemm_pairs"]
    with expect_path("conv2d.fwd.bf16_gemm"):
        if relu_bias:  # the fused op's eval path: bias and ReLU in the GEMM's epilogue
            out = torch.ops.cnnext.conv_bn_relu2d_eval(x, w, b, None, None, torch.zeros(ws[0]),
                                                        torch.ones(ws[0]) - 1e-5, 1e-5, list(torch.nn.modules.utils._pair(s)),
                                                        list(torch.nn.modules.utils._pair(p)),
                                                        list(torch.nn.modules.utils._pair(d)), g, True)
        else:
            out = cf.conv2d(x, w, None, s, p, d, g)
    assert (cnnext._C._path_counts()["conv2d.fwd.bf16_gemm_pairs"] > before) == pairs
    want = F.conv2d(x.double(), w.double(), b.double() if relu_bias else None, s, p, d, g)
    if relu_bias:
        want = want.relu()
    assert out.dtype == torch.bfloat16
    assert_close_to_reference(out, want, 5e-3, "bf16 GEMM vs float64")
    assert_close_to_reference(out, F.conv2d(x, w, b if relu_bias else None, s, p, d, g).double().clamp_min(
        0 if relu_bias else -float("inf")), 1e-2, "bf16 GEMM vs stock bf16")


def test_bf16_without_avx512_bf16():
    """CNNEXT_CPU_ISA=avx2 (no AVX512_BF16): the bfloat16 convolution and its gradients
    (stride 1 and 2) and the fused op's batch-norm sweeps run the generic code, within
    rounding of float64, and none of the AVX512_BF16 paths runs; bfloat16 max pooling
    runs the generic rows, not the AVX-512 kernel, bit-exact against stock."""
    import os
    import subprocess
    import sys

    script = """
import torch, torch.nn.functional as F, cnnext
from cnnext import _C
assert _C._cpu_isa() == "avx2", _C._cpu_isa()
g = torch.Generator().manual_seed(0)
x, w = torch.randn(2, 16, 14, 14, generator=g).bfloat16(), torch.randn(24, 16, 3, 3, generator=g).bfloat16()
before = _C._path_counts()["conv2d.fwd.bf16_gemm"]
y = cnnext.functional.conv2d(x, w, None, 1, 1)
assert _C._path_counts()["conv2d.fwd.bf16_gemm"] == before
want = F.conv2d(x.double(), w.double(), None, 1, 1)
err = (y.double() - want).abs().max().item() / want.abs().max().item()
assert y.dtype == torch.bfloat16 and err <= 5e-3, err
bf16_paths = ["conv2d.fwd.bf16_gemm", "conv2d.fwd.bf16_direct", "conv2d.input_grad.bf16_flip",
              "conv2d.input_grad.bf16_gemm", "conv2d.input_grad.bf16_phases", "conv2d.weight_grad.bf16_gemm",
              "conv2d.weight_grad.bf16_direct"]
for stride in (1, 2):
    before = {k: _C._path_counts()[k] for k in bf16_paths}
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = cnnext.functional.conv2d(xs, ws, None, stride, 1)
    gy = torch.randn(out.shape, generator=g).bfloat16()
    grads = torch.autograd.grad(out, (xs, ws), gy)
    assert {k: _C._path_counts()[k] for k in bf16_paths} == before
    wide = [x.double().requires_grad_(), w.double().requires_grad_()]
    refs = torch.autograd.grad(F.conv2d(*wide, None, stride, 1), wide, gy.double())
    for a, r in zip(grads, refs):
        err = (a.double() - r).abs().max().item() / r.abs().max().item()
        assert a.dtype == torch.bfloat16 and err <= 5e-3, (stride, err)
# the bfloat16 Winograd runs on the AVX2 transforms: the shape's own choice (without
# AVX512_BF16 every shape choose_tile takes), and a forced tile
for tile in (0, 4):
    _C._set_winograd_tile(tile)
    before = {k: _C._path_counts()[k] for k in ("conv2d.fwd.winograd_bf16", "conv2d.winograd.avx2")}
    y = cnnext.functional.conv2d(x, w, None, 1, 1)
    assert all(_C._path_counts()[k] == before[k] + 1 for k in before), tile
_C._set_winograd_tile(0)
err = (y.double() - want).abs().max().item() / want.abs().max().item()
assert y.dtype == torch.bfloat16 and err <= 5e-3, err
sweeps = ["conv_bn_relu2d.train.bf16_sweeps", "conv_bn_relu2d.backward.bf16_sweeps"]
before = {k: _C._path_counts()[k] for k in sweeps}
xs = x.clone().requires_grad_()
out = cnnext.functional.conv_bn_relu2d(xs, w, None, None, None, None, None, True, 0.1, 1e-5, 1, 1)
gx, = torch.autograd.grad(out, (xs,), torch.randn(out.shape, generator=g).bfloat16())
assert {k: _C._path_counts()[k] for k in sweeps} == before
want = F.relu(F.batch_norm(F.conv2d(x.double(), w.double(), None, 1, 1), None, None, None, None, True))
err = (out.double() - want).abs().max().item() / want.abs().max().item()
assert out.dtype == torch.bfloat16 and err <= 8e-2, err
# max pooling: not the AVX-512 bfloat16 rows kernel, still bit-exact against stock
xp = (2 * torch.randn(2, 3, 21, 37, generator=g)).round().bfloat16()
before = _C._path_counts()["max_pool2d.fwd.avx512_rows_bf16"]
for kw in (dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2)):
    out, idx = cnnext.functional.max_pool2d(xp, return_indices=True, **kw)
    ref, ref_idx = F.max_pool2d(xp, return_indices=True, **kw)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16)) and torch.equal(idx, ref_idx)
assert _C._path_counts()["max_pool2d.fwd.avx512_rows_bf16"] == before
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(cnnext.__file__)))
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=dict(os.environ, CNNEXT_CPU_ISA="avx2"),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "ok"


def _has_winograd():
    return cnnext._C._cpu_isa() in ("avx512", "avx2")


WINO_BF16 = [
    # input, weight, padding, forced tile (0: the shape's own choice), bias + ReLU, layout
    ((1, 128, 48, 48), (128, 128, 3, 3), 1, 0, False, "contiguous"),  # wide layer, wide map: chosen
    ((2, 16, 13, 11), (24, 16, 3, 3), 1, 4, True, "contiguous"),      # tile forced; partial tiles
    ((2, 16, 13, 11), (24, 16, 3, 3), 0, 2, False, "channels_last"),  # F(2x2), no padding, strided input
    ((1, 32, 9, 10), (40, 32, 3, 3), 2, 4, True, "channels_last"),    # padding 2, channels_last output
]


@pytest.mark.skipif(not _has_winograd(), reason="needs AVX-512F or AVX2 + FMA")
@pytest.mark.parametrize("cfg", range(len(WINO_BF16)))
def test_bf16_winograd_forward(cfg):
    """bfloat16 3x3 stride-1 forward by the float32 Winograd (path counter): bfloat16 values
    are exact in float and the float Winograd's error (<= 2e-5 of max |y|) is far inside the
    one final rounding, so the bounds are the GEMM's: one bfloat16 rounding of float64 (5e-3
    of max |ref|) and two of stock bfloat16 (1e-2). The switch (cnnext.backends.cpu.winograd)
    turns it off: the vdpbf16ps GEMM or the float path runs instead, as accurate."""
    from cnnext._paths import expect_path

    xs, ws, p, tile, relu_bias, layout = WINO_BF16[cfg]
    gen = torch.Generator().manual_seed(300 + cfg)
    x, w, b = (torch.randn(sh, generator=gen).bfloat16() for sh in (xs, ws, (ws[0],)))
    x = to_layout(x, layout)
    want = F.conv2d(x.double(), w.double(), b.double() if relu_bias else None, 1, p)
    stock = F.conv2d(x, w, b if relu_bias else None, 1, p).double()
    if relu_bias:
        want, stock = want.relu(), stock.relu()

    def run():
        if relu_bias:  # the fused op's eval path: bias and ReLU in the output transform
            return torch.ops.cnnext.conv_bn_relu2d_eval(x, w, b, None, None, torch.zeros(ws[0]),
                                                         torch.ones(ws[0]) - 1e-5, 1e-5, [1, 1], [p, p], [1, 1], 1,
                                                         True)
        return cf.conv2d(x, w, None, 1, p)

    old = cnnext._C._get_winograd_tile()
    cnnext._C._set_winograd_tile(tile)
    try:
        m = tile or 4  # F(4x4): the shape's choice for the wide layer
        with cnnext.backends.cpu.flags(winograd=True), expect_path("conv2d.fwd.winograd_bf16", f"conv2d.winograd.f{m}x{m}"):
            out = run()
        assert out.dtype == torch.bfloat16 and out.shape == want.shape
        assert_close_to_reference(out, want, 5e-3, "bf16 Winograd vs float64")
        assert_close_to_reference(out, stock, 1e-2, "bf16 Winograd vs stock bf16")
        if layout == "channels_last":  # the output keeps the input's layout, as stock's
            assert out.is_contiguous(memory_format=torch.channels_last)
        before = cnnext._C._path_counts()["conv2d.fwd.winograd_bf16"]
        with cnnext.backends.cpu.flags(winograd=False):
            off = run()
        assert cnnext._C._path_counts()["conv2d.fwd.winograd_bf16"] == before
        assert_close_to_reference(off, want, 5e-3, "bf16 with Winograd off vs float64")
    finally:
        cnnext._C._set_winograd_tile(old)


@pytest.mark.skipif(not _has_winograd(), reason="needs AVX-512F or AVX2 + FMA")
@pytest.mark.parametrize("cfg", range(len(WINO_BF16)))
def test_bf16_winograd_input_grad(cfg):
    """The bfloat16 input gradient of a 3x3 stride-1 convolution by the float Winograd (the
    flipped forward; path counter), in the input's layout, within the bounds of the GEMM
    backward: 5e-3 of float64, 1e-2 plus stock's own error of stock bfloat16; with the switch
    off it does not run."""
    from cnnext._paths import expect_path

    xs, ws, p, tile, _, layout = WINO_BF16[cfg]
    gen = torch.Generator().manual_seed(400 + cfg)
    x, w = torch.randn(xs, generator=gen).bfloat16(), torch.randn(ws, generator=gen).bfloat16()
    x = to_layout(x, layout)
    gy = torch.randn(F.conv2d(x, w, None, 1, p).shape, generator=gen).bfloat16()
    wide = [x.double().requires_grad_(), w.double()]
    ref, = torch.autograd.grad(F.conv2d(*wide, None, 1, p), wide[:1], gy.double())
    xst = x.clone().requires_grad_()
    stock, = torch.autograd.grad(F.conv2d(xst, w, None, 1, p), (xst,), gy)

    def grad():
        xo = x.clone().requires_grad_()
        return torch.autograd.grad(cf.conv2d(xo, w, None, 1, p), (xo,), gy)[0]

    old = cnnext._C._get_winograd_tile()
    cnnext._C._set_winograd_tile(tile)
    try:
        with cnnext.backends.cpu.flags(winograd=True), expect_path("conv2d.input_grad.winograd_bf16"):
            gx = grad()
        assert gx.dtype == torch.bfloat16 and gx.shape == ref.shape
        assert_close_to_reference(gx, ref, 5e-3, "bf16 Winograd input gradient vs float64")
        assert_close_to_reference(gx, stock.double(), 1e-2 + _stock_error(stock, ref),
                                  "bf16 Winograd input gradient vs stock bf16")
        if layout == "channels_last":
            assert gx.is_contiguous(memory_format=torch.channels_last)
        before = cnnext._C._path_counts()["conv2d.input_grad.winograd_bf16"]
        with cnnext.backends.cpu.flags(winograd=False):
            off = grad()
        assert cnnext._C._path_counts()["conv2d.input_grad.winograd_bf16"] == before
        assert_close_to_reference(off, ref, 5e-3, "bf16 input gradient with Winograd off vs float64")
    finally:
        cnnext._C._set_winograd_tile(old)


WINO_BF16_BITS = [
    # input, out channels, padding, tile, bias, layout: maps whose width fills whole rows of 8
    # tiles (the AVX2 row stores) and maps with partial tiles (lane stores)
    ((2, 16, 32, 32), 24, 1, 4, True, "contiguous"),
    ((1, 24, 16, 16), 16, 1, 2, False, "contiguous"),
    ((2, 16, 13, 11), 24, 1, 4, True, "channels_last"),
    ((1, 16, 9, 12), 17, 0, 2, True, "contiguous"),
    ((1, 16, 14, 15), 16, 2, 6, False, "channels_last"),
]


@pytest.mark.skipif(not _has_winograd(), reason="needs AVX-512F or AVX2 + FMA")
@pytest.mark.parametrize("cfg", range(len(WINO_BF16_BITS)))
def test_bf16_winograd_bits_of_float_winograd(cfg):
    """The bfloat16 Winograd computes in float exactly what the float32 Winograd computes on
    the bfloat16 values (exact in float) and rounds each output once, to nearest even: its
    output is bit for bit the float32 Winograd's output converted by .bfloat16(), forward and
    input gradient, through row stores and lane stores, any layout (both paths asserted)."""
    from cnnext._paths import expect_path

    xs, o, p, tile, with_bias, layout = WINO_BF16_BITS[cfg]
    gen = torch.Generator().manual_seed(500 + cfg)
    x = to_layout(torch.randn(xs, generator=gen).bfloat16(), layout)
    w = torch.randn(o, xs[1], 3, 3, generator=gen).bfloat16()
    b = torch.randn(o, generator=gen).bfloat16() if with_bias else None
    old = cnnext._C._get_winograd_tile()
    cnnext._C._set_winograd_tile(tile)
    try:
        with cnnext.backends.cpu.flags(winograd=True):
            rows = ["conv2d.winograd.avx2_row_stores"] if cnnext._C._cpu_isa() == "avx2" and cfg < 2 else []
            with expect_path("conv2d.fwd.winograd_bf16", f"conv2d.winograd.f{tile}x{tile}", *rows):
                y = cf.conv2d(x, w, b, 1, p)
            with expect_path(f"conv2d.winograd.f{tile}x{tile}"):
                y32 = cf.conv2d(x.float(), w.float(), None if b is None else b.float(), 1, p)
            assert torch.equal(y.view(torch.int16), y32.bfloat16().view(torch.int16))
            gy = torch.randn(y.shape, generator=gen).bfloat16()
            xb = x.clone().requires_grad_()
            with expect_path("conv2d.input_grad.winograd_bf16"):
                gx, = torch.autograd.grad(cf.conv2d(xb, w, None, 1, p), (xb,), gy)
            xf = x.float().requires_grad_()
            with expect_path("conv2d.input_grad.winograd"):
                gx32, = torch.autograd.grad(cf.conv2d(xf, w.float(), None, 1, p), (xf,), gy.float())
            assert torch.equal(gx.view(torch.int16), gx32.bfloat16().view(torch.int16))
            if layout == "channels_last":
                assert y.is_contiguous(memory_format=torch.channels_last)
    finally:
        cnnext._C._set_winograd_tile(old)


@pytest.mark.skipif(not _has_winograd(), reason="needs AVX-512F or AVX2 + FMA")
def test_bf16_winograd_nonfinite_falls_back():
    """An Inf in the input makes the bfloat16 Winograd give up (its transforms would spread
    NaN over the tile): the direct path runs and gives stock's Inf / NaN pattern."""
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(1, 16, 9, 9, generator=gen).bfloat16(), torch.randn(16, 16, 3, 3, generator=gen).bfloat16()
    x[0, 3, 4, 4] = float("inf")
    old = cnnext._C._get_winograd_tile()
    cnnext._C._set_winograd_tile(4)
    try:
        before = cnnext._C._path_counts()["conv2d.winograd.nonfinite_fallback"]
        with cnnext.backends.cpu.flags(winograd=True):
            out = cf.conv2d(x, w, None, 1, 1)
        assert cnnext._C._path_counts()["conv2d.winograd.nonfinite_fallback"] > before
    finally:
        cnnext._C._set_winograd_tile(old)
    ref = F.conv2d(x, w, None, 1, 1)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    fin = ref.isfinite()
    assert_close_to_reference(out[fin], ref[fin].double(), 1e-2, "finite outputs vs stock bf16")


BWD = [
    # input, weight, stride, padding, dilation, groups: the shapes the bfloat16 backward
    # kernels take (>= 8 output channels per group), with panel tails (output channels not
    # a multiple of 8 or 32, pixels not of 32, odd pixel counts: a pixel pair padded with 0)
    ((2, 16, 14, 14), (24, 16, 3, 3), 1, 1, 1, 1),
    ((1, 3, 33, 33), (8, 3, 7, 7), 2, 3, 1, 1),         # a stem: stride 2, odd K, 17x17 pixels
    ((2, 8, 9, 7), (32, 4, 3, 3), 1, (2, 0), (2, 1), 2),  # groups, dilation, 45 pixels
    ((1, 32, 9, 40), (8, 32, 1, 1), 1, 0, 1, 1),        # 1x1
    ((3, 5, 4, 3), (9, 5, 2, 2), 1, 0, 1, 1),           # 9 output channels: a one-row tail
    ((2, 12, 11, 13), (40, 12, 3, 3), (2, 3), 1, 1, 1),  # two strides, two output-channel panels
    ((1, 8, 6, 6), (16, 8, 3, 3), 1, 3, 1, 1),          # padding beyond the kernel: a cropped flip
    ((2, 16, 9, 9), (32, 16, 1, 1), 2, 0, 1, 1),        # ResNet's 1x1 stride-2 shortcut
    ((2, 16, 20, 20), (16, 16, 3, 3), 1, 1, 1, 1),      # 400 pixels: several reduction chunks
    ((2, 32, 8, 8), (32, 8, 3, 3), 2, 1, 1, 4),         # groups with stride 2
    ((1, 16, 10, 11), (24, 16, 3, 2), 3, (0, 1), (1, 2), 1),  # stride 3, uneven kernel
    ((1, 16, 8, 8), (72, 16, 3, 3), 1, 1, 1, 1),        # flipped K = 648: the forward's K blocks
    ((3, 16, 7, 7), (16, 16, 3, 3), 1, 1, 1, 1),        # 7x7 maps: flipped panels spanning samples
    # strides without dilation: the phase decomposition (stride 3 with a 2-tap kernel leaves
    # phases no tap reaches; odd sizes give phases of unequal size; padding beyond the kernel),
    # at >= 1024 output pixels a batch (fewer take the GEMM + col2im, as the shapes above)
    ((3, 8, 70, 63), (16, 8, 2, 2), 3, 0, 1, 1),
    ((2, 16, 65, 63), (24, 16, 3, 3), 2, 1, 1, 1),
    ((1, 8, 70, 90), (16, 8, 5, 3), (2, 3), (3, 2), 1, 1),
    ((2, 12, 64, 64), (24, 6, 3, 3), 2, 0, 1, 2),       # groups
]


@pytest.mark.skipif(not _has_avx512_bf16(), reason="needs a CPU with AVX512_BF16")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cfg", range(len(BWD)))
def test_bf16_backward_paths(cfg, layout, bf16_direct_off):
    """The vdpbf16ps backward kernels run (path counters: the flipped forward for stride 1,
    the flipped forwards of the stride's phases for other strides without dilation, the
    GEMM + col2im with dilation; the weight gradient's GEMM; the direct forward and weight
    gradient, which take most of these shapes first, are off here: tests/test_conv2d_bf16_direct.py
    tests them on these shapes) and each gradient is within one
    bfloat16 rounding of float64 from the same rounded values (float accumulation: ~1e-6
    before the final rounding, u = 2^-8 = 3.9e-3 of max |ref|: bound 5e-3) and within
    two roundings of stock bfloat16 (1e-2, plus stock's own error against float64)."""
    from cnnext._paths import expect_path

    xs, ws, s, p, d, g = BWD[cfg]
    gen = torch.Generator().manual_seed(100 + cfg)
    x, w, b = (torch.randn(sh, generator=gen).bfloat16() for sh in (xs, ws, (ws[0],)))
    x = to_layout(x, layout)
    stride1 = torch.nn.modules.utils._pair(s) == (1, 1)
    undilated = torch.nn.modules.utils._pair(d) == (1, 1)
    ours_in = [t.detach().requires_grad_() for t in (x, w, b)]
    out = cf.conv2d(*ours_in, s, p, d, g)
    phases = undilated and out.shape[0] * out.shape[2] * out.shape[3] >= 1024
    paths = ("conv2d.input_grad.bf16_flip" if stride1 else
             "conv2d.input_grad.bf16_phases" if phases else "conv2d.input_grad.bf16_gemm",
             "conv2d.weight_grad.bf16_gemm")
    gy = torch.randn(out.shape, generator=gen).bfloat16()
    with expect_path(*paths):
        ours = torch.autograd.grad(out, ours_in[:2], gy)
    wide_in = [t.detach().double().requires_grad_() for t in (x, w)]
    ref = torch.autograd.grad(F.conv2d(*wide_in, None, s, p, d, g), wide_in, gy.double())
    stock_in = [t.detach().requires_grad_() for t in (x, w)]
    stock = torch.autograd.grad(F.conv2d(*stock_in, None, s, p, d, g), stock_in, gy)
    for name, a, r, st in zip(("grad_input", "grad_weight"), ours, ref, stock):
        assert a.dtype == torch.bfloat16 and a.shape == r.shape, name
        assert_close_to_reference(a, r, 5e-3, f"bf16 backward {name} vs float64")
        assert_close_to_reference(a, st.double(), 1e-2 + _stock_error(st, r), f"bf16 backward {name} vs stock bf16")
    if layout == "channels_last":  # the input gradient keeps the input's layout, as stock's
        assert ours[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not _has_avx512_bf16(), reason="needs a CPU with AVX512_BF16")
@pytest.mark.parametrize("stride", [1, 2])
def test_bf16_backward_empty_batch(stride):
    """N = 0: an empty input gradient and a zero weight gradient, as stock's."""
    from cnnext._paths import expect_path

    x = torch.randn(0, 16, 8, 8).bfloat16().requires_grad_()
    w = torch.randn(16, 16, 3, 3).bfloat16().requires_grad_()
    out = cf.conv2d(x, w, None, stride, 1)
    with expect_path("conv2d.input_grad.bf16_flip" if stride == 1 else "conv2d.input_grad.bf16_gemm",
                     "conv2d.weight_grad.bf16_direct"):
        gx, gw = torch.autograd.grad(out, (x, w), torch.zeros_like(out))
    assert gx.shape == x.shape and gx.dtype == torch.bfloat16
    assert gw.dtype == torch.bfloat16 and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.skipif(not _has_avx512_bf16(), reason="needs a CPU with AVX512_BF16")
def test_bf16_backward_training_step_matches_stock():
    """A conv net's bfloat16 gradients through several layers (stride 1 and 2, groups)
    track stock's bfloat16 ones: relative to max |stock|, within the few roundings each
    layer adds (5e-2; float64 reference within the same)."""
    def net(conv, ws, x):
        h = conv(x, ws[0], None, 1, 1).relu()
        h = conv(h, ws[1], None, 2, 1).relu()
        h = conv(h, ws[2], None, 1, 1, 1, 2)
        return h.float().square().mean()

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 8, 16, 16, generator=gen).bfloat16()
    shapes = [(16, 8, 3, 3), (32, 16, 3, 3), (32, 16, 3, 3)]
    ws = [(torch.randn(sh, generator=gen) * 0.2).bfloat16() for sh in shapes]
    ours = [t.clone().requires_grad_() for t in ws]
    stock = [t.clone().requires_grad_() for t in ws]
    wide = [t.double().requires_grad_() for t in ws]
    g_ours = torch.autograd.grad(net(cf.conv2d, ours, x), ours)
    g_stock = torch.autograd.grad(net(F.conv2d, stock, x), stock)
    g_wide = torch.autograd.grad(net(F.conv2d, wide, x.double()), wide)
    for a, s, r in zip(g_ours, g_stock, g_wide):
        assert_close_to_reference(a, r, 5e-2, "bf16 net gradient vs float64")
        assert_close_to_reference(a, s.double(), 5e-2, "bf16 net gradient vs stock bf16")


@pytest.mark.skipif(not _has_avx512_bf16(), reason="needs a CPU with AVX512_BF16")
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", [(2, 8, 17, 19), (3, 16, 4, 5)], ids=["323px", "20px"])
def test_bf16_bn_sweeps_path(shape, relu):
    """conv_bn_relu2d in training mode on bfloat16 planes runs the AVX-512 batch-norm sweeps
    (path counters, forward and backward; planes of 323 pixels: two float chunks of 256 and
    a 16-lane tail, and of 20) and matches the stock triple in bfloat16 and float64 within
    half_cpu_bn (the rounded convolution output magnified by the normalisation)."""
    from cnnext._paths import expect_path

    n, c, h, w = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).bfloat16()
    wt = torch.randn(2 * c, c, 3, 3, generator=gen).bfloat16()
    gamma, beta = torch.rand(2 * c, generator=gen) + 0.5, torch.randn(2 * c, generator=gen)
    runs = []
    for dt in (torch.bfloat16, torch.float64):
        xi, wi = x.to(dt).requires_grad_(), wt.to(dt).requires_grad_()
        gi, bi = gamma.to(dt if dt == torch.float64 else torch.float32).requires_grad_(), \
            beta.to(dt if dt == torch.float64 else torch.float32).requires_grad_()
        rm, rv = torch.zeros(2 * c, dtype=gi.dtype), torch.ones(2 * c, dtype=gi.dtype)
        if dt == torch.bfloat16:
            with expect_path("conv_bn_relu2d.train.bf16_sweeps"):
                out = cf.conv_bn_relu2d(xi, wi, None, gi, bi, rm, rv, True, 0.1, 1e-5, 1, 1, relu=relu)
        else:
            out = F.batch_norm(F.conv2d(xi, wi, None, 1, 1), rm, rv, gi, bi, True, 0.1, 1e-5)
            out = out.relu() if relu else out
        gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
        if dt == torch.bfloat16:
            with expect_path("conv_bn_relu2d.backward.bf16_sweeps"):
                grads = torch.autograd.grad(out, (xi, wi, gi, bi), gy)
        else:
            grads = torch.autograd.grad(out, (xi, wi, gi, bi), gy)
        runs.append([out.detach(), *grads, rm, rv])
    stock_in = [x.clone().requires_grad_(), wt.clone().requires_grad_(), gamma.clone().requires_grad_(),
                beta.clone().requires_grad_()]
    rm, rv = torch.zeros(2 * c), torch.ones(2 * c)
    out = F.batch_norm(F.conv2d(stock_in[0], stock_in[1], None, 1, 1), rm, rv, stock_in[2], stock_in[3], True, 0.1,
                       1e-5)
    out = out.relu() if relu else out
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    stock = [out.detach(), *torch.autograd.grad(out, stock_in, gy), rm, rv]
    for name, a, r, s in zip(["output", "grad_input", "grad_weight", "grad_gamma", "grad_beta", "running_mean",
                              "running_var"], *runs, stock):
        assert a.dtype == s.dtype, name
        assert_close_to_reference(a, r, RTOL_BN[torch.bfloat16], f"{name} vs float64")
        assert_close_to_reference(a, s.double(), RTOL_BN[torch.bfloat16], f"{name} vs stock bf16")


def _has_avx512():
    return cnnext._C._cpu_isa() == "avx512"


POOL_ROWS = [
    # shape, kwargs: the AVX-512 bfloat16 rows kernel (column stride 1 or 2), with rows of
    # several 16-lane vectors, masked tails, padding, dilation and ceil_mode
    ((2, 3, 37, 41), dict(kernel_size=3, stride=2, padding=1)),     # ResNet's stem pool, odd sizes
    ((1, 4, 18, 70), dict(kernel_size=2, stride=2)),                 # VGG's 2x2/2, 35 outputs a row
    ((2, 2, 23, 40), dict(kernel_size=(2, 3), stride=(3, 1), padding=(1, 1))),  # stride 1 columns
    ((1, 3, 30, 45), dict(kernel_size=3, stride=2, dilation=2, ceil_mode=True)),
    ((1, 2, 9, 33), dict(kernel_size=(1, 4), stride=(1, 2), padding=(0, 2), ceil_mode=True)),
]


@pytest.mark.skipif(not _has_avx512(), reason="needs AVX-512")
@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("cfg", range(len(POOL_ROWS)))
def test_bf16_max_pool2d_avx512_rows(cfg, sliced):
    """bfloat16 max pooling on the AVX-512 rows kernel (path counter): outputs bit-exact
    and indices equal to stock bfloat16's, with ties, NaNs, infinities and -inf windows;
    the gradient bit-exact where windows do not overlap."""
    from cnnext._paths import expect_path

    shape, kw = POOL_ROWS[cfg]
    gen = torch.Generator().manual_seed(100 + cfg)
    x = ((2 * torch.randn(shape, generator=gen)).round() / 2).bfloat16()  # many ties
    x[0, 0, 1, 1] = float("nan")
    x[0, -1, 2, 5:9] = float("-inf")
    x[-1, 0, 3, 2] = float("inf")
    x[-1, -1, 4:6, 7] = float("nan")
    if sliced:  # rows with a stride of their own
        x = torch.cat([x, x.flip(-1)], -1)[..., : shape[-1]]
        assert not x.is_contiguous() and x.stride(-1) == 1
    with expect_path("max_pool2d.fwd.avx512_rows_bf16"):
        out, idx = cf.max_pool2d(x, return_indices=True, **kw)
    ref, ref_idx = F.max_pool2d(x, return_indices=True, **kw)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))
    assert torch.equal(idx, ref_idx)
    xr = x.nan_to_num(0.0, 0.0, 0.0).requires_grad_()
    xs = xr.detach().clone().requires_grad_()
    gy = torch.randn(ref.shape, generator=gen).bfloat16()
    ours, = torch.autograd.grad(cf.max_pool2d(xr, **kw), (xr,), gy)
    stock, = torch.autograd.grad(F.max_pool2d(xs, **kw), (xs,), gy)
    stride = kw.get("stride", kw["kernel_size"])
    if stride == kw["kernel_size"] and kw.get("dilation", 1) == 1:
        assert torch.equal(ours, stock)
    else:
        assert_close_to_reference(ours, stock.double(), RTOL[torch.bfloat16], "bf16 max_pool2d grad vs stock")
