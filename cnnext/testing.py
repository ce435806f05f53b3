"""What cnnext's tests and `python -m cnnext check` share: devices, memory layouts,
tolerances, the parity harness and the helpers of the nvcc host harnesses.

Only torch is needed to import it; the pytest marks (`needs_cuda`, `cpu_and_cuda()`)
and the host-harness helpers that report through pytest exist when pytest is installed.
"""
import ctypes
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass

import torch

try:
    import pytest
except ImportError:  # `python -m cnnext check` runs without pytest
    pytest = None

from . import build_info

# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------

HAS_CUDA = torch.cuda.is_available() and bool(build_info()["cuda"])
NO_CUDA_REASON = "needs a CUDA device and a cnnext build with CUDA kernels"
# The dtypes cnnext's kernels take on each device (both: float16 and bfloat16 computed in float).
DTYPES = {
    "cpu": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
}


def devices():
    """The device types this machine and this build of cnnext can run: "cpu", then
    "cuda" when there is a GPU and CUDA kernels."""
    return ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


if pytest is not None:
    needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)

    def cpu_and_cuda():
        """For @pytest.mark.parametrize("device", ...): "cpu", and "cuda" (skipped, with the
        reason, without a GPU and a CUDA build of cnnext)."""
        return ("cpu", pytest.param("cuda", marks=needs_cuda))

    def cuda_only():
        """For @pytest.mark.parametrize("device", ...) of a test that compares the CUDA
        backend with the CPU one (on the CPU it would compare the CPU backend with itself)."""
        return (pytest.param("cuda", marks=needs_cuda),)

    # The CUDA implicit GEMM's instructions (mma, cp.async) start at compute capability 8.0.
    needs_sm80 = pytest.mark.skipif(
        not (HAS_CUDA and torch.cuda.get_device_capability()[0] >= 8),
        reason="needs a CUDA device of compute capability >= 8.0 and a cnnext build with CUDA kernels")

    def sm80_only():
        """For @pytest.mark.parametrize("device", ...) of a test of the CUDA implicit GEMM."""
        return (pytest.param("cuda", marks=needs_sm80),)

    def device_dtypes(dtypes=None):
        """(device, dtype) parameters: every dtype of DTYPES[device] (or of `dtypes`, those
        the device takes) on "cpu" and "cuda", the CUDA ones marked needs_cuda."""
        params = []
        for device in ("cpu", "cuda"):
            for dtype in DTYPES[device]:
                if dtypes is None or dtype in dtypes:
                    marks = (needs_cuda,) if device == "cuda" else ()
                    params.append(pytest.param(device, dtype, marks=marks, id=f"{device}-{str(dtype)[6:]}"))
        return params


def pair(v):
    """An int or a pair as a list of two, as the torch.ops.cnnext ops take int[2]."""
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


# --------------------------------------------------------------------------------------------
# Tolerances: the largest error allowed, relative to the largest magnitude of the reference
# (or, for "conv" and "pool", of the terms it sums), per kind of comparison and dtype.
# --------------------------------------------------------------------------------------------

TOLERANCES = {
    # CPU backend against torch in float64, bounded by the magnitude of the summed terms.
    "conv": {torch.float64: 1e-12, torch.float32: 1e-5},
    "pool": {torch.float64: 1e-12, torch.float32: 2e-6},
    # `python -m cnnext check`: relative to max |torch's result| in the same dtype.
    "check": {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2},
    # Against torch in float64 on the CPU from the very (rounded) values the run sees.
    "device_conv": {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2},
    "device_pool": {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3},
    # The half types store the pre-BN convolution output in their own precision, which the
    # normalisation then magnifies by 1/std: their bounds are looser than conv2d's.
    "device_conv_bn_relu": {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 2e-2,
                            torch.bfloat16: 8e-2},
    # The CPU backend's half types against stock torch in the same dtype and against float64
    # (tests/test_half_cpu.py): float accumulation and one rounding per output, at most the
    # unit roundoff u of max |reference| (bfloat16 2^-8, float16 2^-11), twice that against
    # stock's own rounding, or where a bias is added to a rounded result (conv_transpose2d).
    "half_cpu": {torch.float16: 2e-3, torch.bfloat16: 1e-2},
    # conv_bn_relu2d: the rounded convolution output magnified by the normalisation (1/std).
    "half_cpu_bn": {torch.float16: 2e-2, torch.bfloat16: 8e-2},
    # The CUDA implicit GEMM; float32 keyed by its math: TF32 keeps 10 mantissa bits of each
    # operand, ~1e-3 of the scale for these sums.
    "device_igemm": {"strict": 2e-5, "tf32": 1e-2, torch.float16: 1e-2, torch.bfloat16: 2e-2},
    # nvcc host harnesses. float32: the worst conv case, 784 equal terms summed in one
    # partial (channel_sum of an expanded grad_output, split 1), is off by 7.5e-6.
    # float16 / bfloat16 accumulate in float, so their error is the final rounding to
    # nearest, at most the unit roundoff (2^-11 = 4.9e-4, 2^-8 = 3.9e-3) of max |reference|;
    # the bounds sit just above, so that rounding toward zero (twice the error) fails.
    "host_conv": {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 7e-4, torch.bfloat16: 5e-3},
    "host_pool": {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 7e-4, torch.bfloat16: 5e-3},
    # The statistics accumulate in float (double for float64); outputs rounded once at the end.
    "host_conv_bn_relu": {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3,
                          torch.bfloat16: 1e-2},
    # From the very inputs the kernel multiplies (TF32: rounded to TF32 first): float32 and
    # TF32 held to float32 accumulation error; float16 / bfloat16 to the final rounding.
    "host_igemm": {"strict": 2e-5, "tf32": 2e-5, torch.float16: 7e-4, torch.bfloat16: 5e-3},
}
RTOL = TOLERANCES["conv"]
GRAD_NAMES = ["output", "grad_input", "grad_weight", "grad_bias"]

# The float32 maths of the CUDA implicit GEMM (torch.backends.cudnn.allow_tf32 picks one):
# (dtype, math) for float32 strict (SIMT), float32 TF32, float16, bfloat16.
IGEMM_MATHS = [(torch.float32, "strict"), (torch.float32, "tf32"), (torch.float16, None), (torch.bfloat16, None)]


def igemm_math_id(m):
    return f"{str(m[0]).replace('torch.', '')}{'-' + m[1] if m[1] else ''}"


def rounded(dtype, *shapes):
    """Standard normal float64 tensors of the given shapes, rounded to dtype."""
    return [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]


def tf32(t):
    """float32 t rounded as cvt.rna.tf32.f32 (10 mantissa bits, ties away from zero)."""
    u = t.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    finite = (u & 0x7F800000) != 0x7F800000
    r = torch.where(finite, (u + 0x1000) & 0xFFFFE000, u)
    r = torch.where(r >= 2**31, r - 2**32, r).to(torch.int32)
    return r.view(torch.float32).reshape(t.shape)


# --------------------------------------------------------------------------------------------
# Memory layouts
# --------------------------------------------------------------------------------------------

# contiguous; channels_last; "sliced": every other element of a wider tensor (stride 2
# in W, so neither layout is dense; NaN in between); "permuted": H and W swapped in memory;
# "offset": the middle channels of a larger tensor (plain strides but a storage offset and
# a batch stride larger than C * H * W).
LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted", "offset")


def to_layout(t, layout, device=None):
    """A copy of t (3-D or 4-D) with the same values in the given memory layout, on
    `device` (default: t's), strides and gaps included (Tensor.to would make a non-dense
    tensor contiguous)."""
    t = t.detach()
    if device is not None and torch.device(device) != t.device:
        here = to_layout(t, layout)
        window = torch.as_strided(here, (span(here),), (1,), here.storage_offset()).to(device)
        return torch.as_strided(window, here.shape, here.stride())
    if layout == "contiguous":
        out = t.contiguous()
    elif layout == "channels_last":
        # 3-D (C, H, W): channels innermost, as an unbatched channels_last image.
        out = (t.contiguous(memory_format=torch.channels_last) if t.dim() == 4
               else t.permute(1, 2, 0).contiguous().permute(2, 0, 1))
    elif layout == "sliced":
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        out = wide[..., ::2]
    elif layout == "permuted":
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "offset":
        cdim = t.dim() - 3
        shape = list(t.shape)
        shape[cdim] += 2
        big = torch.full(shape, float("nan"), dtype=t.dtype, device=t.device)
        out = big.narrow(cdim, 1, t.shape[cdim])
        out.copy_(t)
    else:
        raise ValueError(layout)
    assert torch.equal(out, t)
    return out


def lay(t, layout):
    """t's values (NaN and integers too, which to_layout's equality check refuses) in the
    strides the given layout has, on t's device."""
    ref = to_layout(torch.zeros(t.shape, dtype=torch.float64), layout)
    out = torch.empty_strided(t.shape, ref.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        out.copy_(t)
    return out


def layouts(t):
    """{layout name: t in that layout} for every name of LAYOUTS."""
    return {name: to_layout(t, name) for name in LAYOUTS}


def leaf(t, layout="contiguous"):
    """t in the given layout as a fresh leaf that requires grad."""
    return to_layout(t, layout).requires_grad_(True)


def is_channels_last(t):
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def span(t):
    """Elements from t's first element to its last one (0 if empty)."""
    return 0 if t.numel() == 0 else 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def grad_output_like(out, layout, gen):
    """A grad_output for out: random in the given layout, or "expanded": one value with
    stride 0 everywhere (what out.sum().backward() sends, scaled)."""
    if layout == "expanded":
        return torch.randn((), dtype=out.dtype, generator=gen).expand(out.shape)
    return to_layout(torch.randn(out.shape, dtype=out.dtype, generator=gen), layout)


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------

def _bound(actual, expected, rtol, what, scale=None):
    """max |actual - expected| (both as float64 on the CPU) <= rtol * max(scale or |expected|)."""
    if expected.numel() == 0:
        return
    actual, expected = (t.detach().to("cpu", torch.float64) for t in (actual, expected))
    scale = max(expected.abs().max().item(), 1e-30) if scale is None else max(scale.abs().max().item(), 1e-300)
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} * max |expected| {scale:.3e}"


def assert_close_scaled(actual, expected, rtol, what=""):
    """Equal shape, dtype, and values within rtol of the largest magnitude of expected
    (a relative bound that does not blow up on entries that cancel to near zero)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    _bound(actual, expected, rtol, what)


def assert_close_to_reference(actual, expected, rtol, what=""):
    """actual (any device and dtype) finite and within rtol of the largest magnitude of
    expected, a float64 CPU reference of the same shape."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel():
        assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    _bound(actual, expected, rtol, what)


def assert_matches(ours, ref, mag, rtol, what=""):
    """Each result within rtol of the largest magnitude of the terms it sums."""
    for a, e, m, name in zip(ours, ref, mag, GRAD_NAMES):
        assert a.shape == e.shape, f"{name} {what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        _bound(a, e, rtol, f"{name} {what}", scale=m)


def rel_err(a, b):
    """max |a - b| / max |b| as `python -m cnnext check` reports it: inf for other shapes or
    NaN in other places, 0 for empty tensors."""
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return 0.0 if torch.equal(torch.isnan(a), torch.isnan(b)) and torch.allclose(a.nan_to_num(), b.nan_to_num()) else float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------
# Parity harness: a cnnext function against its torch.nn.functional namesake in float64
# --------------------------------------------------------------------------------------------

@dataclass
class ConvConf:
    """One configuration of a convolution's parity test: shapes, bias, the function's
    keyword arguments, the layouts of input, weight and grad_output, a seed."""
    xshape: tuple
    wshape: tuple
    bias: bool
    kw: dict
    x_layout: str
    w_layout: str
    g_layout: str
    seed: int

    def kwargs(self):
        return dict(self.kw)


class Parity:
    """Parity of a cnnext convolution (`ours`) with its torch.nn.functional namesake
    (`ref`) on one configuration `c` (xshape, wshape, bias, layouts, seed, kwargs()).
    `bias_size(c)` is the length of the bias."""

    def __init__(self, ours, ref, bias_size):
        self.ours, self.ref, self.bias_size = ours, ref, bias_size

    def torch_float64(self, x, w, b, go, kwargs):
        """Output and gradients of the torch function in float64 on contiguous copies.

        Contiguous on purpose: torch's own CPU convolutions have layout bugs (2.13 returns
        a wrong grad_weight for an unbatched channels-last-like input with a channels_last
        weight and groups=2) that must not turn into false alarms here."""
        leaves = [t.detach().double().contiguous().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
        y = self.ref(leaves[0], leaves[1], leaves[2] if b is not None else None, **kwargs)
        return (y.detach(), *torch.autograd.grad(y, leaves, go.double()))

    def run_both(self, c, dtype):
        """cnnext's output and (input, weight[, bias]) gradients for one configuration, with
        torch's in float64 from the same values (the reference) and from their absolute
        values (the magnitude: per element, the sum of the absolute values of the terms)."""
        gen = torch.Generator().manual_seed(c.seed)
        x = torch.randn(c.xshape, dtype=dtype, generator=gen)
        w = torch.randn(c.wshape, dtype=dtype, generator=gen)
        b = torch.randn(self.bias_size(c), dtype=dtype, generator=gen) if c.bias else None
        inputs = (leaf(x, c.x_layout), leaf(w, c.w_layout)) + ((leaf(b),) if c.bias else ())
        out = self.ours(inputs[0], inputs[1], inputs[2] if c.bias else None, **c.kwargs())
        go = grad_output_like(out, c.g_layout, gen)
        ours = (out, *torch.autograd.grad(out, inputs, go))
        ref = self.torch_float64(x, w, b, go, c.kwargs())
        mag = self.torch_float64(x.abs(), w.abs(), b.abs() if c.bias else None, go.abs(), c.kwargs())
        return ours, ref, mag

    def check(self, c, dtype):
        """Values within tolerance; for an empty batch, empty output and zero gradients;
        the output in the layout torch gives it, where the layout rule is unambiguous
        (dense operands without size-1 dims, whose strides torch's and cnnext's
        heuristics read apart)."""
        ours, ref, mag = self.run_both(c, dtype)
        assert all(t.dtype == dtype for t in ours)
        assert_matches(ours, ref, mag, RTOL[dtype], str(c))
        out = ours[0]
        assert ours[1].shape == torch.Size(c.xshape)
        if len(c.xshape) == 4 and c.xshape[0] == 0:
            assert out.numel() == 0
            for g in ours[2:]:
                assert torch.count_nonzero(g) == 0
        if out.dim() == 4 and c.x_layout in ("contiguous", "channels_last") and c.w_layout != "sliced" \
                and min(c.xshape) > 1 and min(c.wshape) > 1 and min(out.shape) > 1:
            with torch.no_grad():
                ref_out = self.ref(to_layout(ref[0].new_zeros(c.xshape), c.x_layout),
                                   to_layout(ref[0].new_zeros(c.wshape), c.w_layout), **c.kwargs())
            assert out.is_contiguous() == ref_out.is_contiguous()
            assert is_channels_last(out) == is_channels_last(ref_out)


def _pool_torch_float64(ref, x, go):
    """torch's output and input gradient in float64, from contiguous copies."""
    x64 = x.detach().double().contiguous().requires_grad_()
    y = ref(x64)
    (gx,) = torch.autograd.grad(y, x64, go.double()) if y.numel() else (torch.zeros_like(x64),)
    return y.detach(), gx


def check_parity(ours, ref, xshape, dtype, x_layout, g_layout, seed):
    """Parity of a pooling function: cnnext's output and input gradient against torch's
    (in float64), each within TOLERANCES["pool"][dtype] of the largest magnitude of its
    terms (torch's result on |x|, |grad|). Returns cnnext's (output, grad_input)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(xshape, dtype=dtype, generator=gen)
    xl = to_layout(x, x_layout).requires_grad_()
    out = ours(xl)
    go = grad_output_like(out, g_layout, gen)
    (gx,) = torch.autograd.grad(out, xl, go) if out.numel() else (torch.zeros_like(xl),)
    want_y, want_gx = _pool_torch_float64(ref, x, go)
    mag_y, mag_gx = _pool_torch_float64(ref, x.abs(), go.abs())
    for name, got, want, mag in (("output", out, want_y, mag_y), ("grad_input", gx, want_gx, mag_gx)):
        assert got.dtype == dtype, name
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        if want.numel() == 0:
            continue
        assert torch.isfinite(got).all(), f"{name}: not finite"
        _bound(got, want, TOLERANCES["pool"][dtype], name, scale=mag)
    return out, gx


def check_layout_like_torch(ours, ref, xshape, x_layout):
    """The output has torch's layout where torch's layout is unambiguous (dense input
    and output without size-1 dims), and the input gradient torch's strides."""
    if x_layout not in ("contiguous", "channels_last") or min(xshape) <= 1:
        return
    x = to_layout(torch.randn(xshape), x_layout)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [ours(xs[0]), ref(xs[1])]
    if ys[1].dim() != 4 or min(ys[1].shape) <= 1:
        return  # torch's layout of a 1x1 output and of its gradient varies with its code path
    assert ys[0].is_contiguous() == ys[1].is_contiguous()
    assert is_channels_last(ys[0]) == is_channels_last(ys[1])
    if ys[1].numel():
        g = torch.randn(ys[1].shape)
        g0, = torch.autograd.grad(ys[0], xs[0], g)
        g1, = torch.autograd.grad(ys[1], xs[1], g)
        assert g0.stride() == g1.stride(), (g0.stride(), g1.stride())


def check_pool_on_device(ours, ref, shape, kw, dtype, layout, device, seed):
    """A pooling function on `device` in `dtype` against torch in float64 on the CPU from the
    very (rounded) values the run sees, and (off the CPU) against cnnext's CPU backend, within
    TOLERANCES["device_pool"][dtype] of the reference's largest magnitude; output and input
    gradient of the device's dtype, channels_last ones from a channels_last input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    y_shape = ref(x.double(), **kw).shape
    go = torch.randn(y_shape, generator=g, dtype=torch.float64).to(dtype)

    def run(fn, x, go):
        x = x.detach().requires_grad_()
        y = fn(x, **kw)
        (gx,) = torch.autograd.grad(y, x, go) if y.numel() else (torch.zeros_like(x),)
        return y, gx

    results = run(ours, to_layout(x, layout, device), go.to(device))
    wanted = [run(ref, x.double(), go.double())]
    if torch.device(device).type != "cpu":
        wanted.append(run(ours, x.double(), go.double()))  # cnnext's CPU backend
    rtol = TOLERANCES["device_pool"][dtype]
    for got, *want in zip(results, *wanted):
        assert got.dtype == dtype and got.device.type == torch.device(device).type and got.shape == want[0].shape
        for w in want:
            _bound(got, w, rtol, "", scale=want[0])
    if layout == "channels_last" and len(shape) == 4 and min(y_shape) > 1:
        assert all(is_channels_last(t) for t in results)


def assert_gradchecks(ours, ref, x):
    """ours(x) equals ref(x) in float64; gradcheck and gradgradcheck of ours at x."""
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ours, (x,))
    assert torch.autograd.gradgradcheck(ours, (x,))


def assert_double_backward_matches(ours, ref, x, backward_op):
    """Differentiating the input gradient with respect to grad_output (double backward)
    gives torch's result, and the first backward ran cnnext's op `backward_op`."""
    results = []
    for fn in (ours, ref):
        xx = x.detach().clone().requires_grad_()
        y = fn(xx)
        g = torch.ones_like(y).requires_grad_()
        (gx,) = torch.autograd.grad(y, xx, g, create_graph=True)
        (gg,) = torch.autograd.grad((gx * gx.detach().cos()).sum(), g)
        results.append((gx, gg))
    assert f"cnnext_{backward_op}" in results[0][0].grad_fn.name()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def assert_pool_module_like_torch(ours, ref):
    """A cnnext pooling module is a subclass of its torch namesake `ref`, with its repr, no
    state, and its float64 results on a batched and an unbatched input."""
    assert isinstance(ours, type(ref))
    assert repr(ours) == repr(ref)
    assert ours.state_dict() == ref.state_dict() == {}
    for shape in ((2, 3, 7, 8), (3, 6, 5)):
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def outputs_and_grads(fn, inputs, grad):
    """[fn(*inputs), gradients of every input tensor that requires grad] for grad_output `grad`."""
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [out, *torch.autograd.grad(out, leaves, grad)]


# --------------------------------------------------------------------------------------------
# nvcc host harnesses (tests/cuda_host/*.cu): the CUDA kernels' __host__ __device__ bodies
# compiled for and run on the CPU over operands a test module writes to a file
# --------------------------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_HARNESS_DIR = os.path.join(REPO, "tests", "cuda_host")
# The DType codes of tests/cuda_host/harness.h.
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
# The half / bfloat16 switches torch's cpp_extension builds the kernels with.
NVCC_FLAGS = ["-std=c++17", f"-I{os.path.join(REPO, 'csrc')}", "--expt-relaxed-constexpr",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def find_nvcc():
    """$NVCC, else nvcc on PATH, else $CUDA_HOME/bin/nvcc; None if none is there."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 cuda_home and os.path.join(cuda_home, "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = find_nvcc()
if pytest is not None:
    needs_nvcc = pytest.mark.skipif(
        NVCC is None,
        reason="nvcc not found (not $NVCC, not on PATH, not $CUDA_HOME/bin/nvcc): "
               "cannot build the host harness of the CUDA kernels")


def build_host_program(exe, source, opt="-O2", extra=(), timeout=600):
    """Compiles the nvcc host harness `source` (a path, or a file name in tests/cuda_host)
    into `exe` (a test failure with nvcc's output if it does not build); returns exe."""
    source = os.path.join(HOST_HARNESS_DIR, source)
    cmd = [NVCC, *NVCC_FLAGS, opt, *extra, "-o", str(exe), source]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        pytest.fail(f"nvcc failed ({' '.join(cmd)}):\n{res.stdout}{res.stderr}", pytrace=False)
    return str(exe)


def run_host_program(exe, directory, records, cases, timeout=300):
    """Runs a host harness on the concatenated `records` (one per case) and returns the
    bytes it wrote; a failure names the case of the record the program stopped at."""
    (directory / "in.bin").write_bytes(b"".join(records))
    res = subprocess.run([str(exe), str(directory / "in.bin"), str(directory / "out.bin")],
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        m = re.search(r"record (\d+)", res.stderr)
        where = f" at case {cases[int(m.group(1))]}" if m and int(m.group(1)) < len(cases) else ""
        pytest.fail(f"{os.path.basename(str(exe))} failed (exit status {res.returncode}){where}: "
                    f"{res.stderr}", pytrace=False)
    return (directory / "out.bin").read_bytes()


def run_host_harness(tmp_path_factory, source, records, cases, run_timeout=300, **build):
    """Builds tests/cuda_host/`source` (with build_host_program's options `build`) in a
    fresh temporary folder, runs it on `records` (one per case) and returns the bytes it
    wrote."""
    name = os.path.splitext(os.path.basename(source))[0]
    d = tmp_path_factory.mktemp(name)
    exe = build_host_program(d / name, source, **build)
    return run_host_program(exe, d, records, cases, timeout=run_timeout)


def raw_bytes(t):
    """The bytes of t's span: its first element to its last, gaps included."""
    if not span(t):
        return b""
    window = torch.as_strided(t, (span(t),), (1,), t.storage_offset()).contiguous()
    return ctypes.string_at(window.data_ptr(), window.numel() * window.element_size())


def strided_record(t, data=True):
    """A harness record of t: its four strides, its span, then (data) its span's bytes."""
    strides = t.stride() if t.dim() == 4 else (0, 0, 0, 0)
    return struct.pack("<5q", *strides, span(t)) + (raw_bytes(t) if data else b"")


def read_strided(data, pos, template):
    """The tensor of template's dtype, shape and strides a harness wrote at data[pos:]
    (its span's bytes); returns it and the position after it."""
    nbytes = span(template) * template.element_size()
    raw = data[pos:pos + nbytes]
    flat = (torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw
            else torch.empty(0, dtype=torch.uint8)).view(template.dtype)
    return torch.as_strided(flat, template.shape, template.stride()), pos + nbytes


@dataclass(frozen=True)
class ConvShape:
    """A convolution's geometry, as the host harnesses of the CUDA conv2d kernels take it."""
    x_shape: tuple  # (N, C, H, W)
    out_channels: int
    kernel: tuple   # (KH, KW)
    stride: object
    padding: object
    dilation: object
    groups: int

    def out_hw(self):
        (_, _, h, w), (kh, kw) = self.x_shape, self.kernel
        (sh, sw), (ph, pw), (dh, dw) = pair(self.stride), pair(self.padding), pair(self.dilation)
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def y_shape(self):
        return (self.x_shape[0], self.out_channels, *self.out_hw())

    def w_shape(self):
        return (self.out_channels, self.x_shape[1] // self.groups, *self.kernel)

    def args(self):
        """stride, padding, dilation, groups, as torch takes them."""
        return self.stride, self.padding, self.dilation, self.groups

    def params(self):
        """The 16 fields of Conv2dParams."""
        (sh, sw), (ph, pw), (dh, dw) = pair(self.stride), pair(self.padding), pair(self.dilation)
        return (*self.x_shape, self.out_channels, *self.kernel, *self.out_hw(),
                sh, sw, ph, pw, dh, dw, self.groups)

    def __str__(self):
        s = lambda v: "x".join(map(str, pair(v)))  # noqa: E731
        return (f"x{'x'.join(map(str, self.x_shape))}-o{self.out_channels}-k{s(self.kernel)}"
                f"-s{s(self.stride)}-p{s(self.padding)}-d{s(self.dilation)}-g{self.groups}")


def host_layout(t, layout):
    """t's values in a layout of the host harness tests: contiguous, channels_last,
    "sliced" (every other element of a wider tensor, a guard before the first one;
    NaN, or -1 for integers, in between), "permuted" (H and W swapped in memory) or
    "expanded" (t[0, 0, 0, 0] with stride 0 in every dim, as y.sum() gives backward)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        fill = -1 if not t.is_floating_point() else float("nan")
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), fill, dtype=t.dtype)
        out = wide[..., 1::2]
        out.copy_(t)
        return out
    if layout == "permuted":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded":
        return t.reshape(-1)[:1].reshape(1, 1, 1, 1).expand(t.shape) if t.numel() else t
    raise ValueError(layout)


def check_host_output(got, want, rtol):
    """got: every element written and nothing else in its span; its values within
    rtol of max |want|."""
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    window = torch.as_strided(got, (span(got),), (1,))
    written = torch.zeros(span(got), dtype=torch.bool)
    torch.as_strided(written, got.shape, got.stride()).fill_(True)
    assert torch.isfinite(got).all(), "an output element was not written (NaN) or is not finite"
    assert window[~written].isnan().all(), "a gap of the strided output was written"
    _bound(got, want, rtol, "output")
