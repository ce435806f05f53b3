"""The implicit-GEMM CUDA conv2d (csrc/cuda/conv2d_igemm_kernels.cuh) on a GPU: forward (with the
bias / folded-BN + ReLU epilogue), input backward and weight backward (split K), against torch.nn.functional in
float64 on the CPU and against cnnext's CPU backend.

$CNNEXT_CUDA_IGEMM=1 sends every supported problem through the GEMM kernels, so small
odd shapes (partial tiles in every dimension) reach them; =0 the direct kernels. The
float32 path follows torch.backends.cudnn.allow_tf32: strict fp32 (SIMT) when off, TF32
tensor cores when on. Every test needs a GPU (compute capability >= 8.0) and a cnnext
build with CUDA kernels, and skips itself otherwise.
"""
import pytest
import torch
import torch.nn.functional as F

import cnnext
from cnnext.functional import conv2d, conv_bn_relu2d, conv_transpose2d

HAS_CUDA = torch.cuda.is_available() and bool(cnnext.build_info()["cuda"])
SM80 = HAS_CUDA and torch.cuda.get_device_capability()[0] >= 8
pytestmark = pytest.mark.skipif(
    not SM80, reason="needs a CUDA device of compute capability >= 8.0 and a cnnext build with CUDA kernels")

# Relative to max |reference| (float64, CPU, from the very rounded inputs). TF32 keeps
# 10 mantissa bits of each operand: ~1e-3 of the scale for these sums.
RTOL = {"strict": 2e-5, "tf32": 1e-2, torch.float16: 1e-2, torch.bfloat16: 2e-2}
MATHS = [(torch.float32, "strict"), (torch.float32, "tf32"), (torch.float16, None),
         (torch.bfloat16, None)]
LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted")

# (N, C, H, W), out_channels, (kH, kW), stride, padding, dilation, groups, bias
CONFIGS = [
    ((2, 16, 9, 11), 24, (3, 3), 1, 1, 1, 1, True),              # 2 row tiles, partial K
    ((1, 8, 12, 11), 136, (1, 1), 1, 0, 1, 1, False),            # 2 column tiles
    ((2, 12, 10, 9), 18, (3, 2), (2, 1), (0, 1), (1, 2), 3, True),
    ((1, 16, 7, 7), 16, (5, 5), 1, 2, 1, 2, True),               # 8 channels per group
    ((2, 3, 15, 13), 16, (7, 7), 2, 3, 1, 1, True),              # a stem
    ((1, 8, 9, 9), 8, (2, 2), 3, 0, 1, 1, False),                # stride > kernel
    ((3, 24, 6, 5), 40, (3, 3), 1, 2, 2, 1, True),               # dilation 2
    ((4, 64, 28, 28), 128, (3, 3), 1, 1, 1, 1, True),            # many full tiles
]


def cid(cfg):
    shape, o, k, s, p, d, g, b = cfg
    return f"x{'x'.join(map(str, shape))}-o{o}-k{k[0]}x{k[1]}-s{s}-p{p}-d{d}-g{g}-{'bias' if b else 'nobias'}"


def mid(m):
    return f"{str(m[0]).replace('torch.', '')}{'-' + m[1] if m[1] else ''}"


@pytest.fixture
def igemm(monkeypatch):
    """Every supported problem through the implicit GEMM; TF32 restored afterwards."""
    monkeypatch.setenv("CNNEXT_CUDA_IGEMM", "1")
    saved = torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32 = saved


def set_math(math):
    torch.backends.cudnn.allow_tf32 = math == "tf32"


def to_layout(t, layout):
    t = t.detach()
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "permuted":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(layout)


def tf32(t):
    """float32 t rounded as cvt.rna.tf32.f32 (10 mantissa bits, ties away from zero)."""
    u = t.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    finite = (u & 0x7F800000) != 0x7F800000
    r = torch.where(finite, (u + 0x1000) & 0xFFFFE000, u)
    r = torch.where(r >= 2**31, r - 2**32, r).to(torch.int32)
    return r.view(torch.float32).reshape(t.shape)


def check(got, want, rtol, what):
    assert got.shape == want.shape, what
    if want.numel() == 0:
        return
    got = got.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(want.abs().max().item(), 1e-30)
    err = (got - want).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} * {scale:.3e}"


def inputs(cfg, dtype):
    shape, o, (kh, kw), s, p, d, g, has_bias = cfg
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    w = torch.randn(o, shape[1] // g, kh, kw, dtype=torch.float64).to(dtype)
    b = torch.randn(o, dtype=torch.float64).to(dtype) if has_bias else None
    y = F.conv2d(x.double(), w.double(), None, s, p, d, g)
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    return x, w, b, gy


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("math", MATHS, ids=mid)
@pytest.mark.parametrize("cfg", CONFIGS, ids=cid)
def test_forward_and_gradients(cfg, math, layout, igemm):
    dtype, fmath = math
    set_math(fmath)
    _, _, _, s, p, d, g, _ = cfg
    x, w, b, gy = inputs(cfg, dtype)
    rtol = RTOL[fmath] if dtype == torch.float32 else RTOL[dtype]
    # References from the operands the kernel multiplies (TF32: rounded first, so the
    # bound measures the accumulation, with slack for TF32's own rounding of products).
    xr, wr, gyr = (tf32(t) if fmath == "tf32" else t for t in (x, w, gy))
    want_y = F.conv2d(xr.double(), wr.double(), None if b is None else b.double(), s, p, d, g)
    want_gx = torch.nn.grad.conv2d_input(x.shape, wr.double(), gyr.double(), s, p, d, g)
    want_gw = torch.nn.grad.conv2d_weight(xr.double(), w.shape, gyr.double(), s, p, d, g)
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731
    xc = to_layout(dev(x), layout).requires_grad_()
    wc = dev(w).requires_grad_()
    y = conv2d(xc, wc, dev(b), s, p, d, g)
    gx, gw = torch.autograd.grad(y, (xc, wc), to_layout(dev(gy), LAYOUTS[(LAYOUTS.index(layout) + 1) % 4]))
    check(y, want_y, rtol, "output")
    check(gx, want_gx, rtol, "grad_input")
    check(gw, want_gw, rtol, "grad_weight")
    assert y.dtype == dtype and gx.dtype == dtype
    if fmath == "strict":  # and against the CPU backend
        xcpu, wcpu = to_layout(x, layout).requires_grad_(), w.clone().requires_grad_()
        ycpu = conv2d(xcpu, wcpu, b, s, p, d, g)
        gxcpu, gwcpu = torch.autograd.grad(ycpu, (xcpu, wcpu), gy)
        check(y, ycpu.double(), rtol, "output vs cnnext CPU")
        check(gx, gxcpu.double(), rtol, "grad_input vs cnnext CPU")
        check(gw, gwcpu.double(), rtol, "grad_weight vs cnnext CPU")


@pytest.mark.parametrize("math", MATHS, ids=mid)
def test_empty_batch(math, igemm):
    dtype, fmath = math
    set_math(fmath)
    x = torch.randn(0, 16, 7, 7, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(32, 16, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    y = conv2d(x, w, None, 1, 1)
    assert y.shape == (0, 32, 7, 7)
    gx, gw = torch.autograd.grad(y, (x, w), torch.randn_like(y))
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w))  # the GEMM's K = 0: zeros


@pytest.mark.parametrize("math", MATHS, ids=mid)
def test_fused_inference_epilogue(math, igemm):
    """conv_bn_relu2d in inference: folded BN as the GEMM's bias, ReLU as it stores."""
    dtype, fmath = math
    set_math(fmath)
    x = torch.randn(3, 32, 13, 11, dtype=torch.float64).to(dtype)
    w = torch.randn(48, 32, 3, 3, dtype=torch.float64).to(dtype)
    b, gamma, beta = (torch.randn(48, dtype=torch.float64).to(dtype) for _ in range(3))
    mean = torch.randn(48, dtype=torch.float64).to(dtype)  # running stats: the input's dtype
    var = (torch.rand(48, dtype=torch.float64) + 0.5).to(dtype)
    args = lambda dev: [t.to(dev) for t in (x, w, b, gamma, beta, mean, var)]  # noqa: E731
    got = conv_bn_relu2d(*args("cuda"), False, 0.1, 1e-5, 1, 1)
    xd, wd, bd, gd, bed, md, vd = (t.double() for t in args("cpu"))
    want = F.relu(F.batch_norm(F.conv2d(xd, wd, bd, 1, 1), md, vd, gd, bed, False, 0.1, 1e-5))
    rtol = {"strict": 5e-5, "tf32": 2e-2}.get(fmath, 4 * RTOL.get(dtype, 0))
    check(got, want, rtol, "conv_bn_relu2d inference")
    assert (got >= 0).all()


@pytest.mark.parametrize("math", MATHS, ids=mid)
def test_conv_transpose_uses_input_backward(math, igemm):
    dtype, fmath = math
    set_math(fmath)
    x = torch.randn(2, 32, 7, 9, dtype=torch.float64).to(dtype)
    w = torch.randn(32, 24, 4, 4, dtype=torch.float64).to(dtype)
    b = torch.randn(24, dtype=torch.float64).to(dtype)
    got = conv_transpose2d(x.cuda(), w.cuda(), b.cuda(), 2, 1)
    xr, wr = (tf32(t) if fmath == "tf32" else t for t in (x, w))
    want = F.conv_transpose2d(xr.double(), wr.double(), b.double(), 2, 1)
    check(got, want, RTOL[fmath] if dtype == torch.float32 else RTOL[dtype], "conv_transpose2d")


def test_auto_mode_large_shape(monkeypatch):
    """Without the override a ResNet-like layer takes the GEMM (profitable) and agrees
    with the direct kernels (=0) to float32 accuracy."""
    torch.backends.cudnn.allow_tf32, saved = False, torch.backends.cudnn.allow_tf32
    try:
        x = torch.randn(8, 64, 28, 28, device="cuda")
        w = torch.randn(64, 64, 3, 3, device="cuda")
        monkeypatch.delenv("CNNEXT_CUDA_IGEMM", raising=False)
        auto = conv2d(x, w, None, 1, 1)
        monkeypatch.setenv("CNNEXT_CUDA_IGEMM", "0")
        direct = conv2d(x, w, None, 1, 1)
        check(auto, direct.double().cpu(), 2e-5, "auto vs direct")
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def test_deterministic(igemm):
    torch.backends.cudnn.allow_tf32 = False
    x = torch.randn(8, 32, 20, 20, device="cuda", requires_grad=True)
    w = torch.randn(64, 32, 3, 3, device="cuda")
    y1 = conv2d(x, w, None, 1, 1)
    y2 = conv2d(x, w, None, 1, 1)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    assert torch.equal(torch.autograd.grad(y1, x, g)[0], torch.autograd.grad(y2, x, g)[0])
    wg = w.clone().requires_grad_()
    gw1 = torch.autograd.grad(conv2d(x, wg, None, 1, 1), wg, g)[0]
    gw2 = torch.autograd.grad(conv2d(x, wg, None, 1, 1), wg, g)[0]
    assert torch.equal(gw1, gw2)  # split-K partials added in a fixed order


def test_float64_stays_direct(igemm):
    """float64 never goes through the GEMM kernels (they do not support it): exact parity."""
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    w = torch.randn(32, 16, 3, 3, dtype=torch.float64)
    got = conv2d(x.cuda(), w.cuda(), None, 1, 1)
    check(got, F.conv2d(x, w, None, 1, 1), 1e-10, "float64")


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("math", MATHS, ids=mid)
def test_fused_training_statistics_in_epilogue(math, layout, igemm):
    """conv_bn_relu2d training: the GEMM's epilogue takes the batch statistics (per-tile
    mean / M2, combined per channel); output, running statistics and gradients against
    the stock triple in float64 from the same rounded inputs. 3 x 31 x 29 rows: 22 tiles."""
    dtype, fmath = math
    set_math(fmath)
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x, w, b, beta = r(3, 16, 31, 29), r(20, 16, 3, 3), r(20), r(20)
    gamma = (torch.rand(20, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    rm, rv = r(20), (torch.rand(20, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    gy = r(3, 20, 31, 29)
    xr, wr = (tf32(t) if fmath == "tf32" else t for t in (x, w))
    leaves = [t.double().requires_grad_() for t in (xr, wr, b, gamma, beta)]
    rm_ref, rv_ref = rm.double(), rv.double()
    want = F.relu(F.batch_norm(F.conv2d(leaves[0], leaves[1], leaves[2], 1, 1), rm_ref, rv_ref, leaves[3],
                               leaves[4], True, 0.1, 1e-5))
    want_grads = torch.autograd.grad(want, leaves, gy.double())
    dev = [to_layout(x.cuda(), layout)] + [t.cuda() for t in (w, b, gamma, beta)]
    dev = [t.requires_grad_() for t in dev]
    rmc, rvc = rm.cuda(), rv.cuda()
    got = conv_bn_relu2d(*dev, rmc, rvc, True, 0.1, 1e-5, 1, 1)
    grads = torch.autograd.grad(got, dev, gy.cuda())
    rtol = {"strict": 5e-5, "tf32": 2e-2}.get(fmath, {torch.float16: 2e-2, torch.bfloat16: 8e-2}.get(dtype))
    check(got, want.detach(), rtol, "output")
    check(rmc, rm_ref, rtol, "running_mean")
    check(rvc, rv_ref, rtol, "running_var")
    if fmath == "tf32":  # TF32 backward passes: beyond what a float64 reference models
        return
    grtol = rtol if fmath != "strict" else 1e-4
    for name, a, e in zip(("x", "w", "b", "gamma", "beta"), grads, want_grads):
        if name == "b":  # the conv bias cancels under batch norm: its gradient is ~0
            scale = want_grads[4].abs().max().item()
            assert a.double().abs().max().item() <= grtol * scale, "grad b"
        else:
            check(a, e, grtol, f"grad {name}")
