"""Non-finite values next to a convolution's zero padding, as stock propagates them.

Stock's float32 convolution on oneDNN sums only the taps inside the input: an Inf weight
leaves the outputs whose window meets it only over the padding finite, and an Inf of
grad_output next to the padding stays Inf in the weight gradient. Stock's other CPU
backends (its choice, `torch._C._select_conv_backend`, by batch, kernel and map sizes) and
its float64 path multiply the padding's zeros too (Inf x 0 = NaN), as every path of
cnnext's does. So cnnext recomputes, by the direct loops, exactly the results that can
differ: a forward whose weight is not finite (paths conv2d.fwd.nonfinite_direct) and a
non-finite weight gradient (conv2d.weight_grad.nonfinite_direct), where stock would take
oneDNN; and matches stock's NaN / Inf pattern in every case here."""
import pytest
import torch
import torch.nn.functional as F

import cnnext.backends.cpu as cpu_backend
from cnnext._paths import counts
from cnnext.functional import conv2d

REDO = "conv2d.weight_grad.nonfinite_direct"
FWD_REDO = "conv2d.fwd.nonfinite_direct"


def onednn(x, w, p, stride=1):
    """Whether stock runs this convolution on oneDNN (which skips the padding's taps)."""
    pp = (p, p) if isinstance(p, int) else p
    return torch._C._select_conv_backend(x, w, None, [stride, stride], list(pp), [1, 1], False, [0, 0], 1,
                                         None) == torch._C._ConvBackend.Mkldnn

# (x shape, weight shape, padding, dtype, Winograd on): the paths that take them differ by
# CPU (at::mm and unfolding, Winograd 3x3, the AVX2 few-channel gradients, the AVX-512 GEMM).
CASES = {
    "winograd_3x3": ((2, 16, 12, 12), (16, 16, 3, 3), 1, torch.float32, True),
    "gemm_3x3": ((2, 16, 12, 12), (16, 16, 3, 3), 1, torch.float32, False),
    "float64_5x5": ((2, 3, 11, 9), (17, 3, 5, 5), 2, torch.float64, True),
    "few_channels_5x5": ((3, 6, 14, 14), (16, 6, 5, 5), 2, torch.float32, True),
    "wide_5x5": ((2, 3, 12, 12), (17, 3, 5, 5), (2, 1), torch.float32, True),
}


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("case", list(CASES))
def test_inf_next_to_padding_as_stock(case, layout):
    xs, ws, p, dtype, wino = CASES[case]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(xs, generator=gen, dtype=dtype).contiguous(memory_format=layout)
    w = torch.randn(ws, generator=gen, dtype=dtype)
    gy = torch.randn(F.conv2d(x, w, None, 1, p).shape, generator=gen, dtype=dtype)
    gy[0, 1, 0, 0] = float("inf")  # a corner: most taps meet the padding there
    gy[1, 2, -1, 3] = float("-inf")
    gy = gy.contiguous(memory_format=layout)

    def gw_of(fn):
        wr = w.clone().requires_grad_()
        return torch.autograd.grad(fn(x, wr, None, 1, p), wr, gy)[0]

    before = counts()[REDO]
    with cpu_backend.flags(winograd=wino):
        gw = gw_of(conv2d)
    assert (counts()[REDO] > before) == (dtype == torch.float32 and onednn(x, w, p))
    want = gw_of(F.conv2d)
    assert torch.equal(gw.isnan(), want.isnan())
    assert torch.equal(gw.isinf(), want.isinf()) and torch.equal(gw[gw.isinf()], want[want.isinf()])
    fin = want.isfinite()
    assert fin.any()
    torch.testing.assert_close(gw[fin], want[fin], rtol=1e-5, atol=1e-5 * want[fin].abs().max().item())


def test_finite_gradients_skip_the_recomputation():
    x, w = torch.randn(2, 16, 12, 12), torch.randn(16, 16, 3, 3, requires_grad=True)
    before = counts()[REDO]
    gw, = torch.autograd.grad(conv2d(x, w, None, 1, 1).sum(), w)
    assert counts()[REDO] == before and gw.isfinite().all()


def test_unpadded_convolution_keeps_its_path():
    # Without padding every path sums stock's terms: a NaN there is stock's too.
    x, w = torch.randn(2, 3, 9, 9), torch.randn(8, 3, 3, 3, requires_grad=True)
    gy = torch.randn(2, 8, 7, 7)
    gy[0, 0, 0, 0] = float("nan")
    before = counts()[REDO]
    gw, = torch.autograd.grad(conv2d(x, w), w, gy)
    assert counts()[REDO] == before
    ws = w.detach().clone().requires_grad_()
    want, = torch.autograd.grad(F.conv2d(x, ws), ws, gy)
    assert torch.equal(gw.isnan(), want.isnan())


# (x shape, weight shape, padding, dtype): oneDNN's shapes and stock's Slow2d ones (a batch of
# one with a 3x3 kernel on a small map, a 1x1 map), float64, a few-channel 5x5 layer.
FWD_CASES = {
    "batch_2": ((2, 3, 6, 6), (4, 3, 3, 3), 1, torch.float32),
    "winograd_shape": ((2, 16, 12, 12), (16, 16, 3, 3), 1, torch.float32),
    "stem_7x7": ((2, 3, 20, 20), (16, 3, 7, 7), 3, torch.float32),
    "few_channels_5x5": ((3, 6, 14, 14), (16, 6, 5, 5), 2, torch.float32),
    "slow2d_batch_1": ((1, 3, 6, 6), (4, 3, 3, 3), 1, torch.float32),
    "slow2d_one_pixel": ((1, 8, 1, 1), (8, 8, 3, 3), 1, torch.float32),
    "one_pixel_batch_4": ((4, 8, 1, 1), (8, 8, 3, 3), 1, torch.float32),
    "float64": ((2, 16, 12, 12), (16, 16, 3, 3), 1, torch.float64),
}


def assert_same_pattern(a, ref):
    assert torch.equal(a.isnan(), ref.isnan())
    assert torch.equal(a.isinf(), ref.isinf()) and torch.equal(a[a.isinf()], ref[ref.isinf()])
    fin = ref.isfinite()
    if fin.any():
        torch.testing.assert_close(a[fin], ref[fin], rtol=1e-5, atol=1e-5 * ref[fin].abs().max().item())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("case", list(FWD_CASES))
def test_nonfinite_weight_forward_as_stock(case, layout):
    xs, ws, p, dtype = FWD_CASES[case]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(xs, generator=gen, dtype=dtype).contiguous(memory_format=layout)
    w = torch.randn(ws, generator=gen, dtype=dtype)
    b = torch.randn(ws[0], generator=gen, dtype=dtype)
    w[1, 0, 0, 0] = float("inf")  # meets only the padding at the top-left outputs
    w[2, -1, -1, -1] = float("-inf")
    before = counts()[FWD_REDO]
    out = conv2d(x, w, b, 1, p)
    assert (counts()[FWD_REDO] > before) == (dtype == torch.float32 and onednn(x, w, p))
    assert_same_pattern(out, F.conv2d(x, w, b, 1, p))


@pytest.mark.parametrize("case", ["batch_2", "stem_7x7", "slow2d_batch_1"])
def test_nonfinite_weight_fused_eval_as_stock(case):
    """The fused op in evaluation (batch norm folded into the weight, then ReLU): the folded
    weight is scanned (ReLU can turn the probe's -Inf into 0); stock's conv -> bn -> relu."""
    xs, ws, p, dtype = FWD_CASES[case]
    gen = torch.Generator().manual_seed(6)
    x, w = torch.randn(xs, generator=gen), torch.randn(ws, generator=gen)
    w[1, 0, 0, 0] = float("-inf")
    o = ws[0]
    mean, var = torch.randn(o, generator=gen), torch.rand(o, generator=gen) + 0.5
    gamma, beta = torch.randn(o, generator=gen), torch.randn(o, generator=gen)
    out = torch.ops.cnnext.conv_bn_relu2d_eval(x, w, None, gamma, beta, mean, var, 1e-5, [1, 1], [p, p], [1, 1], 1,
                                               True)
    ref = F.relu(F.batch_norm(F.conv2d(x, w, None, 1, p), mean, var, gamma, beta, False, 0.0, 1e-5))
    # The fold moves Inf x scale into the weight: the same NaN (and Inf) outputs as stock's.
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert out.isnan().any() != onednn(x, w, p)  # NaN only where stock multiplies the padding


def test_finite_forward_keeps_its_path():
    x, w = torch.randn(2, 16, 12, 12), torch.randn(16, 16, 3, 3)
    x[0, 0, 5, 5] = float("nan")  # a non-finite input: the probe sees it, the weight is finite
    before = counts()[FWD_REDO]
    out = conv2d(x, w, None, 1, 1)
    assert counts()[FWD_REDO] == before
    assert torch.equal(out.isnan(), F.conv2d(x, w, None, 1, 1).isnan())
