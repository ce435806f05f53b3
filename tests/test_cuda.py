"""conv2d on CUDA: parity with torch.nn.functional and with cnnext's CPU backend.

Every test here needs a GPU and a cnnext build with CUDA kernels, and skips itself
otherwise. References are computed on the CPU in float64 from the very values the
CUDA run sees (inputs rounded to the tested dtype first), so the tolerances measure
the kernels, not the rounding of the inputs.
"""
import pytest
import torch
import torch.nn.functional as F

import cnnext
from cnnext.functional import conv2d

HAS_CUDA = torch.cuda.is_available() and bool(cnnext.build_info()["cuda"])
pytestmark = [
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a cnnext build with CUDA kernels"),
    pytest.mark.usefixtures("strict_fp32"),
]


ops = torch.ops.cnnext

# Largest error allowed, relative to the largest magnitude of the reference.
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted")

# (N, C, H, W), out_channels, (kH, kW), stride, padding, dilation, groups, bias
CONFIGS = [
    ((2, 3, 8, 9), 4, (3, 3), 1, 1, 1, 1, True),
    ((2, 4, 9, 7), 6, (3, 2), (2, 1), (0, 1), (1, 2), 2, True),
    ((2, 6, 9, 8), 6, (3, 3), 2, 1, 1, 6, False),          # depthwise
    ((1, 4, 7, 7), 8, (5, 5), 1, 2, 1, 4, True),           # depthwise, multiplier 2
    ((3, 5, 6, 5), 7, (1, 1), 1, 0, 1, 1, True),           # pointwise
    ((2, 2, 11, 10), 3, (5, 3), (3, 2), (2, 0), (2, 1), 1, False),
    ((1, 4, 4, 4), 4, (4, 4), 1, 0, 1, 2, True),           # kernel as large as the input
    ((1, 2, 3, 3), 2, (3, 3), 2, 4, 1, 1, True),           # padding wider than the input
    ((2, 6, 6, 5), 9, (2, 3), (1, 3), (3, 2), 1, 3, True),
    ((4, 16, 14, 14), 32, (3, 3), 1, 1, 1, 1, True),       # several blocks per kernel
    ((2, 3, 20, 20), 8, (7, 7), 2, 3, 1, 1, True),         # a ResNet stem
]


def config_id(cfg):
    shape, o, k, s, p, d, g, b = cfg
    return f"x{'x'.join(map(str, shape))}-o{o}-k{k[0]}x{k[1]}-s{s}-p{p}-d{d}-g{g}-{'bias' if b else 'nobias'}"


def to_layout(t, layout):
    """A copy of the 4-D tensor t, same values and device, in the given memory layout."""
    t = t.detach()
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # every other element of a wider tensor: stride 2 in W
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "permuted":  # H and W swapped in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(layout)


def is_channels_last(t):
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def assert_close_scaled(actual, expected, rtol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} * max |expected| {scale:.3e}"


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_inputs(cfg, dtype):
    """Random x, w, b (or None) and grad_output as float64 CPU tensors holding values
    exactly representable in dtype."""
    shape, o, (kh, kw), s, p, d, g, has_bias = cfg
    st, pd, dl = pair(s), pair(p), pair(d)
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(o, shape[1] // g, kh, kw, dtype=torch.float64)
    b = torch.randn(o, dtype=torch.float64) if has_bias else None
    oh = (shape[2] + 2 * pd[0] - dl[0] * (kh - 1) - 1) // st[0] + 1
    ow = (shape[3] + 2 * pd[1] - dl[1] * (kw - 1) - 1) // st[1] + 1
    gy = torch.randn(shape[0], o, oh, ow, dtype=torch.float64)
    rnd = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731
    return rnd(x), rnd(w), rnd(b), rnd(gy)


def reference(x, w, b, gy, s, p, d, g):
    """Output and gradients of torch.nn.functional.conv2d, float64 on the CPU."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = F.conv2d(x, w, b, s, p, d, g)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy)
    return (y.detach(), *grads)


def run_cnnext(x, w, b, gy, s, p, d, g):
    """Output and gradients of cnnext.functional.conv2d on whatever device x is on."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = conv2d(x, w, b, s, p, d, g)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy)
    return (y.detach(), *grads)


NAMES = ("output", "grad_input", "grad_weight", "grad_bias")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_parity(cfg, dtype, layout):
    """Forward and every gradient against F.conv2d (float64 CPU) and, for float32 and
    float64, against cnnext's CPU backend, with input and grad_output in every layout."""
    _, _, _, s, p, d, g, _ = cfg
    x, w, b, gy = make_inputs(cfg, dtype)
    ref = reference(x, w, b, gy, s, p, d, g)
    # grad_output in another layout than the input, so both kernels see mixed layouts.
    gy_layout = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]
    dev = lambda t: None if t is None else t.to(dtype=dtype, device="cuda")  # noqa: E731
    xc = to_layout(dev(x), layout)
    out = run_cnnext(xc, dev(w), dev(b), to_layout(dev(gy), gy_layout), s, p, d, g)
    for name, got, want in zip(NAMES, out, ref):
        assert got.device.type == "cuda" and got.dtype == dtype, name
        assert_close_scaled(got, want, RTOL[dtype], f"{name} vs F.conv2d")
    # Layout rule of csrc/ops: channels_last output iff an operand is channels_last.
    fmt = torch.channels_last if is_channels_last(xc) else torch.contiguous_format
    assert out[0].is_contiguous(memory_format=fmt)
    assert out[2].is_contiguous()

    if dtype in (torch.float32, torch.float64):
        cpu = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        out_cpu = run_cnnext(to_layout(cpu(x), layout), cpu(w), cpu(b),
                             to_layout(cpu(gy), gy_layout), s, p, d, g)
        for name, got, want in zip(NAMES, out, out_cpu):
            assert_close_scaled(got, want, RTOL[dtype], f"{name} vs cnnext CPU")
        assert is_channels_last(out[0]) == is_channels_last(out_cpu[0])
        assert is_channels_last(out[1]) == is_channels_last(out_cpu[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expanded_grad_output(dtype):
    """y.sum() gives backward a grad_output of stride 0 in every dim."""
    cfg = ((2, 4, 9, 8), 6, (3, 3), 2, 1, 1, 2, True)
    _, _, _, s, p, d, g, _ = cfg
    x, w, b, gy = make_inputs(cfg, dtype)
    ref = reference(x, w, b, torch.ones_like(gy), s, p, d, g)
    xc, wc, bc = (t.to(dtype=dtype, device="cuda").requires_grad_() for t in (x, w, b))
    grads = torch.autograd.grad(conv2d(xc, wc, bc, s, p, d, g).sum(), (xc, wc, bc))
    for name, got, want in zip(NAMES[1:], grads, ref[1:]):
        assert_close_scaled(got, want, RTOL[dtype], name)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding(padding):
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    w = torch.randn(6, 2, 4, 3, dtype=torch.float64)  # kH = 4: 'same' pads H asymmetrically
    want = F.conv2d(x, w, None, 1, padding, (1, 2), 2)
    got = conv2d(x.cuda(), w.cuda(), None, 1, padding, (1, 2), 2)
    assert_close_scaled(got, want, RTOL[torch.float64], padding)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch(dtype):
    """N = 0: empty output and grad_input, zero grad_weight and grad_bias."""
    x = torch.randn(0, 4, 7, 7, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(6, device="cuda", dtype=dtype, requires_grad=True)
    y = conv2d(x, w, b, 1, 1, 1, 2)
    assert y.shape == (0, 6, 7, 7) and y.device.type == "cuda"
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w))
    assert torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unbatched(dtype):
    """A (C, H, W) input is a batch of one; output and grad_input are 3-D."""
    cfg = ((1, 6, 8, 7), 9, (3, 2), (2, 1), 1, (1, 2), 3, True)
    _, _, _, s, p, d, g, _ = cfg
    x, w, b, gy = make_inputs(cfg, dtype)
    ref = reference(x[0], w, b, gy[0], s, p, d, g)
    dev = lambda t: t.to(dtype=dtype, device="cuda")  # noqa: E731
    out = run_cnnext(dev(x[0]), dev(w), dev(b), dev(gy[0]), s, p, d, g)
    assert out[0].dim() == 3 and out[1].dim() == 3
    for name, got, want in zip(NAMES, out, ref):
        assert_close_scaled(got, want, RTOL[dtype], name)


def test_deterministic():
    """Two runs give bitwise equal results (no atomics, fixed summation order)."""
    cfg = ((8, 16, 20, 20), 32, (3, 3), 1, 1, 1, 1, True)
    x, w, b, gy = (t.float().cuda() for t in make_inputs(cfg, torch.float32))
    first = run_cnnext(x, w, b, gy, 1, 1, 1, 1)
    second = run_cnnext(x, w, b, gy, 1, 1, 1, 1)
    for name, a, c in zip(NAMES, first, second):
        assert torch.equal(a, c), name


def test_side_stream():
    """Kernels run on the current stream, not the default one."""
    cfg = ((4, 8, 16, 16), 16, (3, 3), 1, 1, 1, 2, True)
    x, w, b, gy = make_inputs(cfg, torch.float64)
    ref = reference(x, w, b, gy, 1, 1, 1, 2)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = run_cnnext(*(t.cuda() for t in (x, w, b, gy)), 1, 1, 1, 2)
    stream.synchronize()
    for name, got, want in zip(NAMES, out, ref):
        assert_close_scaled(got, want, RTOL[torch.float64], name)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the device guard picks cuda:1."""
    cfg = ((2, 4, 8, 8), 6, (3, 3), 1, 1, 1, 2, True)
    x, w, b, gy = make_inputs(cfg, torch.float64)
    ref = reference(x, w, b, gy, 1, 1, 1, 2)
    with torch.cuda.device(0):
        out = run_cnnext(*(t.to("cuda:1") for t in (x, w, b, gy)), 1, 1, 1, 2)
    for name, got, want in zip(NAMES, out, ref):
        assert got.device == torch.device("cuda:1"), name
        assert_close_scaled(got, want, RTOL[torch.float64], name)


GRADCHECK_CONFIGS = [
    ((2, 4, 6, 5), 4, (3, 2), (2, 1), (1, 0), (1, 2), 2, True),
    ((1, 3, 5, 5), 3, (3, 3), 1, 1, 1, 3, False),          # depthwise
    ((2, 2, 4, 6), 3, (1, 1), 1, 0, 1, 1, True),
]


@pytest.mark.parametrize("cfg", GRADCHECK_CONFIGS, ids=config_id)
def test_gradcheck(cfg):
    _, _, _, s, p, d, g, _ = cfg
    x, w, b, _ = make_inputs(cfg, torch.float64)
    args = [t.cuda().requires_grad_() for t in (x, w, b) if t is not None]
    fn = (lambda x, w, b: conv2d(x, w, b, s, p, d, g)) if b is not None else (lambda x, w: conv2d(x, w, None, s, p, d, g))
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_gradcheck_channels_last():
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, device="cuda")
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: conv2d(x, w, None, 2, 1, 1, 2), (x, w))


def opcheck_cases():
    """{name: (op, args)} on CUDA float64 tensors that require grad."""
    x = torch.randn(2, 4, 7, 6, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, device="cuda", dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, device="cuda", dtype=torch.float64, requires_grad=True)
    conf = ([2, 1], [1, 0], [1, 2], 2)
    y = ops.conv2d(x.detach(), w.detach(), b.detach(), *conf)
    gy = torch.randn_like(y).requires_grad_()
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    x3 = x.detach()[0].clone().requires_grad_()
    return {
        "conv2d": (ops.conv2d.default, (x, w, b, *conf)),
        "conv2d_nobias": (ops.conv2d.default, (x, w, None, *conf)),
        "conv2d_channels_last": (ops.conv2d.default, (xcl, w, b, *conf)),
        "conv2d_unbatched": (ops.conv2d.default, (x3, w, b, *conf)),
        "conv2d_input_backward": (ops.conv2d_input_backward.default, (gy, w, list(x.shape), *conf)),
        "conv2d_weight_backward": (ops.conv2d_weight_backward.default, (gy, x, list(w.shape), *conf)),
        "channel_sum": (ops.channel_sum.default, (gy,)),
    }


OPCHECK_CASES = ["conv2d", "conv2d_nobias", "conv2d_channels_last", "conv2d_unbatched",
                 "conv2d_input_backward", "conv2d_weight_backward", "channel_sum"]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("op, wshape", [("conv2d", (3, 2, 3, 3)), ("conv_transpose2d", (2, 3, 3, 3))])
@pytest.mark.parametrize("where", ["input_cpu", "weight_cpu", "bias_cpu"])
def test_mixed_devices_raise(where, op, wshape):
    x = torch.randn(1, 2, 5, 5, device="cpu" if where == "input_cpu" else "cuda")
    w = torch.randn(wshape, device="cpu" if where == "weight_cpu" else "cuda")
    b = torch.randn(3, device="cpu" if where == "bias_cpu" else "cuda")
    with pytest.raises(RuntimeError, match="same device"):
        getattr(cnnext.functional, op)(x, w, b)


def test_mixed_devices_backward_ops_raise():
    gy = torch.randn(1, 3, 3, 3, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        ops.conv2d_input_backward(gy, torch.randn(3, 2, 3, 3), [1, 2, 5, 5], [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="same device"):
        ops.conv2d_weight_backward(gy, torch.randn(1, 2, 5, 5), [3, 2, 3, 3], [1, 1], [0, 0], [1, 1], 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_types_module(dtype):
    """cnnext.nn.Conv2d in half precision on CUDA tracks torch.nn.Conv2d in float32."""
    mod = cnnext.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2).cuda()
    ref = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2).cuda()
    ref.load_state_dict(mod.state_dict())
    x = torch.randn(4, 8, 15, 15, device="cuda").to(dtype)
    want = F.conv2d(x.double().cpu(), ref.weight.to(dtype).double().cpu(), ref.bias.to(dtype).double().cpu(),
                    2, 1, 1, 2)
    got = mod.to(dtype)(x)
    assert got.dtype == dtype
    assert_close_scaled(got, want, RTOL[dtype], "Conv2d output")



# --------------------------------------------------------------------------------------------
# conv_transpose2d: the input-backward kernel plus the bias kernel
# --------------------------------------------------------------------------------------------

# (N, C_in, H, W), out_channels, (kH, kW), stride, padding, output_padding, dilation, groups, bias
TRANSPOSE_CONFIGS = [
    ((2, 3, 5, 6), 4, (3, 3), 1, 0, 0, 1, 1, True),
    ((2, 4, 6, 5), 6, (3, 2), (2, 1), (1, 0), (1, 0), (1, 2), 2, True),
    ((2, 6, 5, 5), 6, (4, 4), 2, 1, 0, 1, 6, False),           # depthwise, doubling
    ((1, 4, 5, 4), 4, (3, 3), 1, 1, (1, 1), 2, 1, True),        # output_padding >= stride (< dilation)
    ((3, 5, 4, 4), 7, (1, 1), 2, 0, 1, 1, 1, True),             # pointwise, strided
    ((4, 16, 14, 14), 8, (4, 4), 2, 1, 0, 1, 1, True),          # several blocks
]


def transpose_id(cfg):
    shape, o, k, s, p, op, d, g, b = cfg
    return f"x{'x'.join(map(str, shape))}-o{o}-k{k[0]}x{k[1]}-s{s}-p{p}-op{op}-d{d}-g{g}-{'bias' if b else 'nobias'}"


def transpose_run(fn, x, w, b, gy, conf):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = fn(x, w, b, *conf)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy)
    return (y.detach(), *grads)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", TRANSPOSE_CONFIGS, ids=transpose_id)
def test_conv_transpose2d_parity(cfg, dtype, layout):
    """Forward and every gradient against F.conv_transpose2d (float64 CPU) and, for float32
    and float64, against cnnext's CPU backend."""
    shape, o, (kh, kw), s, p, op, d, g, has_bias = cfg
    conf = (s, p, op, g, d)
    rnd = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731
    x = rnd(torch.randn(shape, dtype=torch.float64))
    w = rnd(torch.randn(shape[1], o // g, kh, kw, dtype=torch.float64))
    b = rnd(torch.randn(o, dtype=torch.float64)) if has_bias else None
    gy = rnd(torch.randn(F.conv_transpose2d(x, w, b, *conf).shape, dtype=torch.float64))
    ref = transpose_run(F.conv_transpose2d, x, w, b, gy, conf)
    dev = lambda t: None if t is None else t.to(dtype=dtype, device="cuda")  # noqa: E731
    out = transpose_run(cnnext.functional.conv_transpose2d, to_layout(dev(x), layout), dev(w), dev(b),
                        to_layout(dev(gy), "permuted"), conf)
    for name, got, want in zip(NAMES, out, ref):
        assert got.device.type == "cuda" and got.dtype == dtype, name
        assert_close_scaled(got, want, RTOL[dtype], f"{name} vs F.conv_transpose2d")
    if dtype in (torch.float32, torch.float64):
        cpu = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        out_cpu = transpose_run(cnnext.functional.conv_transpose2d, to_layout(cpu(x), layout), cpu(w), cpu(b),
                                to_layout(cpu(gy), "permuted"), conf)
        for name, got, want in zip(NAMES, out, out_cpu):
            assert_close_scaled(got, want, RTOL[dtype], f"{name} vs cnnext CPU")
        assert is_channels_last(out[0]) == is_channels_last(out_cpu[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_transpose2d_unbatched_and_empty(dtype):
    w = torch.randn(4, 3, 3, 3, device="cuda", dtype=dtype)
    b = torch.randn(6, device="cuda", dtype=dtype)
    x = torch.randn(4, 5, 6, device="cuda", dtype=dtype)
    got = cnnext.functional.conv_transpose2d(x, w, b, 2, 1, 1, 2)
    want = F.conv_transpose2d(x.double().cpu(), w.double().cpu(), b.double().cpu(), 2, 1, 1, 2)
    assert got.dim() == 3
    assert_close_scaled(got, want, RTOL[dtype], "unbatched")
    empty = cnnext.functional.conv_transpose2d(torch.randn(0, 4, 5, 6, device="cuda", dtype=dtype), w, b, 2, 1, 1, 2)
    assert empty.shape == (0, 6, 10, 12) and empty.device.type == "cuda"


def test_conv_transpose2d_gradcheck_and_opcheck():
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(4, 2, 3, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device="cuda", requires_grad=True)
    conf = ([2, 1], [1, 0], [1, 0], 2, [1, 2])
    fn = lambda x, w, b: cnnext.functional.conv_transpose2d(x, w, b, *conf)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    torch.library.opcheck(ops.conv_transpose2d.default, (x, w, b, *conf))
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(ops.conv_transpose2d.default, (xcl, w, b, *conf))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_conv_transpose2d_half_types_module(dtype):
    mod = cnnext.nn.ConvTranspose2d(8, 16, 4, stride=2, padding=1, groups=2).cuda().to(dtype)
    x = torch.randn(4, 8, 7, 7, device="cuda").to(dtype)
    want = F.conv_transpose2d(x.double().cpu(), mod.weight.double().cpu(), mod.bias.double().cpu(), 2, 1, 0, 2)
    got = mod(x, output_size=[14, 14])
    assert got.dtype == dtype
    assert_close_scaled(got, want, RTOL[dtype], "ConvTranspose2d output")
