"""The flat loops over dense planes (csrc/cpu/max_pool2d_backward.cpp, csrc/cpu/max_unpool2d.cpp) of max_unpool2d's scatter and
max_pool2d's backward scatter-add (NCHW, planes with contiguous rows and no row padding, every
window with a tap), against torch: repeated indices (last write wins / gradients add in
output order), float32 and float64, invalid indices reported, and the strided loops beside
them (non-dense planes, empty windows). Each test asserts through the path counters
(cnnext._paths) that the loop it targets ran."""
import pytest
import torch
import torch.nn.functional as F

import cnnext
from cnnext._paths import expect_path

ops = torch.ops.cnnext


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 0), (2, 2, 0), (3, 2, 1)])
def test_unpool_and_backward_match_torch(dtype, k, s, p):
    gen = torch.Generator().manual_seed(k * 10 + s + p)
    # small integers: ties, so windows share their maxima and indices repeat
    x = torch.randint(-2, 3, (2, 3, 11, 13), generator=gen).to(dtype)
    y, idx = F.max_pool2d(x, k, s, p, return_indices=True)
    g = torch.randn(y.shape, generator=gen, dtype=dtype)
    for yy, ii, gg in ((y, idx, g), (y[:, 1:], idx[:, 1:], g[:, 1:])):  # dense planes, strided batch
        with expect_path("max_unpool2d.fwd.flat_scatter"):
            got = cnnext.functional.max_unpool2d(yy, ii, k, s, p, output_size=x.shape[-2:])
        want = F.max_unpool2d(yy, ii, k, s, p, output_size=x.shape[-2:])
        assert torch.equal(got, want)
        shape = list(yy.shape[:2]) + list(x.shape[-2:])
        with expect_path("max_pool2d.bwd.flat_scatter"):
            gx = ops.max_pool2d_with_indices_backward(gg, ii, shape, [k, k], [s, s], [p, p], [1, 1], False)
        xr = x[:, -yy.shape[1]:].clone().requires_grad_()
        (want_gx,) = torch.autograd.grad(F.max_pool2d(xr, k, s, p), xr, gg)
        torch.testing.assert_close(gx, want_gx, rtol=0, atol=0)
    # non-dense planes (rows of the grad / indices strided): the strided loops
    yt, it = y.transpose(2, 3).contiguous().transpose(2, 3), idx.transpose(2, 3).contiguous().transpose(2, 3)
    with expect_path("max_unpool2d.fwd.strided_scatter"):
        got = cnnext.functional.max_unpool2d(yt, it, k, s, p, output_size=x.shape[-2:])
    assert torch.equal(got, F.max_unpool2d(y, idx, k, s, p, output_size=x.shape[-2:]))


def test_repeated_indices_order():
    # last write wins (unpool), gradients add (backward), in a dense plane
    y = torch.arange(1.0, 7.0, dtype=torch.float64).reshape(1, 1, 2, 3)
    idx = torch.tensor([[[[4, 4, 0], [4, 8, 0]]]])
    got = ops.max_unpool2d(y, idx, [3, 3])
    assert got.flatten().tolist() == [6.0, 0, 0, 0, 4.0, 0, 0, 0, 5.0]
    gx = ops.max_pool2d_with_indices_backward(y, idx, [1, 1, 3, 4], [2, 2], [1, 1], [0, 0], [1, 1], False)
    want = torch.zeros(12, dtype=torch.float64)
    for v, i in zip(y.flatten().tolist(), idx.flatten().tolist()):
        want[i] += v
    assert torch.equal(gx.flatten(), want)


def test_invalid_indices_reported():
    y = torch.randn(2, 2, 3, 3)
    for bad in (-1, 36, 1 << 40):
        idx = torch.zeros(2, 2, 3, 3, dtype=torch.int64)
        idx[1, 0, 2, 1] = bad
        with pytest.raises(RuntimeError, match=f"max_unpool2d: found an invalid index {bad}"):
            ops.max_unpool2d(y, idx, [6, 6])
        with pytest.raises(RuntimeError, match=f"max_pool2d_with_indices_backward: found an invalid index {bad}"):
            ops.max_pool2d_with_indices_backward(y, idx, [2, 2, 6, 6], [2, 2], [2, 2], [0, 0], [1, 1], False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 0), (2, 2, 0)])
def test_channels_last_backward(dtype, k, s, p):
    # channels_last grad and indices (channels contiguous: the unit-stride loop), and mixed
    # layouts (the strided loop), ties so that indices repeat
    gen = torch.Generator().manual_seed(k + 10 * s + 100 * p)
    x = torch.randint(-2, 3, (2, 5, 9, 10), generator=gen).to(dtype)
    y, idx = F.max_pool2d(x, k, s, p, return_indices=True)
    g = torch.randn(y.shape, generator=gen, dtype=dtype)
    xr = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.max_pool2d(xr, k, s, p), xr, g)
    cl = torch.channels_last
    for n, (gg, ii) in enumerate(((g.contiguous(memory_format=cl), idx.contiguous(memory_format=cl)),
                                  (g.contiguous(memory_format=cl), idx), (g, idx.contiguous(memory_format=cl)))):
        # grad_input takes the indices' layout: channels_last loops when they are channels_last;
        # windows that do not overlap (stride >= kernel) with every layout channels_last
        # write grad_input once (test_channels_last_tiled_backward below)
        path = "max_pool2d.bwd.strided_scatter" if n == 1 else (
            "max_pool2d.bwd.channels_last_tiled" if n == 0 and s >= k else "max_pool2d.bwd.channels_last")
        with expect_path(path):
            gx = ops.max_pool2d_with_indices_backward(gg, ii, list(x.shape), [k, k], [s, s], [p, p], [1, 1], False)
        if n == 0:
            assert gx.is_contiguous(memory_format=cl)
        torch.testing.assert_close(gx, want, rtol=0, atol=0)
    bad = idx.clone()
    bad[1, 3, 0, 0] = 90
    with pytest.raises(RuntimeError, match="invalid index 90"):
        ops.max_pool2d_with_indices_backward(g.contiguous(memory_format=cl), bad.contiguous(memory_format=cl),
                                             list(x.shape), [k, k], [s, s], [p, p], [1, 1], False)


TILED = "max_pool2d.bwd.channels_last_tiled"
TILED_FALLBACK = "max_pool2d.bwd.channels_last_tiled_fallback"


# (H, W, k, s, p, ceil_mode): windows that tile the input; gaps between them (stride past
# the kernel); rows and columns past the last window; padding; ceil mode's clipped last
# window; a 1x1 window.
TILED_CASES = [(8, 10, 2, 2, 0, False), (9, 11, 2, 2, 0, False), (9, 11, 3, 3, 1, False),
               (10, 13, 2, 3, 0, False), (11, 9, 2, 3, 1, True), (7, 9, 3, 3, 0, True),
               (5, 6, 1, 2, 0, False), (12, 12, (2, 3), (3, 4), (1, 0), False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", TILED_CASES)
def test_channels_last_tiled_backward(dtype, case):
    # Non-overlapping windows, channels_last: grad_input written once (the gradient where the
    # index names the position, else 0; 0 outside every window), bit for bit stock's
    # zero-then-add: a -0.0 gradient lands as +0.0, NaN and Inf as they are.
    h, w, k, s, p, ceil_mode = case
    gen = torch.Generator().manual_seed(h * w)
    x = torch.randint(-2, 3, (3, 6, h, w), generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 1, 0, 0] = float("nan")
    y, idx = F.max_pool2d(x, k, s, p, ceil_mode=ceil_mode, return_indices=True)
    g = torch.randn(y.shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    g[0, 0, 0, 0] = -0.0
    g[1, 2, 0, 1] = float("inf")
    g[2, 5, 1, 0] = float("nan")
    ks, ss, ps = ([v, v] if isinstance(v, int) else list(v) for v in (k, s, p))
    with expect_path(TILED):
        gx = ops.max_pool2d_with_indices_backward(g, idx, list(x.shape), ks, ss, ps, [1, 1], ceil_mode)
    want = torch.ops.aten.max_pool2d_with_indices_backward(g, x, ks, ss, ps, [1, 1], ceil_mode, idx)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gx.isnan(), want.isnan())
    assert torch.equal(gx.nan_to_num(), want.nan_to_num())
    assert torch.equal(torch.signbit(gx), torch.signbit(want))
    # Through autograd, against stock's whole backward.
    xr = x.clone().requires_grad_()
    with expect_path(TILED):
        (got,) = torch.autograd.grad(cnnext.functional.max_pool2d(xr, k, s, p, ceil_mode=ceil_mode), xr, g)
    (ref,) = torch.autograd.grad(F.max_pool2d(xr, k, s, p, ceil_mode=ceil_mode), xr, g)
    assert torch.equal(got.nan_to_num(), ref.nan_to_num()) and torch.equal(got.isnan(), ref.isnan())


def test_channels_last_tiled_backward_indices_from_elsewhere():
    # Indices that are valid positions but not of their own window (made by hand, or by
    # another pooling): the tiled writer notices (not every pixel matched) and hands over
    # to the scatter, which adds them where they point, as stock does; repeated too.
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(2, 5, 3, 4, generator=gen).contiguous(memory_format=torch.channels_last)
    idx = torch.randint(0, 6 * 8, (2, 5, 3, 4), generator=gen).contiguous(memory_format=torch.channels_last)
    x = torch.empty(2, 5, 6, 8).contiguous(memory_format=torch.channels_last)
    with expect_path(TILED_FALLBACK, "max_pool2d.bwd.channels_last"):
        gx = ops.max_pool2d_with_indices_backward(g, idx, list(x.shape), [2, 2], [2, 2], [0, 0], [1, 1], False)
    want = torch.ops.aten.max_pool2d_with_indices_backward(g, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
    torch.testing.assert_close(gx, want, rtol=1e-6, atol=1e-6)
    # One bad pixel among matching ones still hands over.
    y, idx = F.max_pool2d(torch.randn(2, 5, 6, 8, generator=gen).contiguous(memory_format=torch.channels_last), 2,
                          return_indices=True)
    idx = idx.clone()
    idx[1, 4, 2, 3] = 0
    with expect_path(TILED_FALLBACK):
        gx = ops.max_pool2d_with_indices_backward(g, idx, list(x.shape), [2, 2], [2, 2], [0, 0], [1, 1], False)
    want = torch.ops.aten.max_pool2d_with_indices_backward(g, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
    torch.testing.assert_close(gx, want, rtol=0, atol=0)


def test_channels_last_tiled_backward_threads(threads):
    # Items are (sample, output row): every split over threads writes every position once.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 16, 13, 14, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(3, 16, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last)
    with expect_path(TILED):
        (got,) = torch.autograd.grad(cnnext.functional.max_pool2d(x, 3, 3), x, g)
    (ref,) = torch.autograd.grad(F.max_pool2d(x, 3, 3), x, g)
    assert torch.equal(got, ref)
