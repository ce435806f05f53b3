"""max_pool2d / max_unpool2d on CUDA against cnnext's CPU kernels and torch: outputs,
indices and every gradient, over dtypes and layouts; bad indices; opcheck. Skips
without a GPU and a CUDA build of cnnext."""
import pytest
import torch
import torch.nn.functional as F

import cnnext
from cnnext.functional import max_pool2d, max_unpool2d
from conftest import LAYOUTS, to_layout

ops = torch.ops.cnnext
pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and cnnext.build_info()["cuda"]),
    reason="needs a GPU and a cnnext build with CUDA kernels",
)
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
CONFIGS = [
    ((2, 3, 9, 8), dict(kernel_size=3, stride=2, padding=1)),
    ((1, 4, 7, 7), dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), ceil_mode=True)),
    ((3, 5, 6), dict(kernel_size=2)),
    ((0, 2, 5, 5), dict(kernel_size=2)),
    ((1, 1, 1, 1), dict(kernel_size=2, stride=1, padding=1, dilation=2)),  # window without taps
]


def lay(t, layout):
    ref = to_layout(torch.zeros(t.shape, dtype=torch.float64), layout)
    out = torch.empty_strided(t.shape, ref.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_parity_with_cpu(cfg, layout, dtype):
    shape, kw = CONFIGS[cfg]
    x = torch.randint(-4, 5, shape).double()  # ties; exact in every dtype
    if x.numel():
        x.view(-1)[0] = float("nan")
    xc = lay(x.to("cuda", dtype), layout).requires_grad_()
    out, idx = max_pool2d(xc, return_indices=True, **kw)
    ref_out, ref_idx = max_pool2d(x, return_indices=True, **kw)  # cnnext CPU in float64
    torch.testing.assert_close(out.double().cpu(), ref_out, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx.cpu(), ref_idx)
    go = torch.randint(-3, 4, out.shape).double()
    gx, = torch.autograd.grad(out, xc, go.to("cuda", dtype))
    xr = x.clone().requires_grad_()
    want, = torch.autograd.grad(max_pool2d(xr, **kw), xr, go)
    torch.testing.assert_close(gx.double().cpu(), want, rtol=0, atol=0)
    # unpooling of the pooled values, and its gradient
    size = list(x.shape[-2:])
    stride = kw.get("stride", kw["kernel_size"])
    if kw.get("dilation", 1) == 1 and not kw.get("ceil_mode"):
        y = out.detach().requires_grad_()
        u = max_unpool2d(y, idx, kw["kernel_size"], stride, kw.get("padding", 0), output_size=size)
        ur = max_unpool2d(ref_out, ref_idx, kw["kernel_size"], stride, kw.get("padding", 0), output_size=size)
        torch.testing.assert_close(u.double().cpu(), ur, rtol=0, atol=0, equal_nan=True)
        gu = torch.randint(-3, 4, u.shape).double()
        gy, = torch.autograd.grad(u, y, gu.to("cuda", dtype))
        torch.testing.assert_close(gy.double().cpu(), ops.max_unpool2d_backward(gu, ref_idx), rtol=0, atol=0)


def test_double_backward_and_select():
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    fn = lambda t: max_pool2d(t, 3, 2, 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,))


def test_bad_indices_detected():
    x = torch.randn(2, 3, 8, 8, device="cuda")
    y, idx = max_pool2d(x, 2, return_indices=True)
    bad = idx.clone()
    bad[1, 2, 3, 3] = 5500
    with pytest.raises(RuntimeError, match=r"max_unpool2d: found an invalid index 5500 in indices.*8 x 8"):
        max_unpool2d(y, bad, 2)
    with pytest.raises(RuntimeError, match="max_unpool2d_backward: found an invalid index 5500"):
        ops.max_unpool2d_backward(torch.randn(2, 3, 8, 8, device="cuda"), bad)
    with pytest.raises(RuntimeError, match="max_pool2d_select: found an invalid index 5500"):
        ops.max_pool2d_select(x, bad, [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="expected indices to be on the same device"):
        max_unpool2d(y, idx.cpu(), 2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    conf = ([3, 2], [2, 1], [1, 1], [1, 2], True)
    torch.library.opcheck(ops.max_pool2d_with_indices, (x, *conf))
    y, idx = ops.max_pool2d_with_indices(x.detach(), *conf)
    g = torch.randn(y.shape, dtype=x.dtype, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.max_pool2d_with_indices_backward, (g, idx, list(x.shape), *conf))
    torch.library.opcheck(ops.max_pool2d_select, (x, idx, *conf))
    y, idx = F.max_pool2d(x.detach(), 2, return_indices=True)
    torch.library.opcheck(ops.max_unpool2d, (y.requires_grad_(), idx, [6, 6]))
    torch.library.opcheck(ops.max_unpool2d_backward, (torch.randn(2, 3, 6, 6, dtype=x.dtype, device="cuda"), idx))
