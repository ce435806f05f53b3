"""avg_pool2d and adaptive_avg_pool2d on CUDA: parity with cnnext's CPU backend and
torch (float64 references from the very values the CUDA run sees), layouts, opcheck,
determinism, mixed devices.

Every test here needs a GPU and a cnnext build with CUDA kernels, and skips itself
otherwise.
"""
import pytest
import torch
import torch.nn.functional as F

import cnnext
from cnnext.functional import adaptive_avg_pool2d, avg_pool2d
from conftest import is_channels_last, to_layout

HAS_CUDA = torch.cuda.is_available() and bool(cnnext.build_info()["cuda"])
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a cnnext build with CUDA kernels")

ops = torch.ops.cnnext
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = tuple(RTOL)
LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted", "offset")

# (shape, function, kwargs)
CONFIGS = [
    ((2, 3, 8, 9), avg_pool2d, F.avg_pool2d, dict(kernel_size=2)),
    ((2, 3, 7, 9), avg_pool2d, F.avg_pool2d, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                                                  count_include_pad=False)),
    ((1, 4, 7, 6), avg_pool2d, F.avg_pool2d, dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 0),
                                                  ceil_mode=True)),
    ((2, 2, 5, 5), avg_pool2d, F.avg_pool2d, dict(kernel_size=3, stride=1, padding=1, divisor_override=4)),
    ((4, 64, 7, 7), avg_pool2d, F.avg_pool2d, dict(kernel_size=7)),                 # global by kernel
    ((4, 64, 7, 7), adaptive_avg_pool2d, F.adaptive_avg_pool2d, dict(output_size=1)),  # warp per plane
    ((4, 300, 3, 3), adaptive_avg_pool2d, F.adaptive_avg_pool2d, dict(output_size=1)),  # thread per plane
    ((2, 3, 7, 9), adaptive_avg_pool2d, F.adaptive_avg_pool2d, dict(output_size=(3, 4))),
    ((1, 3, 3, 4), adaptive_avg_pool2d, F.adaptive_avg_pool2d, dict(output_size=(5, 7))),
    ((3, 5, 6), adaptive_avg_pool2d, F.adaptive_avg_pool2d, dict(output_size=(2, None))),  # unbatched
    ((0, 3, 6, 6), avg_pool2d, F.avg_pool2d, dict(kernel_size=2)),
]


def cuda_layout(t, layout):
    """t on the GPU in the given layout, strides and gaps included (Tensor.cuda() would
    make a non-dense tensor contiguous)."""
    t = to_layout(t, layout)
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    window = torch.as_strided(t, (span,), (1,), t.storage_offset()).cuda()
    return torch.as_strided(window, t.shape, t.stride())


def run(fn, x, kw, go):
    x = x.detach().requires_grad_()
    y = fn(x, **kw)
    (gx,) = torch.autograd.grad(y, x, go) if y.numel() else (torch.zeros_like(x),)
    return y, gx


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_parity(cfg, dtype, layout):
    shape, ours, ref, kw = CONFIGS[cfg]
    g = torch.Generator().manual_seed(cfg)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    y_shape = ref(x.double(), **kw).shape
    go = torch.randn(y_shape, generator=g, dtype=torch.float64).to(dtype)
    y, gx = run(ours, cuda_layout(x, layout), kw, go.cuda())
    want_y, want_gx = run(ref, x.double(), kw, go.double())
    cpu_y, cpu_gx = run(ours, x.double(), kw, go.double())  # cnnext's CPU backend
    for got, want, cpu in ((y, want_y, cpu_y), (gx, want_gx, cpu_gx)):
        assert got.dtype == dtype and got.device.type == "cuda" and got.shape == want.shape
        if want.numel() == 0:
            continue
        scale = max(want.abs().max().item(), 1e-30)
        assert (got.double().cpu() - want).abs().max().item() <= RTOL[dtype] * scale
        assert (got.double().cpu() - cpu).abs().max().item() <= RTOL[dtype] * scale
    if layout == "channels_last" and len(shape) == 4 and min(y_shape) > 1:
        assert is_channels_last(y) and is_channels_last(gx)


def test_deterministic():
    x = torch.randn(8, 32, 17, 19, device="cuda")
    g = torch.randn(8, 32, 15, 17, device="cuda")
    runs = [ops.avg_pool2d_backward(g, x, [3, 3], [1, 1], [0, 0], False, True, None) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("op", ["avg", "adaptive"])
def test_opcheck(op):
    x = torch.randn(2, 3, 7, 6, device="cuda", dtype=torch.float64, requires_grad=True)
    if op == "avg":
        args = (x, [3, 3], [2, 2], [1, 1], True, False, None)
        results = torch.library.opcheck(ops.avg_pool2d.default, args)
    else:
        results = torch.library.opcheck(ops.adaptive_avg_pool2d.default, (x, [3, 4]))
    assert set(results.values()) == {"SUCCESS"}, results


def test_mixed_devices_raise():
    x = torch.randn(2, 3, 6, 6, device="cuda")
    with pytest.raises(RuntimeError, match="avg_pool2d_backward: expected input to be on the same device"):
        ops.avg_pool2d_backward(torch.randn(2, 3, 3, 3), x, [2, 2], [2, 2], [0, 0], False, True, None)
    with pytest.raises(RuntimeError, match="adaptive_avg_pool2d_backward: expected input to be on the same device"):
        ops.adaptive_avg_pool2d_backward(torch.randn(2, 3, 1, 1, device="cuda"), x.cpu())
