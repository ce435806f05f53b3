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
# name: ((N, C, H, W, O, kernel, stride, padding, dilation, groups), gather paths that must run)
CASES = {
    # ResNet-18 at 96^2, layer 2 (12x12, padded): runs of 12 positions, unit stride.
    "runs_unit_12x12": ((3, 24, 12, 12, 40, 3, 1, 1, 1, 1), [G + "runs_unit"]),
    # LeNet's second layer, unpadded: read in place from the input, runs of 10.
    "runs_unit_unpadded": ((5, 6, 14, 14, 16, 5, 1, 0, 1, 1), [G + "runs_unit", G + "unpadded_source"]),
    # Strided 1x1 shortcut on an odd map: stride-2 runs read in place.
    "shortcut_odd": ((3, 16, 13, 13, 24, 1, 2, 0, 1, 1), [G + "runs_stride2", G + "unpadded_source"]),
    # Stride 2 with padding (ResNet's downsampling 3x3) on an odd map.
    "down_padded": ((2, 20, 15, 11, 36, 3, 2, 1, 1, 1), [G + "runs_stride2"]),
    # Stride 3, dilated and unpadded: runs copied by hardware gathers of a stride.
    "stride3_dilated": ((2, 8, 23, 22, 12, 3, 3, 0, 2, 1), [G + "runs_strided", G + "unpadded_source"]),
    # 3x3 maps (ResNet-18 at 96^2, layer 4): runs of 3, hardware gathers of 16 positions.
    "hw16_3x3": ((5, 32, 3, 3, 24, 3, 1, 1, 1, 1), [G + "hw16"]),
    # 3x3 maps with many channels (forward_panels: positions on M, panels of 8).
    "hw16_panels": ((4, 64, 3, 3, 80, 3, 1, 1, 1, 1), [G + "hw16", "conv2d.sgemm.panels"]),
    # 6x6 maps, stride 2 pad 1 to 3x3 (layer 4's downsampling), groups.
    "groups_down": ((3, 24, 6, 6, 36, 3, 2, 1, 1, 3), []),
    # Dilation with padding on a small map, asymmetric.
    "dilated_padded": ((3, 12, 9, 7, 20, (3, 2), (1, 2), (2, 1), (2, 3), 1), []),
    # >= 512 positions per sample: bands of one sample each (written straight into y),
    # two bands per sample (576 taps x 24 columns over the column budget).
    "large_map_bands": ((3, 64, 48, 47, 24, 3, 2, 1, 1, 1), [G + "runs_stride2"]),
    # One sample, large strided 1x1 (the shortcut of ResNet at 224^2, fewer channels).
    "shortcut_one_sample": ((1, 32, 56, 56, 48, 1, 2, 0, 1, 1), [G + "runs_stride2", G + "unpadded_source"]),
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
@pytest.mark.parametrize("case", ["shortcut_odd", "hw16_3x3", "runs_unit_12x12"])
def test_small_batches(case, n):
    shape = (n,) + CASES[case][0][1:]
    check(run(shape, "contiguous"))


@pytest.mark.parametrize("case", ["shortcut_odd", "hw16_panels", "down_padded"])
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


def test_deterministic():
    """Bitwise the same result on every call and thread count (the chunks depend on the
    thread count, but each output element is one GEMM dot product over the same K order)."""
    shape, _ = CASES["runs_unit_12x12"]
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
