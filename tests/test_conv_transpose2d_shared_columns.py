"""conv_transpose2d's first-order backward on the CPU with one unfolding of grad_output for
both gradients (csrc/cpu/conv2d.cpp, conv2d_and_weight_backward; reached from the autograd
node in csrc/ops/autograd_conv2d.cpp). grad_input is conv2d(grad_output, weight) and
grad_weight conv2d_weight_backward(input, grad_output): both unfold grad_output alike, so the
shared path runs the same items, GEMMs and per-thread sums as the two ops and must give
**bitwise** their results. The two ops are called here through torch.ops, the reference.

It runs where both ops would take their at::mm paths: float64 on every CPU, float32 where the
AVX-512 GEMM does not run; a stride past 1; NCHW tensors; both gradients wanted; grad mode
off (a create_graph backward, forward-mode tangents, torch.func and dispatch modes see the
two ops)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cnnext
from cnnext._paths import counts, runnable
from cnnext.functional import conv_transpose2d

SHARED = "conv2d.fwd_and_weight_grad.shared_columns"
# float32 takes the shared path only without the AVX-512 GEMM (which has its own paths).
F32_SHARED = not runnable("sgemm.gemm")

# (N, C_in, H, W, C_out, (KH, KW), stride, padding, groups, dilation). Each a GEMM of 1M
# multiply-adds a sample or more over 64 positions or more: smaller ones are multiplied in
# blocks of samples (the two ops' own paths).
CASES = {
    "k4s2": (2, 32, 12, 12, 16, (4, 4), (2, 2), (1, 1), 1, (1, 1)),
    "k3s2": (2, 32, 14, 14, 24, (3, 3), (2, 2), (1, 1), 1, (1, 1)),
    "rect_stride": (2, 24, 16, 12, 16, (3, 5), (2, 3), (1, 2), 1, (1, 1)),
    "groups": (2, 64, 12, 12, 32, (4, 4), (2, 2), (1, 1), 2, (1, 1)),
    "dilation": (2, 32, 13, 12, 24, (3, 3), (2, 2), (2, 1), 1, (2, 1)),
    "no_padding": (2, 64, 12, 12, 32, (2, 2), (2, 2), (0, 0), 1, (1, 1)),
    # grad_output's unfolding in two row bands of a sample (K x positions past the column
    # budget): 64 x 4 x 4 taps by 40 x 40 positions.
    "bands": (1, 8, 40, 40, 64, (4, 4), (2, 2), (1, 1), 1, (1, 1)),
}


def make(case, dtype, seed=0):
    n, c, h, w, o, k, s, p, g, d = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    wt = torch.randn(c, o // g, *k, generator=gen, dtype=dtype)
    b = torch.randn(o, generator=gen, dtype=dtype)
    y = F.conv_transpose2d(x, wt, b, s, p, 0, g, d)
    gy = torch.randn(y.shape, generator=gen, dtype=dtype)
    return x, wt, b, gy, dict(stride=s, padding=p, groups=g, dilation=d)


def two_ops(x, wt, gy, conf):
    """grad_input and grad_weight by the two ops the shared path stands in for."""
    s, p, d, g = conf["stride"], conf["padding"], conf["dilation"], conf["groups"]
    gx = torch.ops.cnnext.conv2d(gy, wt, None, s, p, d, g)
    gw = torch.ops.cnnext.conv2d_weight_backward(x, gy, list(wt.shape), s, p, d, g)
    return gx, gw


def backward(x, wt, b, gy, conf, **kw):
    x, wt, b = (t.detach().requires_grad_() for t in (x, wt, b))
    y = conv_transpose2d(x, wt, b, conf["stride"], conf["padding"], 0, conf["groups"], conf["dilation"])
    before = counts()[SHARED]
    grads = torch.autograd.grad(y, (x, wt, b), gy, **kw)
    return grads, counts()[SHARED] - before


def dtypes():
    return [torch.float64] + ([torch.float32] if F32_SHARED else [])


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_shared_path_is_bitwise_the_two_ops(case, dtype):
    x, wt, b, gy, conf = make(case, dtype)
    (gx, gw, gb), ran = backward(x, wt, b, gy, conf)
    assert ran == 1, f"{SHARED} did not run"
    want_gx, want_gw = two_ops(x, wt, gy, conf)
    assert torch.equal(gx, want_gx)
    assert torch.equal(gw, want_gw)
    assert torch.equal(gb, torch.ops.cnnext.channel_sum(gy))
    # and both against stock in float64
    xs, ws, bs = (t.double().requires_grad_() for t in (x, wt, b))
    ys = F.conv_transpose2d(xs, ws, bs, conf["stride"], conf["padding"], 0, conf["groups"], conf["dilation"])
    ref = torch.autograd.grad(ys, (xs, ws), gy.double())
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for got, want in zip((gx, gw), ref):
        assert (got.double() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
def test_same_bits_at_every_thread_count(dtype):
    x, wt, b, gy, conf = make("bands", dtype)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            (gx, gw, _), ran = backward(x, wt, b, gy, conf)
            assert ran == 1
            want_gx, want_gw = two_ops(x, wt, gy, conf)
            assert torch.equal(gx, want_gx) and torch.equal(gw, want_gw)
            results.append(gx)
    finally:
        torch.set_num_threads(threads)
    # grad_input's columns are single GEMMs per item: the same at every thread count.
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_create_graph_takes_the_two_ops_and_double_backward_runs():
    x, wt, b, gy, conf = make("k4s2", torch.float64)
    (gx, gw, _), ran = backward(x, wt, b, gy, conf, create_graph=True)
    assert ran == 0
    want_gx, want_gw = two_ops(x, wt, gy, conf)
    assert torch.equal(gx.detach(), want_gx) and torch.equal(gw.detach(), want_gw)


@pytest.mark.parametrize("why", ["only_input", "only_weight", "output_padding", "stride_one", "channels_last",
                                 "unbatched", "nonfinite_weight", "sample_blocks"])
def test_left_to_the_two_ops(why):
    x, wt, b, gy, conf = make("k4s2", torch.float64)
    s, p, g, d = conf["stride"], conf["padding"], conf["groups"], conf["dilation"]
    op = 0
    if why == "output_padding":  # grad_output's adjoint has a row and column more than the input
        d, op = (3, 3), 2
    if why == "stride_one":
        s = (1, 1)
    if why == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if why == "unbatched":
        x = x[0]
    if why == "sample_blocks":  # 8 x 4 x 4 taps by 6 x 6 positions: a tiny GEMM a sample
        x, wt = x[:, :16, :6, :6], wt[:16, :8]
    if why == "nonfinite_weight":
        x, wt = x.float(), wt.float()
        wt[0, 0, 0, 0] = float("inf")
    x = x.detach().requires_grad_(why != "only_weight")
    wt = wt.detach().requires_grad_(why != "only_input")
    y = conv_transpose2d(x, wt, None, s, p, op, g, d)
    gy = torch.randn(y.shape, dtype=y.dtype)
    before = counts()[SHARED]
    got = torch.autograd.grad(y, [t for t in (x, wt) if t.requires_grad], gy)
    assert counts()[SHARED] == before, f"{SHARED} ran for {why}"
    # The two ops' results (and stock's NaN / Inf pattern for the non-finite weight).
    xs, ws = (t.detach().clone().requires_grad_(t.requires_grad) for t in (x, wt))
    ys = F.conv_transpose2d(xs, ws, None, s, p, op, g, d)
    ref = torch.autograd.grad(ys, [t for t in (xs, ws) if t.requires_grad], gy)
    for a, e in zip(got, ref):
        assert torch.equal(torch.isfinite(a), torch.isfinite(e))
        fin = torch.isfinite(e)
        torch.testing.assert_close(a[fin], e[fin], rtol=1e-5, atol=1e-5 * float(e[fin].abs().max()))


def test_a_dispatch_mode_sees_the_two_ops():
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, wt, b, gy, conf = make("k4s2", torch.float64)
    x, wt = x.requires_grad_(), wt.requires_grad_()
    y = conv_transpose2d(x, wt, None, conf["stride"], conf["padding"])
    before = counts()[SHARED]
    with Log():
        gx, gw = torch.autograd.grad(y, (x, wt), gy)
    assert counts()[SHARED] == before
    assert "cnnext.conv2d.default" in seen and "cnnext.conv2d_weight_backward.default" in seen
    want_gx, want_gw = two_ops(x.detach(), wt.detach(), gy, conf)
    assert torch.equal(gx, want_gx) and torch.equal(gw, want_gw)


def test_torch_func_grad_sees_the_two_ops():
    x, wt, b, gy, conf = make("k4s2", torch.float64)

    def loss(x, wt):
        return (conv_transpose2d(x, wt, None, conf["stride"], conf["padding"]) * gy).sum()

    before = counts()[SHARED]
    gx, gw = torch.func.grad(loss, argnums=(0, 1))(x, wt)
    assert counts()[SHARED] == before
    want_gx, want_gw = two_ops(x, wt, gy, conf)
    torch.testing.assert_close(gx, want_gx, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw, want_gw, rtol=0, atol=1e-12)


def test_module_training_step_takes_the_shared_path():
    torch.manual_seed(0)
    m = cnnext.nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1).double()
    x = torch.randn(2, 32, 12, 12, dtype=torch.float64, requires_grad=True)
    before = counts()[SHARED]
    m(x).square().sum().backward()
    assert counts()[SHARED] == before + 1
    ref = torch.nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1).double()
    ref.load_state_dict(m.state_dict())
    xr = x.detach().requires_grad_()
    ref(xr).square().sum().backward()
    for a, e in ((x.grad, xr.grad), (m.weight.grad, ref.weight.grad), (m.bias.grad, ref.bias.grad)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
