"""Regression tests of issue 13 ("right or refused"): one test per item, each failing on
the code before its fix. Item 1 (forward-mode AD) is tests/test_forward_ad.py."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cnnext.functional as CF


def test_item03_unpool_double_backward_sums_repeated_indices():
    # Two inputs unpooled to one position: the gradient of grad_input with respect to
    # grad_output is a scatter-ADD, so position 0 collects 1 + 100.
    x = torch.tensor([[[[1., 2.]]]], dtype=torch.float64, requires_grad=True)
    go = torch.zeros(1, 1, 2, 4, dtype=torch.float64, requires_grad=True)
    y = CF.max_unpool2d(x, torch.tensor([[[[0, 0]]]]), 2, output_size=(2, 4))
    g, = torch.autograd.grad(y, x, go, create_graph=True)
    w = torch.tensor([[[[1., 100.]]]], dtype=torch.float64)
    ggo, = torch.autograd.grad((g * w).sum(), go)
    want = torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    want[0, 0, 0, 0] = 101.
    torch.testing.assert_close(ggo, want, rtol=0, atol=0)
    # and stock agrees
    xs = x.detach().clone().requires_grad_()
    gs = go.detach().clone().requires_grad_()
    ys = F.max_unpool2d(xs, torch.tensor([[[[0, 0]]]]), 2, output_size=(2, 4))
    g2, = torch.autograd.grad(ys, xs, gs, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad((g2 * w).sum(), gs)[0], want, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_item04_conv_bn_relu_gradient_passes_at_nan(training):
    # torch's ReLU backward zeroes the gradient where out <= 0 only: a NaN output passes it.
    x = torch.tensor([[[[float("nan"), 1.]]], [[[2., 3.]]]])
    w = torch.ones(1, 1, 1, 1)
    gamma = torch.ones(1, requires_grad=True)
    beta = torch.zeros(1, requires_grad=True)
    rm, rv = torch.zeros(1), torch.ones(1)
    if training:
        rm = rv = None
    out = CF.conv_bn_relu2d(x, w, None, gamma, beta, rm, rv, training)
    got, = torch.autograd.grad(out.sum(), beta)
    beta_s = beta.detach().clone().requires_grad_()
    ref = F.relu(F.batch_norm(F.conv2d(x, w), rm, rv, gamma.detach(), beta_s, training=training))
    want, = torch.autograd.grad(ref.sum(), beta_s)
    torch.testing.assert_close(got, want, equal_nan=True)
    if training:
        assert got.item() == 4.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_item05_conv2d_weight_grad_same_padding_nan(dtype):
    # padding='same' with an even kernel: the tap that never reads x[0] stays finite.
    x = torch.tensor([[[[float("nan"), 1., 2., 3.]]]], dtype=dtype)
    w = torch.tensor([[[[.5, -1.]]]], dtype=dtype, requires_grad=True)
    gw, = torch.autograd.grad(CF.conv2d(x, w, padding="same").sum(), w)
    ws = w.detach().clone().requires_grad_()
    want, = torch.autograd.grad(F.conv2d(x, ws, padding="same").sum(), ws)
    torch.testing.assert_close(gw, want, equal_nan=True)
    assert gw[0, 0, 0, 1].item() == 6.


@pytest.mark.parametrize("where", [(0, 1, 0), (1, 0, 0), (0, 0, 34), (1, 1, 17)])
def test_item05_conv2d_weight_grad_wide_rows_nan(where):
    # Wide rows take the implicit GEMM (float32): its padded-width columns must not
    # carry a NaN of x into taps that never read it.
    x = torch.randn(1, 2, 2, 35, generator=torch.Generator().manual_seed(0))
    x[(0, *where)] = float("nan")
    w = torch.randn(8, 2, 1, 2, requires_grad=True)
    gy = torch.randn(1, 8, 2, 34)
    gw, = torch.autograd.grad(CF.conv2d(x, w), w, gy)
    ws = w.detach().clone().requires_grad_()
    want, = torch.autograd.grad(F.conv2d(x, ws), ws, gy)
    assert torch.equal(gw.isnan(), want.isnan())
    torch.testing.assert_close(gw, want, equal_nan=True, rtol=1e-4, atol=1e-4)


def test_item05_conv2d_weight_grad_wide_rows_inf_padded():
    x = torch.randn(2, 3, 5, 40)
    x[1, 2, 3, 0] = float("inf")
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    gy = torch.randn(2, 4, 5, 40)
    gw, = torch.autograd.grad(CF.conv2d(x, w, padding=1), w, gy)
    ws = w.detach().clone().requires_grad_()
    want, = torch.autograd.grad(F.conv2d(x, ws, padding=1), ws, gy)
    assert torch.equal(gw.isnan(), want.isnan())
    assert torch.equal(gw.isinf(), want.isinf())
    torch.testing.assert_close(gw, want, equal_nan=True, rtol=1e-4, atol=1e-4)


def test_item06_avg_pool2d_huge_kernel_divisor():
    # Kernel 2^32 with padding 2^31: one window of 2^32 x 2^32 padded positions holding
    # the 25 ones (torch itself refuses kernels past int32; cnnext computes it right).
    for dtype in (torch.float32, torch.float64):
        y = CF.avg_pool2d(torch.ones(1, 1, 5, 5, dtype=dtype), 2 ** 32, padding=2 ** 31)
        assert y.shape == (1, 1, 1, 1)
        want = torch.tensor(25 / 2.0 ** 64, dtype=dtype)
        torch.testing.assert_close(y.reshape(()), want, rtol=1e-6, atol=0)
        g = torch.ones(1, 1, 5, 5, dtype=dtype, requires_grad=True)
        gx, = torch.autograd.grad(CF.avg_pool2d(g, 2 ** 32, padding=2 ** 31).sum(), g)
        torch.testing.assert_close(gx, torch.full_like(gx, 2.0 ** -64), rtol=1e-6, atol=0)


def _meta(t):
    return t.to("meta")


@pytest.mark.parametrize("case", ["unpool_indices", "conv_weight", "conv_bias", "conv_transpose_weight",
                                  "unpool_input", "bn_weight", "running_mean"])
def test_item07_tensors_on_another_device_raise(case):
    x = torch.randn(1, 2, 4, 4)
    w = torch.randn(3, 2, 3, 3)
    idx = F.max_pool2d(x, 2, return_indices=True)[1]
    calls = {
        "unpool_indices": lambda: CF.max_unpool2d(x[:, :, :2, :2], _meta(idx), 2),
        "unpool_input": lambda: CF.max_unpool2d(_meta(x[:, :, :2, :2]), idx, 2),
        "conv_weight": lambda: CF.conv2d(x, _meta(w)),
        "conv_bias": lambda: CF.conv2d(x, w, _meta(torch.zeros(3))),
        "conv_transpose_weight": lambda: CF.conv_transpose2d(x, _meta(torch.randn(2, 3, 3, 3))),
        "bn_weight": lambda: CF.conv_bn_relu2d(x, w, None, _meta(torch.ones(3)), torch.zeros(3), None, None,
                                               True),
        "running_mean": lambda: CF.conv_bn_relu2d(x, w, None, torch.ones(3), torch.zeros(3),
                                                  _meta(torch.zeros(3)), torch.ones(3), False),
    }
    with pytest.raises(RuntimeError, match="device"):
        calls[case]()


def test_item08_max_pool2d_huge_stride():
    # One window, the top-left 2 x 2 (torch itself overflows an int for stride 2^40).
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    ys, is_ = F.max_pool2d(x, 2, stride=10 ** 8, return_indices=True)
    assert ys.shape == (1, 1, 1, 1) and ys.item() == x[0, 0, :2, :2].max().item()
    for stride in (10 ** 8, 2 ** 40, 2 ** 62):
        y, i = CF.max_pool2d(x, 2, stride=stride, return_indices=True)
        assert torch.equal(y, ys) and torch.equal(i, is_)
    # a huge kernel and padding (one window) take no memory by their size either
    y, i = CF.max_pool2d(x, 2 ** 40, padding=2 ** 39, return_indices=True)
    assert y.item() == x.max().item() and i.item() == x.flatten().argmax().item()


def test_item08_max_pool2d_stride_memory_stays_flat():
    # The phase arrays of the NCHW rows kernel grew with the stride: 3.8 GB for 10^8.
    code = ("import resource, torch, cnnext.functional as CF\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "CF.max_pool2d(torch.randn(1, 1, 5, 5), 2, stride=10 ** 8)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    grown_kib = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                   text=True).stdout.strip().splitlines()[-1])
    assert grown_kib < 256 * 1024, f"max_pool2d with stride 1e8 grew the process by {grown_kib} KiB"


def _mean64(x):
    return x.double().mean(dim=(-2, -1), keepdim=True)


@pytest.mark.parametrize("case", ["transposed", "dense", "expanded", "channels_last"])
def test_item09_global_average_pool_large_float32_planes(case):
    g = torch.Generator().manual_seed(0)
    if case == "transposed":
        x = (torch.rand(1, 1, 4096, 4096, generator=g) + 3).transpose(-1, -2)
    elif case == "dense":
        x = torch.rand(1, 1, 4096, 4096, generator=g) + 3
    elif case == "expanded":
        x = torch.tensor(3.3).expand(1, 1, 4096, 4096)
    else:
        x = (torch.rand(1, 4, 1024, 1024, generator=g) + 3).contiguous(memory_format=torch.channels_last)
    want = _mean64(x)
    for y in (CF.adaptive_avg_pool2d(x, 1), CF.avg_pool2d(x, x.shape[-2:])):
        err = ((y.double() - want).abs() / want.abs()).max().item()
        assert err < 1e-6, f"{case}: relative error {err}"


def test_item10_empty_unpool_plane_checks_indices():
    # Default output size (1 - 1) * 4 - 2 * 2 + 4 = 0 rows: the plane holds no position,
    # so index 0 is out of range and the backward raises, as torch's does.
    x = torch.ones(1, 1, 1, 1, requires_grad=True)
    i = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    y = CF.max_unpool2d(x, i, (4, 5), padding=(2, 0))
    assert y.shape == F.max_unpool2d(x.detach(), i, (4, 5), padding=(2, 0)).shape == (1, 1, 0, 5)
    with pytest.raises(RuntimeError, match="index"):
        y.backward(torch.ones_like(y))


def test_item11_exception_types_and_messages():
    # torch: ValueError for a 2-D input with a tuple output_size (its _list_with_default).
    for size in ((2, 2), [1, 1], (None, None)):
        with pytest.raises(ValueError):
            F.adaptive_avg_pool2d(torch.randn(2, 2), size)
        with pytest.raises(ValueError, match="adaptive_avg_pool2d: expected input to have more than 2 dims"):
            CF.adaptive_avg_pool2d(torch.randn(2, 2), size)
    # The channel mismatch names the input, as torch's message does.
    with pytest.raises(RuntimeError, match=r"expected input\[2, 1, 28, 28\] to have 3 channels, but got 1 channels"):
        CF.conv2d(torch.randn(2, 1, 28, 28), torch.randn(4, 3, 3, 3))


def _is_cl(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
@pytest.mark.parametrize("x_cl, g_cl", [(False, True), (True, False)])
def test_item12_conv_gradients_take_the_forward_layout(op, x_cl, g_cl):
    # torch makes grad_output contiguous in the forward's memory format: the input and
    # weight gradients follow the forward, not the incoming gradient.
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last) if x_cl else x
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    ours, stock = (CF.conv2d, F.conv2d) if op == "conv2d" else (CF.conv_transpose2d, F.conv_transpose2d)
    got, want = [], []
    for fn, out in ((ours, got), (stock, want)):
        xx, ww = x.clone(memory_format=torch.preserve_format).requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww, padding=1)
        g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(0))
        g = g.contiguous(memory_format=torch.channels_last) if g_cl else g
        gx, gw = torch.autograd.grad(y, (xx, ww), g)
        out += [gx, gw]
    assert _is_cl(got[0]) == _is_cl(want[0]) == x_cl
    assert got[0].is_contiguous() == want[0].is_contiguous()
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_item12_transposed_conv_input_gradient_is_dense():
    # output_padding >= stride (grouped, dilated): the input gradient is cut from a larger
    # one; it must come back dense, as torch's, not as a strided view.
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    y = CF.conv_transpose2d(x, w, stride=2, output_padding=3, groups=2, dilation=4)
    gx, = torch.autograd.grad(y, x, torch.randn_like(y))
    ys = F.conv_transpose2d(x, w, stride=2, output_padding=3, groups=2, dilation=4)
    gs, = torch.autograd.grad(ys, x, torch.ones_like(ys))
    assert gx.is_contiguous() and gs.is_contiguous()


def test_item12_unpool_gradient_is_contiguous():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y, idx = F.max_pool2d(x, 2, return_indices=True)
    y.requires_grad_()
    u = CF.max_unpool2d(y, idx, 2)
    g = torch.randn(u.shape, dtype=u.dtype).contiguous(memory_format=torch.channels_last)
    gy, = torch.autograd.grad(u, y, g)
    ys = y.detach().requires_grad_()
    want, = torch.autograd.grad(F.max_unpool2d(ys, idx, 2), ys, g)
    assert gy.is_contiguous() and want.is_contiguous()
    torch.testing.assert_close(gy, want)
