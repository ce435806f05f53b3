"""The float32 GEMM paths of the CPU conv2d (csrc/cpu/conv2d_sgemm.cpp), each selected by
shape, against torch.nn.functional.conv2d: forward, grad_input, grad_weight, grad_bias.

Output positions are batched over samples (one GEMM spans several small maps); each GEMM
puts positions on its N side (channels on M) or, when that wastes less padding, transposed;
the work is split over output-channel blocks (forward), input-channel x sample blocks (input
gradient) and tap blocks (weight gradient) depending on the thread count, so the float32
cases run on 1, 2 and 3 threads. float64 takes the at::mm paths (or the direct loops for
thin groups) on the same shapes. Each case names the kernel paths it targets (PATHS), and
the tests assert through the extension's path counters (cnnext._paths) that they ran.
"""
import pytest
import torch
import torch.nn.functional as F

import cnnext
import cnnext.backends.cpu
from cnnext._paths import counts, expect_path
from cnnext.functional import conv2d, conv_bn_relu2d
from conftest import assert_close_scaled, to_layout


@pytest.fixture(autouse=True)
def _gemm_paths():
    """These cases target the GEMM paths: Winograd (tests/test_conv2d_winograd.py) off."""
    with cnnext.backends.cpu.flags(winograd=False):
        yield

# name: (N, C, H, W, O, kernel, stride, padding, dilation, groups)
CASES = {
    # 11-row chunks of a 40x40 map: chunks inside one sample (written straight into y) and
    # chunks across two samples; weight gradient over several chunks.
    "rows_chunks": (2, 64, 40, 40, 16, 3, 1, 1, 1, 1),
    # 5 samples of 7x7 in one GEMM (positions on N), 40 output channels (a partial panel of 8).
    "across_samples": (5, 32, 7, 7, 40, 3, 1, 1, 1, 1),
    # 45 positions, 96 channels: positions on M (transposed), output-channel blocks of 32/64.
    "transposed": (5, 64, 3, 3, 96, 3, 1, 1, 1, 1),
    # 6 positions, odd channel counts and a 2x2 kernel: transposed with partial tiles everywhere.
    "transposed_odd": (3, 40, 2, 3, 70, 2, 1, 0, 1, 1),
    "stride2_small": (4, 32, 6, 6, 48, 3, 2, 1, 1, 1),
    "pointwise_stride2": (4, 24, 6, 6, 40, 1, 2, 0, 1, 1),
    "dilated_padded": (3, 12, 11, 9, 20, (3, 2), (2, 1), (2, 1), (2, 3), 1),
    "groups": (3, 24, 9, 9, 36, 3, 1, 1, 1, 3),
    "groups_transposed": (4, 64, 3, 3, 64, 3, 1, 1, 1, 2),
    # Every position in one column buffer and more than 32 output channels: the small-map
    # forward (the weight read in place), with groups and partial tiles; its input gradient
    # runs the same way on the flipped weight. With fewer than 64 taps, one item per panel of
    # 32 channels packs its own weight rows instead (forward_panels).
    "panels_groups": (4, 48, 3, 3, 140, 3, 1, 1, 1, 2),
    "panels_deep": (2, 256, 3, 3, 96, 3, 1, 1, 1, 1),
    "panels_few_taps": (4, 6, 3, 3, 80, 3, 1, 1, 1, 1),
    # LeNet's first layer (1 -> 6 channels): enough taps for the GEMM in every direction
    # (input gradient split over samples) although its groups are thin.
    "lenet_conv1": (6, 1, 12, 12, 6, 5, 1, 2, 1, 1),
    "lenet_conv2": (5, 6, 14, 14, 16, 5, 1, 0, 1, 1),
    "one_sample_3x3": (1, 128, 3, 3, 72, 3, 1, 1, 1, 1),
    # Stride 1 with >= 16 output columns (forward; >= 12 for the weight gradient): the GEMM
    # reads a zero-padded copy of the input in place (no im2col); the input gradient of
    # these runs as such a forward as well.
    "implicit_dilated": (2, 8, 16, 17, 12, (3, 3), 1, (1, 2), (2, 1), 1),
    "implicit_groups": (3, 16, 18, 18, 24, 3, 1, 1, 1, 2),
    "implicit_1x1": (2, 24, 17, 17, 40, 1, 1, 0, 1, 1),
    "implicit_w_only": (3, 16, 12, 13, 24, 3, 1, 1, 1, 1),
    # 1 x 1 unpadded on a small map: implicit too (no extra columns).
    "implicit_pointwise_small": (3, 40, 7, 9, 48, 1, 1, 0, 1, 1),
    # Few input channels on rows of <= 16 (stride 1): the input gradient by rows in the lanes
    # (conv2d.input_grad.sgemm_rows): an odd number of rows (the last tile's second row
    # dropped), a 5x3 kernel with uneven padding, 14 output channels (the weight gradient's
    # channel lanes, a tail block of 3 taps).
    "rows_odd": (3, 5, 13, 11, 14, (5, 3), 1, (2, 1), 1, 1),
    # 16 columns (every lane), two groups of 8 input and 16 output channels, unpadded.
    "rows_groups_full": (2, 16, 16, 16, 32, 3, 1, 0, 1, 2),
    # The weight gradient's channel lanes at a stride of 2 down and with dilation.
    "lanes_stride_h": (2, 6, 15, 13, 16, 3, (2, 1), 1, 1, 1),
    "lanes_dilated": (2, 4, 12, 12, 13, 3, 1, 2, 2, 1),
    # The implicit weight gradient with >= 2 panels of output channels a thread: items over
    # blocks of output channels (a partial last panel), gy packed by 16 x 16 transposes.
    "implicit_w_columns": (2, 16, 14, 14, 136, 1, 1, 0, 1, 1),
    "implicit_w_columns_phases": (2, 16, 26, 26, 130, 3, 2, 1, 1, 1),
}

# The float32 paths each case targets, on contiguous tensors and any thread count: the
# forward GEMM's form (csrc/cpu/conv2d_sgemm.cpp forward_impl), the input gradient's and
# the weight gradient's (None: it depends on the thread count).
PATHS = {
    "rows_chunks": ("implicit", "sgemm_as_forward", "sgemm_implicit"),
    "across_samples": ("gather", "sgemm_as_forward", "sgemm_gather"),
    # <= 144 positions over the batch, >= 64 taps: the small-map forward (weight in place).
    "transposed": ("small_n", "sgemm_col2im_transposed", "sgemm_gather"),
    "transposed_odd": ("small_n", "sgemm_col2im_transposed", "sgemm_gather"),
    "stride2_small": ("small_n", "sgemm_col2im_transposed", "sgemm_gather"),
    # Gathered in either orientation: the chunks (and so the orientation) are chosen per
    # thread count (conv2d_sgemm.cpp gather_rows); test_pointwise_stride2_forms asserts both.
    "pointwise_stride2": (None, None, "sgemm_gather"),
    "dilated_padded": ("small_n", "sgemm_col2im", "sgemm_gather"),
    # 12 output channels per group on a 9-column map: channels in the lanes of a vector.
    "groups": ("channel_lanes", "sgemm_rows", "sgemm_lanes"),
    "groups_transposed": ("small_n", "sgemm_as_forward", "sgemm_gather"),
    "panels_groups": ("small_n", "sgemm_col2im_transposed", "sgemm_gather"),
    "panels_deep": ("small_n", "sgemm_as_forward", "sgemm_gather"),
    "panels_few_taps": ("panels", "sgemm_col2im_transposed", "sgemm_gather"),
    "lenet_conv1": ("gather", "sgemm_rows", "sgemm_implicit"),
    "lenet_conv2": ("channel_lanes", "sgemm_rows", "sgemm_lanes"),
    "one_sample_3x3": ("small_n", "sgemm_as_forward", "sgemm_gather"),
    "implicit_dilated": ("implicit", "sgemm_col2im", "sgemm_implicit"),
    "implicit_groups": ("implicit", "sgemm_col2im", "sgemm_implicit"),
    "implicit_1x1": ("implicit", "sgemm_col2im", "sgemm_implicit"),
    "implicit_w_only": ("gather", "sgemm_col2im", "sgemm_implicit"),
    "implicit_pointwise_small": ("implicit", "sgemm_as_forward", "sgemm_gather"),
    "rows_odd": ("channel_lanes", "sgemm_rows", "sgemm_lanes"),
    "rows_groups_full": ("channel_lanes", "sgemm_rows", "sgemm_lanes"),
    "lanes_stride_h": ("channel_lanes", None, "sgemm_lanes"),
    "lanes_dilated": ("channel_lanes", None, "sgemm_lanes"),
    "implicit_w_columns": (None, None, "sgemm_implicit"),
    "implicit_w_columns_phases": (None, None, "sgemm_implicit_phases"),
}


def float32_paths(case):
    fwd, grad_in, grad_w = PATHS[case]
    names = ["conv2d.fwd.sgemm", "conv2d.input_grad.sgemm",
             "conv2d.weight_grad.sgemm", f"conv2d.weight_grad.{grad_w}"]
    return (names + ([f"conv2d.sgemm.{fwd}"] if fwd else [])
            + ([f"conv2d.input_grad.{grad_in}"] if grad_in else []))


def float64_paths(case):
    """Per stage (forward, input gradient, weight gradient), the paths float64 may take: the
    direct loops where in_channels x out_channels per group <= 8, except a plain convolution
    with >= 4 output channels and >= 9 taps x channels (LeNet's first layer); else at::mm,
    one GEMM a sample or samples in blocks, and for a channels_last forward rows of taps
    (which of them: tests/test_conv2d_mm_blocks.py)."""
    n, c, h, w, o, k, s, p, d, g = CASES[case]
    kh, kw = (k, k) if isinstance(k, int) else k
    direct = (c // g) * (o // g) <= 8 and not (g == 1 and o >= 4 and (c // g) * kh * kw >= 9)
    if direct:
        return [(f"conv2d.{stage}.direct",) for stage in ("fwd", "input_grad", "weight_grad")]
    return [("conv2d.fwd.mm", "conv2d.fwd.mm_sample_blocks", "conv2d.fwd.mm_rows_channels_last")] + [
        (f"conv2d.{stage}.mm", f"conv2d.{stage}.mm_sample_blocks") for stage in ("input_grad", "weight_grad")]


def run(case, dtype, layout, bias=True):
    n, c, h, w, o, k, s, p, d, g = CASES[case]
    kh, kw = (k, k) if isinstance(k, int) else k
    x0 = torch.randn(n, c, h, w, dtype=torch.float64)
    w0 = torch.randn(o, c // g, kh, kw, dtype=torch.float64)
    b0 = torch.randn(o, dtype=torch.float64) if bias else None
    kw_args = dict(stride=s, padding=p, dilation=d, groups=g)
    results = []
    for fn in (conv2d, F.conv2d):
        x = to_layout(x0.to(dtype), layout).requires_grad_(True)
        wt = w0.to(dtype).requires_grad_(True)
        b = b0.to(dtype).requires_grad_(True) if bias else None
        y = fn(x, wt, b, **kw_args)
        gy = to_layout(torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype), layout)
        grads = torch.autograd.grad(y, (x, wt) + ((b,) if bias else ()), gy)
        results.append((y.detach(),) + grads)
    return results


def compare(ours, ref, dtype):
    for name, a, e in zip(["output", "grad_input", "grad_weight", "grad_bias"], ours, ref):
        if dtype == torch.float32:
            assert_close_scaled(a, e, 1e-5, name)
        else:
            torch.testing.assert_close(a, e, msg=name)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_float32_threads(case, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with expect_path(*float32_paths(case)):
            ours, ref = run(case, torch.float32, "contiguous")
    finally:
        torch.set_num_threads(old)
    compare(ours, ref, torch.float32)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted", "offset"])
@pytest.mark.parametrize("case", list(CASES))
def test_float32_layouts(case, layout):
    ours, ref = run(case, torch.float32, layout)
    compare(ours, ref, torch.float32)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", list(CASES))
def test_float64(case, layout):
    before = counts()
    ours, ref = run(case, torch.float64, layout)
    after = counts()
    for stage in float64_paths(case):
        assert any(after[n] > before[n] for n in stage), (stage, sorted(k for k in after if after[k] != before[k]))
    compare(ours, ref, torch.float64)


@pytest.mark.parametrize("case", ["transposed", "across_samples", "lenet_conv1"])
def test_no_bias(case):
    with expect_path(*float32_paths(case)):
        ours, ref = run(case, torch.float32, "contiguous", bias=False)
    compare(ours, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1])
def test_small_batches(n, dtype):
    x = torch.randn(n, 64, 3, 3, dtype=dtype, requires_grad=True)
    w = torch.randn(96, 64, 3, 3, dtype=dtype, requires_grad=True)
    outs = []
    for fn in (conv2d, F.conv2d):
        y = fn(x, w, None, padding=1)
        outs.append((y.detach(),) + torch.autograd.grad(y, (x, w), torch.ones_like(y)))
    for a, e in zip(*outs):
        assert_close_scaled(a, e, 1e-5 if dtype == torch.float32 else 1e-12)


def test_unbatched_transposed():
    x = torch.randn(64, 3, 3, requires_grad=True)
    w = torch.randn(96, 64, 3, 3, requires_grad=True)
    outs = []
    for fn in (conv2d, F.conv2d):
        y = fn(x, w, None, padding=1)
        outs.append((y.detach(),) + torch.autograd.grad(y, (x, w), torch.ones_like(y)))
    for a, e in zip(*outs):
        assert_close_scaled(a, e, 1e-5)


@pytest.mark.parametrize("relu", [False, True])
def test_relu_epilogue_transposed(relu):
    """conv_bn_relu2d inference folds into one conv with bias and ReLU: the transposed form
    applies them while transposing, the other in the GEMM's store."""
    for case in ("transposed", "across_samples"):
        n, c, h, w, o, k = CASES[case][:6]
        x = torch.randn(n, c, h, w)
        wt, b = torch.randn(o, c, k, k), torch.randn(o)
        gamma, beta = torch.rand(o) + 0.5, torch.randn(o)
        mean, var = torch.randn(o), torch.rand(o) + 0.5
        with expect_path(f"conv2d.sgemm.{PATHS[case][0]}"):
            ours = conv_bn_relu2d(x, wt, b, gamma, beta, mean, var, False, padding=1, relu=relu)
        ref = F.batch_norm(F.conv2d(x, wt, b, padding=1), mean, var, gamma, beta, False)
        if relu:
            ref = F.relu(ref)
        assert_close_scaled(ours, ref, 1e-5, case)


@pytest.mark.parametrize("threads", [1, 2])
def test_batch_stats_chunks_across_samples(threads):
    """conv_bn_relu2d training takes its statistics from the forward's row bands, which
    here span samples (5 samples of 7x7 in one chunk, then 11-row chunks of 40x40)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape, o in (((5, 32, 7, 7), 40), ((2, 64, 40, 40), 16)):
            x = torch.randn(*shape, requires_grad=True)
            wt = torch.randn(o, shape[1], 3, 3, requires_grad=True)
            gamma, beta = torch.rand(o) + 0.5, torch.randn(o)
            outs = []
            for fused in (True, False):
                rm, rv = torch.zeros(o), torch.ones(o)
                if fused:
                    # The statistics are taken per row band: gathered columns, then implicit.
                    with expect_path("conv2d.sgemm.gather" if shape[0] == 5 else "conv2d.sgemm.implicit"):
                        y = conv_bn_relu2d(x, wt, None, gamma, beta, rm, rv, True, padding=1)
                else:
                    y = F.relu(F.batch_norm(F.conv2d(x, wt, None, padding=1), rm, rv, gamma, beta, True))
                gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
                outs.append((y.detach(), rm, rv) + torch.autograd.grad(y, (x, wt), gy))
            for a, e, name in zip(*outs, ["out", "running_mean", "running_var", "grad_input", "grad_weight"]):
                assert_close_scaled(a, e, 1e-4, name)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads, form", [(1, "gather"), (3, "gather_transposed")])
def test_pointwise_stride2_forms(threads, form):
    """The strided 1x1 case's chunks follow the thread count: one 12-row chunk (positions on
    N) on one thread, three 4-row chunks (12 positions each: on M, transposed) on three."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with expect_path(f"conv2d.sgemm.{form}"):
            ours, ref = run("pointwise_stride2", torch.float32, "contiguous")
    finally:
        torch.set_num_threads(old)
    compare(ours, ref, torch.float32)


@pytest.mark.parametrize("case", ["lenet_conv2", "rows_odd", "implicit_w_columns"])
@pytest.mark.parametrize("threads", [1, 2])
def test_empty_batch_new_backward_paths(case, threads):
    """N = 0 on the shapes of the lanes / rows / column-split backward paths: empty input
    gradient, zero weight and bias gradients, as stock gives."""
    n, c, h, w, o, k, s, p, d, g = CASES[case]
    kh, kw = (k, k) if isinstance(k, int) else k
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs = []
        for fn in (conv2d, F.conv2d):
            x = torch.randn(0, c, h, w, requires_grad=True)
            wt = torch.randn(o, c // g, kh, kw, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
            b = torch.randn(o, requires_grad=True)
            y = fn(x, wt, b, stride=s, padding=p, dilation=d, groups=g)
            outs.append((y.detach(),) + torch.autograd.grad(y, (x, wt, b), torch.ones_like(y)))
    finally:
        torch.set_num_threads(old)
    for a, e in zip(*outs):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape", [(8, 64, 20, 20, 128, 1, 2, 0), (4, 256, 6, 6, 512, 1, 2, 0), (2, 32, 15, 17, 40, 3, 2, 1)],
                         ids=["shortcut", "l4_shortcut", "padded"])
def test_weight_gradient_gather_shares_packed_gy(shape, layout):
    """The gather weight gradient with its taps split over two threads packs gy once, shared
    (conv2d.weight_grad.sgemm_gather_shared_gy), and reads an unpadded input in place
    (conv2d.sgemm.gather.unpadded_source): within a rounding of float64 under any layout,
    and a NaN / Inf of x lands where stock puts it."""
    n, c, h, w, o, k, s, p = shape
    gen = torch.Generator().manual_seed(c + o)
    x = torch.randn(n, c, h, w, dtype=torch.float64, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(n, 2 * c, h, w + 3, dtype=torch.float64, generator=gen)[:, ::2, :, 1:w + 1]
    wt = torch.randn(o, c, k, k, dtype=torch.float64, generator=gen)
    gy = torch.randn(F.conv2d(x, wt, None, s, p).shape, dtype=torch.float64, generator=gen)
    paths = ["conv2d.weight_grad.sgemm_gather", "conv2d.weight_grad.sgemm_gather_shared_gy"]
    if p == 0:
        paths.append("conv2d.sgemm.gather.unpadded_source")
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for poison in (False, True):
            xin = x.clone() if poison else x
            if poison:
                xin[0, 1, 2, 4] = float("nan")
                xin[-1, 2, 4, 2] = float("inf")
            ref = torch.ops.aten.convolution_backward(gy, xin, wt, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
                                                      [False, True, False])[1]
            with expect_path(*paths):
                gw = torch.ops.cnnext.conv2d_weight_backward(gy.float(), xin.float(), list(wt.shape), [s, s], [p, p],
                                                             [1, 1], 1)
            assert torch.equal(gw.isnan(), ref.isnan()) and torch.equal(gw.isinf(), ref.isinf())
            fin = ref.isfinite()
            assert ((gw.double() - ref)[fin].abs().max() / ref[fin].abs().max()).item() <= 1e-5
    finally:
        torch.set_num_threads(saved)
