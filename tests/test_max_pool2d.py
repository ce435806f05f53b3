"""cnnext.functional.max_pool2d / max_pool2d_with_indices, torch.ops.cnnext.max_pool2d_*
and cnnext.nn.MaxPool2d against torch.nn.functional.max_pool2d / torch.nn.MaxPool2d."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import cnnext
from cnnext.functional import max_pool2d, max_pool2d_with_indices
from cnnext.testing import LAYOUTS, cpu_and_cuda, cuda_only, device_dtypes, is_channels_last, lay, leaf, pair
from conftest import examples
from strategies import pair_arg

ops = torch.ops.cnnext
NAN, INF = float("nan"), float("inf")


def lay_leaf(t, layout):
    return lay(t.detach(), layout).requires_grad_(True)


def distinct(shape, dtype=torch.float64):
    """Values at least 1e-3 apart (no ties: max pooling is differentiable there)."""
    n = 1
    for s in shape:
        n *= s
    return (torch.randperm(n, dtype=torch.float64) / max(n, 1) * 4 - 2).reshape(shape).to(dtype)


def has_empty_window(h, w, k, s, p, d, ceil_mode):
    """Whether some window has no tap inside the input (torch outputs -inf with an index
    outside the window there, and its backward scatters to it; cnnext passes nothing)."""
    for size, kk, ss, pp, dd in ((h, k[0], s[0], p[0], d[0]), (w, k[1], s[1], p[1], d[1])):
        out = cnnext._shapes.pool_out_size(size, kk, ss, pp, dd, ceil_mode)
        for o in range(out):
            start = o * ss - pp
            end = min(start + (kk - 1) * dd + 1, size)
            while start < 0:
                start += dd
            if start >= end:
                return True
    return False


def nonempty_windows(size, k, s, p, d, ceil_mode):
    out = cnnext._shapes.pool_out_size(size, k, s, p, d, ceil_mode)
    keep = []
    for o in range(out):
        start = o * s - p
        end = min(start + (k - 1) * d + 1, size)
        while start < 0:
            start += d
        keep.append(start < end)
    return torch.tensor(keep, dtype=torch.bool)


def scatter_reference(x_shape, idx, go, k, s, p, d, ceil_mode):
    """float64 grad_input: go added at idx, plane by plane, over the windows that have a
    tap inside the input."""
    h, w = x_shape[-2:]
    mask = nonempty_windows(h, k[0], s[0], p[0], d[0], ceil_mode)[:, None] & \
        nonempty_windows(w, k[1], s[1], p[1], d[1], ceil_mode)[None, :]
    planes = idx.reshape(-1, idx.shape[-2] * idx.shape[-1])
    g = go.double().reshape(planes.shape)
    m = mask.reshape(-1)
    out = torch.zeros(planes.shape[0], h * w, dtype=torch.float64)
    for i in range(planes.shape[0]):
        out[i].index_add_(0, planes[i][m], g[i][m])
    return out.reshape(x_shape)


# --------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck (float64)
# --------------------------------------------------------------------------------------------

# (input shape, kernel_size, stride, padding, dilation, ceil_mode, layout)
GRID = {
    "basic": ((2, 3, 6, 5), 2, None, 0, 1, False, "contiguous"),
    "overlap_3s2": ((1, 2, 7, 7), 3, 2, 1, 1, False, "contiguous"),
    "stride1_pad1": ((1, 2, 5, 4), 3, 1, 1, 1, False, "contiguous"),
    "rect": ((1, 2, 6, 7), (2, 3), (1, 2), (1, 0), 1, False, "contiguous"),
    "dilation": ((1, 2, 7, 6), (2, 2), 1, 1, (2, 3), False, "contiguous"),
    "ceil_mode": ((1, 2, 6, 6), 3, 2, 0, 1, True, "contiguous"),
    "channels_last": ((2, 3, 5, 5), 3, 2, 1, 1, True, "channels_last"),
    "sliced": ((1, 2, 5, 6), 2, 1, 0, 1, False, "sliced"),
    "unbatched": ((2, 5, 5), 2, 2, 1, 1, True, "contiguous"),
}


def grid_input(case):
    shape, k, s, p, d, c, layout = GRID[case]
    return leaf(distinct(shape), layout), dict(kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=c)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("case", GRID)
def test_gradcheck_gradgradcheck(case):
    x, kw = grid_input(case)
    fn = lambda t: max_pool2d(t, **kw)  # noqa: E731
    torch.testing.assert_close(fn(x), F.max_pool2d(x, **kw), rtol=0, atol=0)
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.usefixtures("single_thread")
def test_ops_closed_under_differentiation():
    """The backward op's own gradient is max_pool2d_select and vice versa (third order too)."""
    x, kw = grid_input("overlap_3s2")
    conf = ([3, 3], [2, 2], [1, 1], [1, 1], False)
    _, idx = ops.max_pool2d_with_indices(x.detach(), *conf)
    g = leaf(torch.randn(idx.shape, dtype=torch.float64))
    bw = lambda g: ops.max_pool2d_with_indices_backward(g, idx, list(x.shape), *conf)  # noqa: E731
    sel = lambda t: ops.max_pool2d_select(t, idx, *conf)  # noqa: E731
    assert torch.autograd.gradcheck(bw, (g,)) and torch.autograd.gradgradcheck(bw, (g,))
    assert torch.autograd.gradcheck(sel, (x,)) and torch.autograd.gradgradcheck(sel, (x,))
    # <S g, x> == <g, S^T x>
    lhs = (bw(g) * x).sum()
    rhs = (g * sel(x)).sum()
    torch.testing.assert_close(lhs, rhs)


# --------------------------------------------------------------------------------------------
# Parity with torch over random configurations and layouts
# --------------------------------------------------------------------------------------------

@st.composite
def configs(draw):
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    d = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    ceil_mode = draw(st.booleans())
    h, w = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    span = [h + 2 * p[0] - d[0] * (k[0] - 1), w + 2 * p[1] - d[1] * (k[1] - 1)]
    if min(span) < 1:
        h += 1 - min(span[0], 1)
        w += 1 - min(span[1], 1)
    n = draw(st.sampled_from([0, 1, 2, 3]))
    c = draw(st.integers(1, 5))
    unbatched = draw(st.booleans()) and n == 1
    shape = (c, h, w) if unbatched else (n, c, h, w)
    kw = dict(kernel_size=pair_arg(draw, k), padding=pair_arg(draw, p), dilation=pair_arg(draw, d),
              ceil_mode=ceil_mode)
    if draw(st.booleans()):
        kw["stride"] = pair_arg(draw, s)
    else:
        s = k
    return shape, kw, (k, s, p, d, ceil_mode)


def special_values(shape, dtype, gen):
    """Small integers (ties), some NaN and -inf, some +inf."""
    x = torch.randint(-3, 4, shape, generator=gen).to(dtype)
    x[x == 3] = NAN
    x[x == -3] = -INF
    x[x == 2] = torch.where(torch.rand(x[x == 2].shape, generator=gen) < 0.2, INF, 2.0).to(dtype)
    return x


@settings(max_examples=examples(150))
@given(cfg=configs(), layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from([torch.float32, torch.float64]),
       values=st.sampled_from(["special", "distinct"]), seed=st.integers(0, 2**16))
def test_parity(cfg, layout, dtype, values, seed):
    shape, kw, (k, s, p, d, ceil_mode) = cfg
    gen = torch.Generator().manual_seed(seed)
    x0 = special_values(shape, dtype, gen) if values == "special" else distinct(shape, dtype)
    ref_out, ref_idx = F.max_pool2d(x0, return_indices=True, **kw)
    x = lay_leaf(x0, layout)
    out, idx = max_pool2d(x, return_indices=True, **kw)
    assert out.dtype == dtype and idx.dtype == torch.int64
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, ref_idx)
    if layout in ("contiguous", "channels_last") and len(shape) == 4 and min(shape) > 1 and min(out.shape) > 1:
        lay_out, lay_idx = F.max_pool2d(lay(x0, layout), return_indices=True, **kw)
        assert is_channels_last(out) == is_channels_last(lay_out)
        assert is_channels_last(idx) == is_channels_last(lay_idx)
    go = torch.randn(out.shape, generator=gen, dtype=dtype)
    gx, = torch.autograd.grad(out, x, go)
    assert gx.shape == x.shape
    torch.testing.assert_close(gx.double(), scatter_reference(x0.shape, ref_idx, go, k, s, p, d, ceil_mode),
                               rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)
    if not has_empty_window(shape[-2], shape[-1], k, s, p, d, ceil_mode):
        xr = x0.clone().requires_grad_()
        want, = torch.autograd.grad(F.max_pool2d(xr, **kw), xr, go)
        torch.testing.assert_close(gx, want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)
    if len(shape) == 4 and shape[0] == 0:
        assert out.numel() == 0 and gx.numel() == 0


def test_nan_and_tie_rules():
    x = torch.tensor([[[[1.0, NAN, 3.0, NAN], [NAN, 5.0, NAN, 2.0], [2.0, 5.0, 5.0, 2.0]]]])
    for layout in LAYOUTS:
        out, idx = max_pool2d(lay(x, layout), (1, 4), return_indices=True)
        assert idx.flatten().tolist() == [3, 6, 9]  # last NaN, last NaN, first of the ties
        assert out.flatten()[:2].isnan().all() and out.flatten()[2] == 5
    # ties across rows: the first in row-major order, also when a later column is smaller
    x = torch.tensor([[[[0.0, 7.0], [7.0, 0.0]]]])
    assert max_pool2d(x, 2, return_indices=True)[1].item() == 1


def test_all_neg_inf_and_padding():
    x = torch.full((1, 1, 1, 3), -INF)
    for kw in (dict(kernel_size=(1, 3), stride=1, padding=(0, 1)),
               dict(kernel_size=(1, 3), stride=2, padding=(0, 1), ceil_mode=True)):
        ref = F.max_pool2d(x, return_indices=True, **kw)
        for layout in LAYOUTS:
            got = max_pool2d(lay(x, layout), return_indices=True, **kw)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_window_without_taps():
    """Dilation can leave a window with no tap inside the input: torch's -inf and index
    (which lies outside the plane), and no gradient through it."""
    x = torch.tensor([[[[7.0]]]], dtype=torch.float64, requires_grad=True)
    kw = dict(kernel_size=2, stride=1, padding=1, dilation=2)
    ref = F.max_pool2d(x.detach(), return_indices=True, **kw)
    out, idx = max_pool2d(x, return_indices=True, **kw)
    assert torch.equal(out, ref[0]) and torch.equal(idx, ref[1]) and idx.item() == 2
    gx, = torch.autograd.grad(out, x, torch.ones_like(out))
    assert gx.item() == 0
    # a row with taps, columns without: the index may alias another row in torch
    x = torch.arange(6.0, dtype=torch.float64).reshape(1, 1, 3, 2).requires_grad_()
    kw = dict(kernel_size=(1, 2), stride=1, padding=(0, 1), dilation=(1, 3))
    ref = F.max_pool2d(x.detach(), return_indices=True, **kw)
    for layout in LAYOUTS:
        xl = lay_leaf(x, layout)
        out, idx = max_pool2d(xl, return_indices=True, **kw)
        assert torch.equal(out, ref[0]) and torch.equal(idx, ref[1])
        gx, = torch.autograd.grad(out, xl, torch.ones_like(out))
        want = torch.zeros_like(x)
        for i, v in zip(ref[1].flatten().tolist(), ref[0].flatten().tolist()):
            if v != -INF:
                want.view(-1)[i] += 1
        assert torch.equal(gx, want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_shapes_all_paths(layout):
    """Shapes past the vector width, every dtype path, overlapping and non-overlapping windows."""
    for shape, kw in [((2, 5, 54, 54), dict(kernel_size=3, stride=2)),
                      ((2, 4, 32, 33), dict(kernel_size=2, stride=2)),
                      ((1, 6, 28, 28), dict(kernel_size=3, stride=1, padding=1)),
                      ((1, 3, 23, 29), dict(kernel_size=(3, 2), stride=(2, 3), padding=1, dilation=(1, 2), ceil_mode=True))]:
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(shape, dtype=dtype)
            x[0, 0, 1, 1] = NAN
            ref = F.max_pool2d(x, return_indices=True, **kw)
            got = max_pool2d(lay(x, layout), return_indices=True, **kw)
            torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0, equal_nan=True)
            assert torch.equal(got[1], ref[1])


def test_with_indices_signature_and_stride_empty():
    x = torch.randn(2, 3, 8, 8)
    a = max_pool2d_with_indices(x, 2)
    b = F.max_pool2d_with_indices(x, 2)
    assert isinstance(a, tuple) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(max_pool2d(x, 3, []), F.max_pool2d(x, 3, []))
    assert torch.equal(ops.max_pool2d_with_indices(x, [3, 3], [], [0, 0], [1, 1], False)[0], F.max_pool2d(x, 3))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,kw,match", [
    ((torch.randn(1, 1, 4, 4), 3), dict(padding=2), "padding to be at most half of kernel_size"),
    ((torch.randn(1, 1, 2, 2), 3), {}, "to fit in the padded input"),
    ((torch.randn(1, 1, 4, 4), 0), {}, "kernel_size to be at least 1"),
    ((torch.randn(1, 1, 4, 4), 2), dict(stride=0), "stride to be at least 1"),
    ((torch.randn(1, 1, 4, 4), 2), dict(dilation=0), "dilation to be at least 1"),
    ((torch.randn(1, 1, 4, 4), 2), dict(padding=-1), "padding to be non-negative"),
    ((torch.randn(1, 4, 4), 2), dict(stride=(1, 2, 3)), "stride to be an int or a pair"),
    ((torch.randn(4, 4), 2), {}, "input to be 3-D"),
    ((torch.randn(1, 0, 4, 4), 2), {}, "non-zero channels, height and width"),
    ((torch.randint(0, 3, (1, 1, 4, 4)), 2), {}, "expected input to be float16, bfloat16, float32 or float64, got Long"),
    ((torch.randn(1, 1, 4, 4, dtype=torch.complex64), 2), {}, "expected input to be float16, bfloat16, float32 or float64, got ComplexFloat"),
])
def test_errors(args, kw, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        max_pool2d(*args, **kw)


def test_backward_op_errors():
    x = torch.randn(1, 2, 4, 4)
    conf = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    y, idx = ops.max_pool2d_with_indices(x, *conf)
    with pytest.raises(RuntimeError, match=r"invalid index 16 in indices.*4 x 4.*\[0, 16\)"):
        ops.max_pool2d_with_indices_backward(y, idx + 16 - idx.max(), [1, 2, 4, 4], *conf)
    with pytest.raises(RuntimeError, match="invalid index -1"):
        ops.max_pool2d_select(x, idx - idx - 1, *conf)
    with pytest.raises(RuntimeError, match="expected grad_output of shape"):
        ops.max_pool2d_with_indices_backward(y[:, :, :1], idx[:, :, :1], [1, 2, 4, 4], *conf)
    with pytest.raises(RuntimeError, match="expected indices of shape"):
        ops.max_pool2d_with_indices_backward(y, idx[:, :1], [1, 2, 4, 4], *conf)
    with pytest.raises(RuntimeError, match="expected indices to be int64"):
        ops.max_pool2d_with_indices_backward(y, idx.int(), [1, 2, 4, 4], *conf)
    with pytest.raises(RuntimeError, match="expected input_size of 4 entries"):
        ops.max_pool2d_with_indices_backward(y, idx, [2, 4, 4], *conf)


# --------------------------------------------------------------------------------------------
# opcheck, module
# --------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "unbatched"])
def test_opcheck(layout, device):
    x = distinct((3, 6, 7) if layout == "unbatched" else (2, 3, 6, 7)).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    conf = ([3, 2], [2, 1], [1, 1], [1, 2], True)
    torch.library.opcheck(ops.max_pool2d_with_indices, (x, *conf))
    y, idx = ops.max_pool2d_with_indices(x.detach(), *conf)
    g = torch.randn(y.shape, dtype=x.dtype, device=device, requires_grad=True)
    torch.library.opcheck(ops.max_pool2d_with_indices_backward, (g, idx, list(x.shape), *conf))
    torch.library.opcheck(ops.max_pool2d_select, (x, idx, *conf))


# Every device against cnnext's CPU kernels in float64, exactly: ties, NaN, outputs,
# indices and gradients, then the unpooling of the result and its gradient.
DEVICE_CONFIGS = [
    ((2, 3, 9, 8), dict(kernel_size=3, stride=2, padding=1)),
    ((1, 4, 7, 7), dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), ceil_mode=True)),
    ((3, 5, 6), dict(kernel_size=2)),
    ((0, 2, 5, 5), dict(kernel_size=2)),
    ((1, 1, 1, 1), dict(kernel_size=2, stride=1, padding=1, dilation=2)),  # window without taps
]


@pytest.mark.parametrize("device, dtype", device_dtypes())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", range(len(DEVICE_CONFIGS)))
def test_parity_with_cpu_float64(cfg, layout, device, dtype):
    shape, kw = DEVICE_CONFIGS[cfg]
    x = torch.randint(-4, 5, shape).double()  # ties; exact in every dtype
    if x.numel():
        x.view(-1)[0] = float("nan")
    xc = lay(x.to(device, dtype), layout).requires_grad_()
    out, idx = max_pool2d(xc, return_indices=True, **kw)
    ref_out, ref_idx = max_pool2d(x, return_indices=True, **kw)  # cnnext CPU in float64
    torch.testing.assert_close(out.double().cpu(), ref_out, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx.cpu(), ref_idx)
    go = torch.randint(-3, 4, out.shape).double()
    gx, = torch.autograd.grad(out, xc, go.to(device, dtype))
    xr = x.clone().requires_grad_()
    want, = torch.autograd.grad(max_pool2d(xr, **kw), xr, go)
    torch.testing.assert_close(gx.double().cpu(), want, rtol=0, atol=0)
    # unpooling of the pooled values, and its gradient
    size = list(x.shape[-2:])
    stride = kw.get("stride", kw["kernel_size"])
    if kw.get("dilation", 1) == 1 and not kw.get("ceil_mode"):
        y = out.detach().requires_grad_()
        u = cnnext.functional.max_unpool2d(y, idx, kw["kernel_size"], stride, kw.get("padding", 0), output_size=size)
        ur = cnnext.functional.max_unpool2d(ref_out, ref_idx, kw["kernel_size"], stride, kw.get("padding", 0),
                                            output_size=size)
        torch.testing.assert_close(u.double().cpu(), ur, rtol=0, atol=0, equal_nan=True)
        gu = torch.randint(-3, 4, u.shape).double()
        gy, = torch.autograd.grad(u, y, gu.to(device, dtype))
        torch.testing.assert_close(gy.double().cpu(), ops.max_unpool2d_backward(gu, ref_idx), rtol=0, atol=0)


@pytest.mark.parametrize("device", cuda_only())  # on the CPU: the tests above
def test_double_backward_and_select(device):
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda t: max_pool2d(t, 3, 2, 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_bad_indices_detected(device):
    x = torch.randn(2, 3, 8, 8, device=device)
    y, idx = max_pool2d(x, 2, return_indices=True)
    bad = idx.clone()
    bad[1, 2, 3, 3] = 5500
    with pytest.raises(RuntimeError, match=r"max_unpool2d: found an invalid index 5500 in indices.*8 x 8"):
        cnnext.functional.max_unpool2d(y, bad, 2)
    with pytest.raises(RuntimeError, match="max_unpool2d_backward: found an invalid index 5500"):
        ops.max_unpool2d_backward(torch.randn(2, 3, 8, 8, device=device), bad)
    with pytest.raises(RuntimeError, match="max_pool2d_select: found an invalid index 5500"):
        ops.max_pool2d_select(x, bad, [2, 2], [2, 2], [0, 0], [1, 1], False)
    if device != "cpu":
        with pytest.raises(RuntimeError, match="expected indices to be on the same device"):
            cnnext.functional.max_unpool2d(y, idx.cpu(), 2)


def test_module():
    for kw in (dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=(2, 3), dilation=2, ceil_mode=True),
               dict(kernel_size=2, return_indices=True)):
        ours, ref = cnnext.nn.MaxPool2d(**kw), torch.nn.MaxPool2d(**kw)
        assert isinstance(ours, torch.nn.MaxPool2d)
        assert repr(ours) == repr(ref)
        assert ours.state_dict().keys() == ref.state_dict().keys()
        x = torch.randn(2, 3, 9, 10)
        a, b = ours(x), ref(x)
        if kw.get("return_indices"):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        else:
            assert torch.equal(a, b)


def test_compile():
    x = torch.randn(2, 3, 8, 8)
    fn = torch.compile(lambda t: max_pool2d(t, 3, 2, 1, return_indices=True), backend="eager", fullgraph=True)
    a, b = fn(x), F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("channels", [37, 70])
def test_channels_last_wide(channels):
    """channels_last with channels past the vector blocks (32 float / 16 double, a quarter
    block and a scalar tail): special values, forward, backward and the unpooling."""
    gen = torch.Generator().manual_seed(channels)
    for dtype in (torch.float32, torch.float64):
        for kw in (dict(kernel_size=3, stride=2), dict(kernel_size=3, stride=1, padding=1),
                   dict(kernel_size=(2, 3), stride=(1, 2), padding=1, dilation=(2, 1), ceil_mode=True),
                   dict(kernel_size=2, stride=1, padding=1, dilation=3)):
            x0 = special_values((2, channels, 7, 8), dtype, gen)
            x = x0.contiguous(memory_format=torch.channels_last).requires_grad_()
            ref_out, ref_idx = F.max_pool2d(x0, return_indices=True, **kw)
            out, idx = max_pool2d(x, return_indices=True, **kw)
            assert is_channels_last(out) and is_channels_last(idx)
            torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(idx, ref_idx)
            go = torch.randn(out.shape, generator=gen, dtype=dtype)
            gx, = torch.autograd.grad(out, x, go.contiguous(memory_format=torch.channels_last))
            k, s, p, d = (tuple(pair(kw.get(a, dflt))) for a, dflt in
                          (("kernel_size", 1), ("stride", kw["kernel_size"]), ("padding", 0), ("dilation", 1)))
            want = scatter_reference(x0.shape, ref_idx, go, k, s, p, d, kw.get("ceil_mode", False))
            torch.testing.assert_close(gx.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)
            if d == (1, 1):  # the unpooling to the input's size (reachable for these)
                y = torch.randn(out.shape, generator=gen, dtype=dtype).contiguous(memory_format=torch.channels_last)
                got = cnnext.functional.max_unpool2d(y, idx, k, s, p, output_size=(7, 8))
                assert is_channels_last(got)
                torch.testing.assert_close(got, F.max_unpool2d(y, ref_idx, k, s, p, output_size=(7, 8)),
                                           rtol=0, atol=0)

