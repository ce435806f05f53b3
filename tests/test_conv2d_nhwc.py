"""The float32 channels_last conv2d forward on the GEMM without unfolding
(csrc/cpu/conv2d_nhwc.cpp: one GEMM per tap over a zero-padded copy of the input rows a
block of output positions reads): against float64 and stock, every block form (bands of
rows, several whole samples), paddings, strides, dilations, odd channel counts, bias and
the fused ReLU / batch-statistics epilogues, thread counts, and where it must not run."""
import pytest
import torch
import torch.nn.functional as F

import cnnext
import cnnext.backends.cpu
from cnnext._paths import counts, expect_path, runnable
from cnnext.functional import conv2d, conv_bn_relu2d
from conftest import assert_close_scaled

pytestmark = pytest.mark.skipif(not runnable("sgemm.gemm"), reason="the float32 GEMM runs on AVX-512 CPUs only")



@pytest.fixture(autouse=True)
def _gemm_only():
    """Winograd off: it takes the 3x3 stride-1 cases in channels_last too
    (tests/test_conv2d_winograd.py covers that); this file tests the GEMM."""
    with cnnext.backends.cpu.flags(winograd=False):
        yield


NHWC = "conv2d.fwd.sgemm_nhwc"
SAMPLES = "conv2d.fwd.sgemm_nhwc.sample_blocks"

# name: (N, C, H, W, O, kernel, stride, padding, dilation), the block form (bands of
# "rows" of one sample, or blocks of whole "samples"), the GEMM form ("unfolded" block,
# a GEMM per "kernel_rows", per "taps")
CASES = {
    "resnet_band": ((2, 64, 20, 20, 64, 3, 1, 1, 1), "rows", "kernel_rows"),
    "odd_channels": ((3, 13, 9, 11, 37, 3, 1, 1, 1), "samples", "unfolded"),
    "strided_padded": ((2, 24, 17, 15, 40, (3, 5), 2, (1, 2), 1), "samples", "kernel_rows"),
    "dilated": ((2, 8, 19, 21, 12, 3, 1, 2, (2, 3)), "rows", "unfolded"),
    "dilated_taps": ((2, 48, 15, 16, 20, 3, 1, 2, (1, 2)), "rows", "taps"),
    "dilated_rows": ((2, 40, 15, 16, 20, 3, 1, 2, (2, 1)), "rows", "kernel_rows"),
    "small_maps": ((5, 96, 3, 3, 70, 3, 1, 1, 1), "samples", "kernel_rows"),
    "pointwise_strided": ((4, 24, 14, 14, 40, 1, 2, 0, 1), "samples", "kernel_rows"),
    # (5 channels: RGB stems of 1 to 4 channels take conv2d_tinyc.cpp, tests/test_conv2d_tiny_c.py)
    "stem_like": ((3, 5, 30, 30, 16, 7, 2, 3, 1), "rows", "unfolded"),
    "one_sample": ((1, 32, 7, 7, 48, 3, 1, 1, 1), "rows", "kernel_rows"),
    "wide_rows": ((2, 16, 6, 300, 24, 3, 1, 1, 1), "rows", "unfolded"),
    "padding_beyond_kernel": ((2, 8, 5, 5, 8, 3, 1, 3, 1), "samples", "unfolded"),
    "deep_taps": ((2, 160, 5, 5, 40, 3, 1, 1, 2), "samples", "taps"),
    # No padding: the GEMMs read x in place.
    "unpadded_rows": ((2, 32, 20, 18, 24, 3, 1, 0, 1), "rows", "kernel_rows"),
    "unpadded_unfolded_dilated": ((3, 4, 12, 13, 8, 3, 2, 0, (1, 2)), "samples", "unfolded"),
    "unpadded_taps": ((2, 64, 9, 9, 16, (2, 3), 1, 0, 2), "samples", "taps"),
}


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def make(case, bias=True, seed=0):
    (n, c, h, w, o, k, s, p, d), _, _ = CASES[case]
    kh, kw = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(o, c, kh, kw, generator=g, dtype=torch.float64)
    b = torch.randn(o, generator=g, dtype=torch.float64) if bias else None
    return x, wt, b, dict(stride=s, padding=p, dilation=d)


def paths_of(case):
    """The paths a case takes: its block and GEMM forms, and reading x in place where
    nothing is padded."""
    shape, blocks, form = CASES[case]
    unpadded = shape[7] in (0, (0, 0))
    return [NHWC, f"{NHWC}.{form}"] + ([SAMPLES] if blocks == "samples" else []) + ([f"{NHWC}.in_place"] if unpadded else [])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_float64_and_stock(case, bias):
    x, wt, b, kw = make(case, bias)
    f = lambda t: None if t is None else t.float()  # noqa: E731
    before = counts()
    with expect_path(*paths_of(case)):
        y = conv2d(cl(x.float()), wt.float(), f(b), **kw)
    after = counts()
    for other in {SAMPLES, f"{NHWC}.in_place"} - set(paths_of(case)):
        assert after[other] == before[other], f"{other} ran, not expected for {case}"
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref64 = F.conv2d(x, wt, b, **kw)
    stock = F.conv2d(cl(x.float()), wt.float(), f(b), **kw)
    assert_close_scaled(y, ref64.float(), 2e-6, "against float64")
    assert_close_scaled(y, stock, 1e-5, "against stock float32")


@pytest.mark.parametrize("case", ["resnet_band", "small_maps", "strided_padded"])
def test_bitwise_same_on_any_thread_count(case):
    x, wt, b, kw = make(case)
    xs, wf, bf = cl(x.float()), wt.float(), b.float()
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with expect_path(NHWC):
                outs.append(conv2d(xs, wf, bf, **kw))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_weight_of_any_layout():
    x, wt, b, kw = make("odd_channels")
    ref = F.conv2d(x, wt, b, **kw)
    for w_in in (cl(wt.float()), wt.float().transpose(2, 3).contiguous().transpose(2, 3)):
        with expect_path(NHWC):
            y = conv2d(cl(x.float()), w_in, b.float(), **kw)
        assert_close_scaled(y, ref.float(), 2e-6)


def test_nan_and_inf_propagate_as_stock():
    x, wt, b, kw = make("resnet_band")
    x = x.float()
    x[0, 3, 4, 5] = float("nan")
    x[1, 7, 0, 0] = float("inf")
    with expect_path(NHWC):
        y = conv2d(cl(x), wt.float(), b.float(), **kw)
    ref = F.conv2d(cl(x), wt.float(), b.float(), **kw)
    assert torch.equal(y.isnan(), ref.isnan())
    assert torch.equal(y.isinf(), ref.isinf())
    finite = ref.isfinite()
    assert_close_scaled(y[finite], ref[finite], 1e-5)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("case", ["resnet_band", "small_maps"])
def test_fused_eval_epilogue(case, relu):
    """conv_bn_relu2d inference folds into a conv with bias and ReLU on this path."""
    x, wt, b, kw = make(case)
    o = wt.shape[0]
    g = torch.Generator().manual_seed(3)
    gamma, beta = torch.rand(o, generator=g) + 0.5, torch.randn(o, generator=g)
    mean, var = torch.randn(o, generator=g), torch.rand(o, generator=g) + 0.5
    xf = cl(x.float())
    with expect_path(NHWC):
        ours = conv_bn_relu2d(xf, wt.float(), b.float(), gamma, beta, mean, var, False, relu=relu, **kw)
    ref = F.batch_norm(F.conv2d(x, wt, b, **kw), mean.double(), var.double(), gamma.double(), beta.double(), False)
    if relu:
        ref = F.relu(ref)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert_close_scaled(ours, ref.float(), 1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["resnet_band", "small_maps"])
def test_fused_training_statistics(case, threads):
    """conv_bn_relu2d training gathers its batch statistics from the finished blocks
    (rows_done): bands of rows and blocks of whole samples."""
    x, wt, _, kw = make(case, bias=False)
    o = wt.shape[0]
    gamma, beta = torch.rand(o) + 0.5, torch.randn(o)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs = []
        for fused in (True, False):
            rm, rv = torch.zeros(o), torch.ones(o)
            xf = cl(x.float())
            if fused:
                with expect_path(*paths_of(case)):
                    y = conv_bn_relu2d(xf, wt.float(), None, gamma, beta, rm, rv, True, **kw)
            else:
                y = F.relu(F.batch_norm(F.conv2d(xf, wt.float(), None, **kw), rm, rv, gamma, beta, True))
            outs.append((y, rm, rv))
    finally:
        torch.set_num_threads(old)
    for a, e, name in zip(*outs, ["out", "running_mean", "running_var"]):
        assert_close_scaled(a, e, 1e-4, name)


def test_gradients_of_a_channels_last_forward():
    x, wt, b, kw = make("strided_padded")
    ins = [cl(x.float()).requires_grad_(True), wt.float().requires_grad_(True), b.float().requires_grad_(True)]
    with expect_path(NHWC):
        y = conv2d(*ins, **kw)
    gy = cl(torch.randn(y.shape))
    ours = torch.autograd.grad(y, ins, gy)
    ref_ins = [t.detach().clone().requires_grad_(True) for t in ins]
    ref = torch.autograd.grad(F.conv2d(*ref_ins, **kw), ref_ins, gy)
    for a, e in zip(ours, ref):
        assert_close_scaled(a, e, 1e-5)


@pytest.mark.parametrize("what", ["groups", "sliced_channels", "contiguous", "float64"])
def test_not_taken(what):
    """Grouped convolutions, inputs whose channels are not dense, NCHW output and float64
    take other paths (and still match stock)."""
    x, wt, b, kw = make("resnet_band")
    x, wt, b = x.float(), wt.float(), b.float()
    groups = 1
    if what == "groups":
        groups, wt = 2, wt[:, :32].contiguous()
        x = cl(x)
    elif what == "sliced_channels":
        x = cl(torch.cat([x, x], 1))[:, ::2]
    elif what == "float64":
        x, wt, b = cl(x.double()), wt.double(), b.double()
    before = counts().get(NHWC, 0)
    with cnnext.backends.cpu.flags(winograd=False):
        y = conv2d(x, wt, b, groups=groups, **kw)
    assert counts().get(NHWC, 0) == before
    assert_close_scaled(y, F.conv2d(x, wt, b, groups=groups, **kw), 1e-5 if what != "float64" else 1e-12)


def test_empty_batch_and_unbatched():
    x, wt, b, kw = make("odd_channels")
    x, wt, b = x.float(), wt.float(), b.float()
    y0 = conv2d(cl(x[:0]), wt, b, **kw)
    assert y0.shape == F.conv2d(x[:0], wt, b, **kw).shape
    with expect_path(NHWC):
        y1 = conv2d(cl(x[:1]), wt, b, **kw)
    assert_close_scaled(y1, F.conv2d(x[:1], wt, b, **kw), 1e-5)
