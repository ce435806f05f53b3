"""The weight gradient of a padded convolution with a non-finite grad_output next to the
padding. Stock's float32 (oneDNN) sums only the terms inside the input, so an Inf there
stays Inf (or leaves a tap that only ever meets the padding finite); the unfolding, Winograd
and GEMM paths multiply the padding's zeros by it too (Inf x 0 = NaN), so
conv2d_weight_backward recomputes such a non-finite float32 result by the direct loops (path
conv2d.weight_grad.nonfinite_direct). Stock's float64 unfolds as ours does, NaN included:
float64 keeps its path and matches it."""
import pytest
import torch
import torch.nn.functional as F

import cnnext.backends.cpu as cpu_backend
from cnnext._paths import counts
from cnnext.functional import conv2d

REDO = "conv2d.weight_grad.nonfinite_direct"

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
    assert (counts()[REDO] > before) == (dtype == torch.float32)
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
