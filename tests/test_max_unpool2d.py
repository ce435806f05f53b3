"""cnnext.functional.max_unpool2d, torch.ops.cnnext.max_unpool2d(_backward) and
cnnext.nn.MaxUnpool2d against torch.nn.functional.max_unpool2d / torch.nn.MaxUnpool2d."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import cnnext
from cnnext.functional import max_pool2d, max_unpool2d
from cnnext.testing import LAYOUTS, cpu_and_cuda, is_channels_last, lay
from conftest import examples
from strategies import pair_arg

ops = torch.ops.cnnext


@st.composite
def configs(draw):
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    h = draw(st.integers(max(1, k[0] - 2 * p[0]), 10))
    w = draw(st.integers(max(1, k[1] - 2 * p[1]), 10))
    n, c = draw(st.sampled_from([0, 1, 2])), draw(st.integers(1, 4))
    unbatched = n == 1 and draw(st.booleans())
    return (c, h, w) if unbatched else (n, c, h, w), k, s, p


@settings(max_examples=examples(100))
@given(cfg=configs(), layout=st.sampled_from(LAYOUTS), idx_layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from([torch.float32, torch.float64]), size_delta=st.data(), seed=st.integers(0, 2**16))
def test_parity(cfg, layout, idx_layout, dtype, size_delta, seed):
    shape, k, s, p = cfg
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    y, idx = F.max_pool2d(x, k, s, p, return_indices=True)
    default = [(y.shape[-2 + d] - 1) * s[d] - 2 * p[d] + k[d] for d in range(2)]
    delta = [size_delta.draw(st.integers(-s[d] + 1, s[d] - 1)) for d in range(2)]
    output_size = None
    if size_delta.draw(st.booleans()):
        output_size = [default[d] + delta[d] for d in range(2)]
        if size_delta.draw(st.booleans()):
            output_size = [*y.shape[:-2], *output_size] if y.dim() == 4 else [1, y.shape[0], *output_size]
    kw = dict(kernel_size=pair_arg(size_delta.draw, k), stride=pair_arg(size_delta.draw, s),
              padding=pair_arg(size_delta.draw, p), output_size=output_size)
    try:
        want = F.max_unpool2d(y, idx, **kw)
    except ValueError as e:  # a negative output_size
        assert "non-negative" in str(e)
        with pytest.raises(ValueError, match="expected output_size to be non-negative"):  # torch's type
            max_unpool2d(lay(y, layout), lay(idx, idx_layout), **kw)
        return
    except RuntimeError as e:  # an index beyond a smaller output plane
        assert "invalid max index" in str(e)
        with pytest.raises(RuntimeError, match="max_unpool2d: found an invalid index"):
            max_unpool2d(lay(y, layout), lay(idx, idx_layout), **kw)
        return
    yl = lay(y, layout).requires_grad_()
    got = max_unpool2d(yl, lay(idx, idx_layout), **kw)
    assert torch.equal(got, want)
    if layout in ("contiguous", "channels_last") and got.dim() == 4 and min(y.shape) > 1 and min(got.shape) > 1:
        assert is_channels_last(got) == is_channels_last(F.max_unpool2d(lay(y, layout), idx, **kw))
    go = torch.randn(got.shape, generator=gen, dtype=dtype)
    if got.numel() == 0 and y.numel() > 0:
        # An empty output plane holds no position: every index is out of range, and the
        # backward raises, as torch's does (issue 13 item 10), instead of returning zeros.
        with pytest.raises(RuntimeError, match="found an invalid index"):
            torch.autograd.grad(got, yl, go)
        yr = y.clone().requires_grad_()
        with pytest.raises(RuntimeError):
            torch.autograd.grad(F.max_unpool2d(yr, idx, **kw), yr, go)
        return
    gx, = torch.autograd.grad(got, yl, go)
    if got.numel() == 0:  # no indices at all: nothing flows
        assert torch.count_nonzero(gx) == 0
        return
    yr = y.clone().requires_grad_()
    gr, = torch.autograd.grad(F.max_unpool2d(yr, idx, **kw), yr, go)
    assert torch.equal(gx, gr)


def test_round_trip_and_module():
    x = torch.randn(2, 3, 9, 8)
    pool, unpool = cnnext.nn.MaxPool2d(2, return_indices=True), cnnext.nn.MaxUnpool2d(2)
    ref = torch.nn.MaxUnpool2d(2)
    assert isinstance(unpool, torch.nn.MaxUnpool2d) and repr(unpool) == repr(ref)
    assert unpool.state_dict().keys() == ref.state_dict().keys()
    y, idx = pool(x)
    assert torch.equal(unpool(y, idx), ref(y, idx))
    assert torch.equal(unpool(y, idx, output_size=x.size()), ref(y, idx, output_size=x.size()))
    assert unpool(y, idx, output_size=x.size()).shape == x.shape
    m = cnnext.nn.MaxUnpool2d((2, 3), stride=(1, 2), padding=(1, 0))
    r = torch.nn.MaxUnpool2d((2, 3), stride=(1, 2), padding=(1, 0))
    y, idx = F.max_pool2d(x, (2, 3), (1, 2), (1, 0), return_indices=True)
    assert repr(m) == repr(r) and torch.equal(m(y, idx, x.shape[-2:]), r(y, idx, x.shape[-2:]))


def test_duplicate_indices_last_wins():
    y = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    idx = torch.tensor([[[[0, 0, 1]]]])
    got = max_unpool2d(y, idx, 1)
    assert torch.equal(got, F.max_unpool2d(y, idx, 1))
    assert got.flatten().tolist() == [2.0, 3.0, 0.0]


@pytest.mark.usefixtures("single_thread")
def test_gradcheck_gradgradcheck():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    y, idx = max_pool2d(x, 2, return_indices=True)
    y.requires_grad_()
    fn = lambda v: max_unpool2d(v, idx, 2, output_size=x.shape[-2:])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y,))
    assert torch.autograd.gradgradcheck(fn, (y,))
    g = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    bw = lambda v: ops.max_unpool2d_backward(v, idx)  # noqa: E731
    assert torch.autograd.gradcheck(bw, (g,))
    assert torch.autograd.gradgradcheck(bw, (g,))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "unbatched"])
def test_opcheck(layout, device):
    x = torch.randn((3, 6, 7) if layout == "unbatched" else (2, 3, 6, 7), dtype=torch.float64, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y, idx = F.max_pool2d(x, 2, return_indices=True)
    y.requires_grad_()
    torch.library.opcheck(ops.max_unpool2d, (y, idx, [7, 7]))
    g = torch.randn(*x.shape[:-2], 7, 7, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(ops.max_unpool2d_backward, (g, idx))


def test_errors():
    x = torch.randn(2, 3, 8, 8)
    y, idx = F.max_pool2d(x, 2, return_indices=True)
    bad = idx.clone()
    bad[1, 2, 3, 3] = 5500
    with pytest.raises(RuntimeError, match=r"max_unpool2d: found an invalid index 5500 in indices.*8 x 8.*\[0, 64\)"):
        max_unpool2d(y, bad, 2)
    bad[1, 2, 3, 3] = -1
    with pytest.raises(RuntimeError, match=r"invalid index -1"):
        max_unpool2d(y, bad, 2)
    with pytest.raises(RuntimeError, match=r"invalid index \d+ in indices.*7 x 7"):  # valid for 8 x 8, not 7 x 7
        max_unpool2d(y, idx, 2, output_size=(7, 7))
    with pytest.raises(RuntimeError, match=r"expected indices of shape \[2, 3, 4, 4\]"):
        max_unpool2d(y, idx[:, :, :3], 2)
    with pytest.raises(RuntimeError, match="expected indices to be int64"):
        max_unpool2d(y, idx.int(), 2)
    with pytest.raises(ValueError, match=r"invalid output_size \[10, 10\] \(dim 0 must be between 6 and 10"):
        max_unpool2d(y, idx, 2, output_size=(10, 10))
    with pytest.raises(ValueError, match="output_size to be a sequence of 2 or 4 elements"):
        max_unpool2d(y, idx, 2, output_size=(3, 8, 8))
    with pytest.raises(NotImplementedError, match="expected input to be float16, bfloat16, float32 or float64, got Int"):
        max_unpool2d(y.int(), idx, 2)
    with pytest.raises(RuntimeError, match="expected input to be 3-D"):
        max_unpool2d(y[0, 0], idx[0, 0], 2)
    with pytest.raises(RuntimeError, match="output_size to have 2 entries"):
        ops.max_unpool2d(y, idx, [8])
    with pytest.raises(RuntimeError, match="max_unpool2d_backward: found an invalid index 5500"):
        bad[1, 2, 3, 3] = 5500
        ops.max_unpool2d_backward(torch.randn(2, 3, 8, 8), bad)
    with pytest.raises(RuntimeError, match="max_unpool2d_backward: expected indices to have the batch and channel"):
        ops.max_unpool2d_backward(torch.randn(2, 4, 8, 8), idx)
