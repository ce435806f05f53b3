"""The at::mm convolution's im2col reads float rows at a stride of 2 (stride-2 layers over
unit-stride rows) with AVX2 vectors (csrc/cpu/conv2d.cpp gather_even_avx2: 8 outputs from
16 values, the last few element by element so that no value past a row's last tap is read),
and its col2im adds them back the same way (scatter_add_even_avx2: the 8 values spread
between -0.0s, which leave the odd positions' values, signed zeros included, unchanged).

These run where float32 takes the at::mm convolution (no AVX-512F) and the CPU has AVX2:
every row length around the vector width, every padding and kernel width, in the forward
and the weight gradient (both unfold the input) and the input gradient (col2im; also
conv_transpose2d's forward), against float64."""
import pytest
import torch
import torch.nn.functional as F

import cnnext
import cnnext.backends.cpu as cpu_backend
from cnnext._paths import counts, expect_path, runnable
from cnnext.functional import conv2d
from conftest import assert_close_scaled

PATH = "conv2d.im2col.stride2_avx2"
COL2IM = "conv2d.col2im.stride2_avx2"


@pytest.fixture(autouse=True)
def _float32_on_mm():
    if runnable("conv2d.fwd.sgemm"):
        pytest.skip("float32 takes the AVX-512 GEMM on this CPU, not at::mm")


def run(x, w, b, stride, padding, dilation=1):
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y = conv2d(x, w, b, stride, padding, dilation)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = (y, *torch.autograd.grad(y, (x, w, b), gy.float()))
    ref_y = F.conv2d(x64, w64, b64, stride, padding, dilation)
    ref = (ref_y, *torch.autograd.grad(ref_y, (x64, w64, b64), gy))
    for a, r, name in zip(got, ref, ("output", "grad_input", "grad_weight", "grad_bias")):
        assert a.dtype == torch.float32
        assert_close_scaled(a.double(), r, 1e-5, name)


def make(n, c, h, w, o, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c, h, w, generator=g).requires_grad_(True)
    wt = torch.randn(o, c, kh, kw, generator=g).requires_grad_(True)
    b = torch.randn(o, generator=g).requires_grad_(True)
    return x, wt, b


# Row lengths of 1-40 outputs: below one vector, exactly one, one and a tail, the last
# vector's 16th value at the row's end (taken element by element) and past it.
@pytest.mark.parametrize("width", [3, 15, 16, 17, 18, 19, 31, 33, 34, 35, 36, 49, 81])
@pytest.mark.parametrize("k, padding", [(3, 1), (3, 0), (1, 0), (2, 0), (5, 2), ((1, 4), (0, 3))])
def test_stride2_rows(width, k, padding, threads):
    x, w, b = make(3, 5, 7, width, 6, k, seed=width)
    with expect_path(PATH, COL2IM):
        run(x, w, b, 2, padding)


def test_the_input_ends_at_its_storage_end():
    # The last row's last tap is the input's last value: nothing past it is read (a
    # narrow of a larger buffer would hide an over-read; this is the whole storage).
    x, w, b = make(1, 3, 3, 17, 4, (1, 1))
    assert x.untyped_storage().nbytes() == x.numel() * 4
    with expect_path(PATH):
        run(x, w, b, 2, 0)


def test_resnet_downsample_shapes():
    # ResNet's 3x3 stride-2 and its 1x1 stride-2 shortcut, batch 2.
    x, w, b = make(2, 16, 28, 28, 32, 3, seed=1)
    with expect_path(PATH, COL2IM):
        run(x, w, b, 2, 1)
    x, w, b = make(2, 16, 28, 28, 32, 1, seed=2)
    with expect_path(PATH, COL2IM):
        run(x, w, b, 2, 0)


@pytest.mark.parametrize("what", ["stride3", "stride1_dilation2", "channels_last", "float64"])
def test_other_row_strides_keep_the_plain_loop(what):
    # Only a row stride of exactly 2 values takes the vectors: stride 3, a channels_last
    # input (rows at a stride of C values) and float64 keep the element loop.
    x, w, b = make(2, 4, 9, 23, 5, 3, seed=3)
    stride, dilation = 2, 1
    if what == "stride3":
        stride = 3
    elif what == "stride1_dilation2":
        stride, dilation = 1, 2
    elif what == "channels_last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    with cpu_backend.flags(winograd=False):
        before = counts()[PATH], counts()[COL2IM]
        if what == "float64":
            x, w, b = (t.detach().double().requires_grad_(True) for t in (x, w, b))
            y = conv2d(x, w, b, stride, 1, dilation)
            torch.testing.assert_close(y, F.conv2d(x, w, b, stride, 1, dilation), rtol=1e-12, atol=1e-12)
        else:
            run(x, w, b, stride, 1, dilation)
        assert (counts()[PATH], counts()[COL2IM]) == before


@pytest.mark.parametrize("k, padding, output_padding", [(4, 1, 0), (3, 1, 1), (1, 0, 1), (2, 0, 0)])
@pytest.mark.parametrize("width", [4, 9, 17, 28])
def test_conv_transpose2d_stride2(k, padding, output_padding, width):
    # conv_transpose2d's forward is the input gradient: col2im at a stride of 2. A 1x1 kernel
    # at stride 2 leaves every odd output position without a tap: its zero keeps the sign
    # stock gives it (+0.0; the -0.0 filler must not turn a value into another).
    g = torch.Generator().manual_seed(width)
    x = torch.randn(2, 12, 5, width, generator=g)
    w = torch.randn(12, 7, k, k, generator=g)
    b = torch.randn(7, generator=g)
    with expect_path(COL2IM):
        y = cnnext.functional.conv_transpose2d(x, w, b, 2, padding, output_padding)
        y0 = cnnext.functional.conv_transpose2d(x, w, None, 2, padding, output_padding)
    ref = F.conv_transpose2d(x.double(), w.double(), b.double(), 2, padding, output_padding)
    ref0 = F.conv_transpose2d(x.double(), w.double(), None, 2, padding, output_padding)
    assert_close_scaled(y.double(), ref, 1e-5, "output")
    assert_close_scaled(y0.double(), ref0, 1e-5, "output without bias")
    zeros = ref0 == 0
    if k == 1:
        assert zeros.any()
    assert torch.equal(torch.signbit(y0[zeros]), torch.signbit(ref0[zeros].float()))


def test_col2im_keeps_values_between_its_taps():
    # The odd positions between a row's stride-2 taps hold earlier taps' sums (kernel 4 at
    # stride 2: taps 0 and 2 land on even positions, 1 and 3 on odd ones): all of them
    # exact against float64, also a NaN and an Inf in the input, as stock propagates them.
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 9, 6, 20, generator=g)
    x[0, 3, 2, 7] = float("nan")
    x[0, 5, 4, 13] = float("inf")
    w = torch.randn(9, 4, 4, 4, generator=g)
    with expect_path(COL2IM):
        y = cnnext.functional.conv_transpose2d(x, w, None, 2, 1)
    ref = F.conv_transpose2d(x.double(), w.double(), None, 2, 1)
    assert torch.equal(y.isnan(), ref.isnan())
    assert torch.equal(y.isinf(), ref.isinf())
    assert torch.equal(y[y.isinf()], ref[ref.isinf()].float())
    finite = ref.isfinite()
    assert_close_scaled(y[finite].double(), ref[finite], 1e-5, "finite outputs")
