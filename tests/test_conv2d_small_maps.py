"""The float32 forward's column gathers on small maps and strided convolutions
(csrc/cpu/conv2d_sgemm.cpp gather_panels, gather_source, forward_impl's chunks), against a
float64 reference and stock torch: forward, grad_input, grad_weight, grad_bias.

Columns are gathered as runs of output positions, one vector copy per run (stride 1: masked
loads; stride 2: two loads and a permute; another stride: a hardware gather), or, where the
runs are short (maps a few columns wide), one hardware gather per 16 positions. With no
padding the columns are read from the input itself through its strides, not from a padded
copy. Maps of >= 512 positions are cut into bands of one sample each; smaller maps into
equal runs of rows across samples. Each case asserts through the path counters
(cnnext._paths) that the gather it targets ran.
"""
import pytest
import torch
import torch.nn.functional as F

import cnnext.backends.cpu
from cnnext._paths import expect_path
from cnnext.functional import conv2d
from conftest import assert_close_scaled, to_layout


@pytest.fixture(autouse=True)
def _gemm_paths():
    """These cases target the GEMM paths: Winograd (tests/test_conv2d_winograd.py) off."""
    with cnnext.backends.cpu.flags(winograd=False):
        yield


G = "conv2d.sgemm.gather."
S = "conv2d.sgemm.small_n"
L = "conv2d.sgemm.channel_lanes"
# name: ((N, C, H, W, O, kernel, stride, padding, dilation, groups), gather paths that must run)
CASES = {
    # ResNet-18 at 96^2, layer 2 (12x12, padded): runs of 12 positions, unit stride.
    "runs_unit_12x12": ((3, 24, 12, 12, 40, 3, 1, 1, 1, 1), [G + "runs_unit"]),
    # LeNet's second layer, unpadded: read in place from the input, runs of 10.
    # (24 output channels: past the few-channels path's 16.)
    "runs_unit_unpadded": ((5, 6, 14, 14, 24, 5, 1, 0, 1, 1), [G + "runs_unit", G + "unpadded_source"]),
    # Strided 1x1 shortcut on an odd map: stride-2 runs read in place.
    "shortcut_odd": ((3, 16, 13, 13, 24, 1, 2, 0, 1, 1), [G + "runs_stride2", G + "unpadded_source"]),
    # Stride 2 with padding (ResNet's downsampling 3x3) on an odd map (192 positions: past
    # the small-map path's 144).
    "down_padded": ((4, 20, 15, 11, 36, 3, 2, 1, 1, 1), [G + "runs_stride2"]),
    # Stride 3, dilated and unpadded: runs copied by hardware gathers of a stride.
    "stride3_dilated": ((4, 8, 23, 22, 12, 3, 3, 0, 2, 1), [G + "runs_strided", G + "unpadded_source"]),
    # 3x3 maps, 153 positions: runs of 3, hardware gathers of 16 positions.
    "hw16_3x3": ((17, 32, 3, 3, 24, 3, 1, 1, 1, 1), [G + "hw16"]),
    # 3x3 maps with many output channels and few taps (54: below the small-map path's 64):
    # forward_panels, positions on M, panels of 8.
    "hw16_panels": ((4, 6, 3, 3, 80, 3, 1, 1, 1, 1), [G + "hw16", "conv2d.sgemm.panels"]),
    # 6x6 maps, stride 2 pad 1 to 3x3 (layer 4's downsampling), groups.
    "groups_down": ((3, 24, 6, 6, 36, 3, 2, 1, 1, 3), []),
    # Dilation with padding on a small map, asymmetric.
    "dilated_padded": ((3, 12, 9, 7, 20, (3, 2), (1, 2), (2, 1), (2, 3), 1), []),
    # >= 512 positions per sample: bands of one sample each (written straight into y),
    # two bands per sample (576 taps x 24 columns over the column budget).
    "large_map_bands": ((3, 64, 48, 47, 24, 3, 2, 1, 1, 1), [G + "runs_stride2"]),
    # One sample, large strided 1x1 (the shortcut of ResNet at 224^2, fewer channels).
    "shortcut_one_sample": ((1, 32, 56, 56, 48, 1, 2, 0, 1, 1), [G + "runs_stride2", G + "unpadded_source"]),
    # Small maps, <= 144 positions over the batch: one GEMM per group, the weight read in
    # place (forward_small_n, sgemm::gemm_small_n). ResNet-18 at 96^2, layer 4 (fewer
    # channels): 36 positions, one column tile of 48.
    "small_n_3x3": ((4, 64, 3, 3, 80, 3, 1, 1, 1, 1), [S]),
    # 105 positions (tiles of 48, 48, 9), 37 output channels (a partial block of rows).
    "small_n_odd": ((3, 20, 5, 7, 37, 3, 1, 1, 1, 1), [S]),
    # 450 taps: two K blocks (of 384) summed through C; 32 positions, 19 channels.
    "small_n_kblocks": ((2, 50, 4, 4, 19, 3, 1, 1, 1, 1), [S]),
    # Layer 4's downsampling (6x6 -> 3x3, stride 2, padded) and its 1x1 shortcut (read in
    # place from the input: no padding).
    "small_n_down": ((4, 24, 6, 6, 40, 3, 2, 1, 1, 1), [S]),
    "small_n_shortcut": ((4, 96, 6, 6, 64, 1, 2, 0, 1, 1), [S, G + "unpadded_source"]),
    # Groups: each group's GEMM reads its own rows of the weight.
    "small_n_groups": ((3, 48, 5, 5, 36, 3, 1, 1, 1, 3), [S]),
    # Asymmetric kernel, stride and dilation, one sample.
    "small_n_dilated": ((1, 16, 9, 8, 24, (3, 2), (1, 2), (2, 1), (2, 3), 1), [S]),
    # Column tiles past a multiple of 16 by at most 4 or 8 take a 128- or 256-bit tail:
    # 4, 8, 20, 24 (two K blocks), 36 (two K blocks, 9 channels), 40 and 100 (48, 48, 4) positions.
    "small_n_tail4": ((1, 16, 2, 2, 24, 3, 1, 1, 1, 1), [S]),
    "small_n_tail8": ((2, 16, 2, 2, 24, 3, 1, 1, 1, 1), [S]),
    "small_n_tail20": ((5, 16, 2, 2, 20, 3, 1, 1, 1, 1), [S]),
    "small_n_tail24_kblocks": ((6, 50, 2, 2, 19, 3, 1, 1, 1, 1), [S]),
    "small_n_tail36_kblocks": ((4, 50, 3, 3, 9, 3, 1, 1, 1, 1), [S]),
    "small_n_tail40": ((10, 16, 2, 2, 24, 3, 1, 1, 1, 1), [S]),
    "small_n_tail100": ((4, 16, 5, 5, 16, 3, 1, 1, 1, 1), [S]),
    # Few output channels (12 to 16 per group) on maps narrower than 16 columns: the
    # channels in the lanes of one vector, an accumulator per position of a row
    # (forward_lanes). LeNet's second layer (fewer samples), read in place from the input.
    "lanes_lenet": ((5, 6, 14, 14, 16, 5, 1, 0, 1, 1), [L, G + "unpadded_source"]),
    # 13 channels (3 lanes unused), padded, 13 columns (one tile of 13).
    "lanes_padded_odd": ((3, 7, 9, 11, 13, 3, 1, 2, 1, 1), [L]),
    # Groups of 14 channels; stride 2 down the rows (1 along them), dilation.
    "lanes_groups": ((2, 12, 6, 7, 28, 3, 1, 1, 1, 2), [L]),
    "lanes_row_stride": ((4, 8, 11, 9, 16, 3, (2, 1), 1, 1, 1), [L]),
    "lanes_dilated": ((2, 8, 10, 12, 15, 3, 1, 2, 2, 1), [L]),
}


def run(shape, layout, dtype=torch.float32, bias=True):
    n, c, h, w, o, k, s, p, d, g = shape
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, c, h, w, dtype=torch.float64, generator=gen)
    w0 = torch.randn(o, c // g, kh, kw, dtype=torch.float64, generator=gen)
    b0 = torch.randn(o, dtype=torch.float64, generator=gen) if bias else None
    args = dict(stride=s, padding=p, dilation=d, groups=g)
    out = {}
    for name, fn, dt in (("ours", conv2d, dtype), ("stock", F.conv2d, dtype), ("ref", F.conv2d, torch.float64)):
        x = to_layout(x0.to(dt), layout).requires_grad_(True)
        wt = w0.to(dt).requires_grad_(True)
        b = b0.to(dt).requires_grad_(True) if bias else None
        y = fn(x, wt, b, **args)
        gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dt)
        grads = torch.autograd.grad(y, (x, wt) + ((b,) if bias else ()), to_layout(gy, layout))
        out[name] = (y.detach(),) + grads
    return out


def check(res):
    for i, name in enumerate(["output", "grad_input", "grad_weight", "grad_bias"][: len(res["ours"])]):
        ours = res["ours"][i]
        assert_close_scaled(ours.double(), res["ref"][i], 1e-5, f"{name} vs float64")
        assert_close_scaled(ours, res["stock"][i], 1e-5, f"{name} vs stock")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_gather_paths(case, threads):
    shape, paths = CASES[case]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with expect_path("conv2d.fwd.sgemm", *paths):
            res = run(shape, "contiguous")
    finally:
        torch.set_num_threads(old)
    check(res)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted", "offset"])
@pytest.mark.parametrize("case", list(CASES))
def test_layouts(case, layout):
    """Inputs of other strides: read in place through them where unpadded (a sliced input's
    gaps hold NaN, which no gather may let through)."""
    check(run(CASES[case][0], layout))


@pytest.mark.parametrize("layout", ["sliced", "permuted", "offset"])
def test_unpadded_source_strided_input(layout):
    """The strided 1x1 shortcut reads a non-contiguous input in place (unit-stride runs
    become strided ones through the input's w stride)."""
    shape, _ = CASES["shortcut_odd"]
    with expect_path("conv2d.fwd.sgemm", G + "unpadded_source"):
        res = run(shape, layout)
    check(res)


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("case", ["shortcut_odd", "hw16_3x3", "runs_unit_12x12", "small_n_3x3", "lanes_lenet"])
def test_small_batches(case, n):
    shape = (n,) + CASES[case][0][1:]
    check(run(shape, "contiguous"))


@pytest.mark.parametrize("case", ["shortcut_odd", "hw16_panels", "down_padded", "small_n_odd", "lanes_padded_odd",
                                  "small_n_tail4", "small_n_tail24_kblocks", "small_n_tail36_kblocks", "small_n_tail100"])
def test_no_bias_relu_epilogue(case):
    """No bias, and the fused ReLU of conv_bn_relu2d's eval path through the same gathers."""
    check(run(CASES[case][0], "contiguous", bias=False))
    n, c, h, w, o, k, s, p, d, g = CASES[case][0]
    x = torch.randn(n, c, h, w)
    wt = torch.randn(o, c // g, k, k)
    gamma, beta = torch.rand(o) + 0.5, torch.randn(o)
    mean, var = torch.randn(o), torch.rand(o) + 0.5
    ours = cnnext.functional.conv_bn_relu2d(x, wt, None, gamma, beta, mean, var, False, stride=s, padding=p,
                                            dilation=d, groups=g, relu=True)
    ref = F.relu(F.batch_norm(F.conv2d(x, wt, None, s, p, d, g), mean, var, gamma, beta, False))
    assert_close_scaled(ours, ref, 1e-5, "conv_bn_relu2d")


@pytest.mark.parametrize("case", ["runs_unit_12x12", "small_n_kblocks", "lanes_lenet", "small_n_tail36_kblocks", "small_n_tail100"])
def test_deterministic(case):
    """Bitwise the same result on every call and thread count (the chunks depend on the
    thread count, but each output element is one GEMM dot product over the same K order)."""
    shape, _ = CASES[case]
    n, c, h, w, o, k, s, p, d, g = shape
    x, wt = torch.randn(n, c, h, w), torch.randn(o, c, k, k)
    outs = []
    old = torch.get_num_threads()
    try:
        for t in (1, 2, 3, 2):
            torch.set_num_threads(t)
            outs.append(conv2d(x, wt, None, s, p))
    finally:
        torch.set_num_threads(old)
    for y in outs[1:]:
        assert torch.equal(y, outs[0])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["small_n_3x3", "small_n_kblocks", "small_n_groups"])
def test_small_n_input_gradient(case, threads):
    """The stride-1 input gradient is a forward of gy with the flipped weight: on small maps
    it takes the small-map forward too, its weight written row-major."""
    shape, _ = CASES[case]
    n, c, h, w, o, k, s, p, d, g = shape
    x = torch.randn(n, c, h, w, requires_grad=True)
    wt = torch.randn(o, c // g, k, k)
    y = conv2d(x, wt, None, s, p, d, g)
    gy = torch.randn_like(y)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with expect_path("conv2d.input_grad.sgemm_as_forward", S, "sgemm.gemm_small_n"):
            (gx,) = torch.autograd.grad(y, x, gy)
    finally:
        torch.set_num_threads(old)
    x64 = x.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad(F.conv2d(x64, wt.double(), None, s, p, d, g), x64, gy.double())
    assert_close_scaled(gx.double(), ref, 1e-5, "grad_input vs float64")


@pytest.mark.parametrize("case", ["small_n_3x3", "small_n_shortcut", "lanes_lenet", "lanes_padded_odd", "small_n_tail36_kblocks",
                                  "small_n_tail100"])
def test_small_n_non_finite(case):
    """NaN and Inf in the input (and, unpadded, the weight) reach exactly the outputs stock
    torch gives them: no padding column or dropped tile lane lets one through elsewhere.
    (With padding, a non-finite weight meets the padding's zeros, 0 * Inf = NaN, as in every
    GEMM path; stock skips the padding.)"""
    shape, _ = CASES[case]
    n, c, h, w, o, k, s, p, d, g = shape
    x = torch.randn(n, c, h, w)
    wt = torch.randn(o, c // g, k, k)
    x[1, 3, 2, 2] = float("nan")
    x[2, 5, 0, 1] = float("inf")
    x[-1, 6 % c, 1, 1] = float("-inf")
    if p == 0:
        wt[7, 2, 0, 0] = float("-inf")
    with expect_path(*CASES[case][1]):
        ours = conv2d(x, wt, None, s, p, d, g)
    ref = F.conv2d(x, wt, None, s, p, d, g)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert_close_scaled(torch.where(fin, ours, 0), torch.where(fin, ref, 0), 1e-5, "finite outputs")


@pytest.mark.parametrize("case", ["small_n_odd", "lanes_padded_odd", "small_n_tail24_kblocks", "small_n_tail100"])
@pytest.mark.parametrize("training", [False, True])
def test_small_n_conv_bn_relu(training, case):
    """conv_bn_relu2d's forward through the small-map path: the bias and ReLU epilogue of
    the GEMM (eval) and the per-sample rows_done calls its batch statistics read (training)."""
    shape, paths = CASES[case]
    n, c, h, w, o, k, s, p, d, g = shape
    x, wt = torch.randn(n, c, h, w), torch.randn(o, c, k, k)
    gamma, beta = torch.rand(o) + 0.5, torch.randn(o)
    mean, var = torch.randn(o), torch.rand(o) + 0.5
    m1, v1 = mean.clone(), var.clone()
    with expect_path(*paths):
        ours = cnnext.functional.conv_bn_relu2d(x, wt, None, gamma, beta, mean, var, training, stride=s,
                                                padding=p, relu=True)
    ref = F.relu(F.batch_norm(F.conv2d(x, wt, None, s, p), m1, v1, gamma, beta, training))
    assert_close_scaled(ours, ref, 1e-5, "conv_bn_relu2d")
    assert_close_scaled(mean, m1, 1e-5, "running_mean")
    assert_close_scaled(var, v1, 1e-5, "running_var")
