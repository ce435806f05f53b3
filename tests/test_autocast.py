"""cnnext under torch.autocast: the convolutions (and the fused op's convolution) cast to
the autocast dtype, pooling runs in its input's dtype, the fused op keeps the batch-norm
parameters and running statistics float32 (csrc/ops/autocast.cpp); models that mix stock
and cnnext layers, and fused models, run, train and match stock's autocast run.

Tolerances: each convolution's output is rounded to the autocast dtype, by cnnext and by
stock alike, but from sums taken in different orders, so the two differ by up to one
rounding per layer (bfloat16: 2^-8 relative); through a few layers, batch norm (which
magnifies by 1/std) and the backward pass the differences compound: outputs and
gradients are compared relative to the largest stock magnitude with 5e-2 (bfloat16) and
1e-2 (float16), three to twelve roundings' worth. The loss curves of a 50-step training
run must stay within 5% of each other (each step's update is within rounding of stock's,
and SGD on this data is not chaotic over 50 steps).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnext
import cnnext.functional as cf
from cnnext.testing import cpu_and_cuda

TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _close(a, b, rtol, what):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, what
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"{what}: max abs error {err:.3e} > {rtol} * {scale:.3e}"


def _autocast_dtype(device):
    # CPU autocast defaults to bfloat16; CUDA to float16.
    return torch.bfloat16 if device == "cpu" else torch.float16


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_conv_ops_cast_like_stock(device):
    """conv2d / conv_transpose2d under autocast: float32 arguments cast to the autocast
    dtype, the output in it, the gradients of the float32 leaves float32; float64
    arguments are left alone (as torch's lower_precision_fp leaves them)."""
    dt = _autocast_dtype(device)
    x = torch.randn(2, 4, 9, 9, device=device, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    wt = torch.randn(4, 6, 3, 3, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dt):
        y = cf.conv2d(x, w, b, padding=1)
        ref = F.conv2d(x, w, b, padding=1)
        yt = cf.conv_transpose2d(x, wt, None, stride=2)
        reft = F.conv_transpose2d(x, wt, None, stride=2)
    assert y.dtype == ref.dtype == dt and yt.dtype == reft.dtype == dt
    _close(y, ref, TOL[dt], "conv2d")
    _close(yt, reft, TOL[dt], "conv_transpose2d")
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), gy)
    ref_grads = torch.autograd.grad(ref, (x, w, b), gy)
    for g, r, name in zip(grads, ref_grads, ("x", "w", "b")):
        assert g.dtype == torch.float32, name
        _close(g, r, TOL[dt], f"grad {name}")
    with torch.autocast(device, dtype=dt):
        y64 = cf.conv2d(x.double(), w.double(), None)
    assert y64.dtype == torch.float64


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_pooling_runs_in_input_dtype(device):
    """Pooling is not cast: a float32 input stays float32 under autocast, a half one stays half."""
    dt = _autocast_dtype(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.autocast(device, dtype=dt):
        for t in (x, x.to(dt)):
            out, idx = cf.max_pool2d(t, 2, return_indices=True)
            assert out.dtype == t.dtype
            assert cf.avg_pool2d(t, 2).dtype == t.dtype
            assert cf.adaptive_avg_pool2d(t, 1).dtype == t.dtype
            assert cf.max_unpool2d(out, idx, 2).dtype == t.dtype


def _mixed_model(backend):
    """Stock and cnnext layers in turn (backend='torch': all stock)."""
    L = cnnext.nn if backend == "cnnext" else nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), L.MaxPool2d(2),
        L.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), L.AvgPool2d(2),
        L.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        L.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _train_steps(model, x, y, device, dt, steps=1, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast(device, dtype=dt):
            out = model(x)
            loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return out, losses


@pytest.mark.parametrize("fused", [False, True], ids=["mixed", "fused"])
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_mixed_model_trains_like_stock(device, fused):
    """A model mixing stock and cnnext layers (and the same model through cnnext.fuse,
    whose Conv2d -> BatchNorm2d -> ReLU chains become one op) under autocast: forward in
    train mode, backward, an SGD step, then eval, against the all-stock model."""
    dt = _autocast_dtype(device)
    torch.manual_seed(0)
    ref = _mixed_model("torch").to(device)
    ours = _mixed_model("cnnext").to(device)
    ours.load_state_dict(ref.state_dict())
    if fused:
        ours = cnnext.fuse(ours, warn=False)
        assert sum(isinstance(m, cnnext.nn.FusedConv2d) for m in ours.modules()) == 2
    x = torch.randn(8, 3, 16, 16, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    out, _ = _train_steps(ours, x, y, device, dt)
    want, _ = _train_steps(ref, x, y, device, dt)
    assert out.dtype == want.dtype
    _close(out, want, TOL[dt], "train-mode output")
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    for k, v in ref_state.items():
        assert ours_state[k].dtype == v.dtype, f"{k}: {ours_state[k].dtype} != {v.dtype}"  # float32 params/stats
        if v.is_floating_point():
            _close(ours_state[k], v, TOL[dt], f"{k} after one step")
    ours.eval()
    ref.eval()
    with torch.autocast(device, dtype=dt), torch.no_grad():
        _close(ours(x), ref(x), TOL[dt], "eval output")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_fused_conv_bn_relu_under_autocast(device):
    """cnnext.nn.ConvBNReLU2d under autocast: bfloat16 output, float32 parameters,
    statistics, running statistics and gradients, matching the stock triple."""
    dt = _autocast_dtype(device)
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).to(device)
    ours = cnnext.nn.ConvBNReLU2d(4, 8, 3, padding=1).to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 4, 10, 10, device=device)
    with torch.autocast(device, dtype=dt):
        out, want = ours(x), ref(x)
    assert out.dtype == want.dtype == dt
    assert ours[1].running_mean.dtype == torch.float32
    _close(out, want, TOL[dt], "output")
    _close(ours[1].running_mean, ref[1].running_mean, TOL[dt], "running_mean")
    _close(ours[1].running_var, ref[1].running_var, TOL[dt], "running_var")
    gy = torch.randn_like(out)
    g = torch.autograd.grad(out, [ours[0].weight, ours[1].weight, ours[1].bias], gy)
    r = torch.autograd.grad(want, [ref[0].weight, ref[1].weight, ref[1].bias], gy)
    for a, b, name in zip(g, r, ("weight", "bn_weight", "bn_bias")):
        assert a.dtype == torch.float32
        _close(a, b, TOL[dt], f"grad {name}")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_lenet_50_steps_track_stock(device):
    """50 SGD steps of LeNet under autocast on a fixed synthetic task (the class is which
    quadrant holds a bright blob): cnnext's loss curve tracks stock's step by step, and
    both learn."""
    dt = _autocast_dtype(device)
    g = torch.Generator().manual_seed(0)
    n = 64
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 32, 32, generator=g)
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, 0, 4 + 16 * r: 12 + 16 * r, 4 + 16 * c: 12 + 16 * c] += 1.0
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    ref = cnnext.models.lenet(num_classes=4, backend="torch").to(device)
    ours = cnnext.models.lenet(num_classes=4, backend="cnnext").to(device)
    ours.load_state_dict(ref.state_dict())
    _, ours_losses = _train_steps(ours, x, y, device, dt, steps=50, lr=0.1)
    _, ref_losses = _train_steps(ref, x, y, device, dt, steps=50, lr=0.1)
    assert ours_losses[-1] < 0.5 * ours_losses[0] and ref_losses[-1] < 0.5 * ref_losses[0]
    for step, (a, b) in enumerate(zip(ours_losses, ref_losses)):
        assert abs(a - b) <= 0.05 * max(abs(b), 0.05), f"step {step}: loss {a:.4f} vs stock {b:.4f}"


def test_autocast_disabled_region_runs_float32():
    """torch.autocast(enabled=False) inside an autocast region: no cast."""
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            assert cf.conv2d(x, w).dtype == torch.float32
        assert cf.conv2d(x, w).dtype == torch.bfloat16


def test_autocast_float16_on_cpu():
    """torch.autocast('cpu', dtype=torch.float16) casts to float16."""
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with torch.autocast("cpu", dtype=torch.float16):
        y, ref = cf.conv2d(x, w), F.conv2d(x, w)
    assert y.dtype == ref.dtype == torch.float16
    _close(y, ref, TOL[torch.float16], "float16 autocast")
