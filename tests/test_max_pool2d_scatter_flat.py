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
        # grad_input takes the indices' layout: channels_last loops when they are channels_last
        with expect_path("max_pool2d.bwd.channels_last" if n != 1 else "max_pool2d.bwd.strided_scatter"):
            gx = ops.max_pool2d_with_indices_backward(gg, ii, list(x.shape), [k, k], [s, s], [p, p], [1, 1], False)
        if n == 0:
            assert gx.is_contiguous(memory_format=cl)
        torch.testing.assert_close(gx, want, rtol=0, atol=0)
    bad = idx.clone()
    bad[1, 3, 0, 0] = 90
    with pytest.raises(RuntimeError, match="invalid index 90"):
        ops.max_pool2d_with_indices_backward(g.contiguous(memory_format=cl), bad.contiguous(memory_format=cl),
                                             list(x.shape), [k, k], [s, s], [p, p], [1, 1], False)
