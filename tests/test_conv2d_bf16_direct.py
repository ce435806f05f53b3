"""The bfloat16 direct forward on AVX512_BF16 CPUs (csrc/cpu/conv2d_bf16.cpp, direct_forward):
output channels in the vector lanes, one input pair broadcast per pixel from a padded
channel-pair copy of the input, nothing packed per tile. It runs the pair GEMM's sums (K in
(tap, channel pair) order, the same vdpbf16ps products), so where that GEMM takes a shape
(even channels a group, more than one tap, column stride 1, NCHW) the two must agree **bit
for bit** (the test hook ``_set_bf16_direct(False)`` runs the GEMM); everywhere it runs it
must be within a bfloat16 rounding of float64. Channels_last input or output changes only
where values are read and written: bitwise the NCHW result. Also: the thread count does not
change a bit, the stride-1 input gradient (a forward with the flipped weight) and the
stride-2 one (its phases) run it, NaN / Inf propagate as the GEMM's, and what it leaves to
the GEMM. The weight gradient's direct kernel (pairs of samples at a pixel) is checked the
same ways against float64, and 300 random shapes (groups, kernels 1-5, strides, padding,
dilation, odd channel counts, channels_last input) check the forward and both gradients,
and which of them took the direct kernels."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from cnnext import _C
from cnnext._paths import counts, expect_path, runnable
from cnnext.functional import conv2d
from conftest import assert_same_bits, bf16_conv_case

PATH = "conv2d.fwd.bf16_direct"
needs_path = pytest.mark.skipif(not runnable(PATH), reason="the bfloat16 direct forward needs AVX512_BF16")

# (N, C, H, W, O, (KH, KW), stride, padding, dilation, groups)
CASES = {
    "resnet": (2, 16, 14, 14, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "row_blocks_and_channel_tail": (2, 16, 9, 31, 48, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # rows 11+10+10, 16 channels in the last block
    "wide_rows": (1, 8, 4, 60, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # 5 blocks of 12
    "odd_channels": (2, 17, 10, 12, 20, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "stride2": (2, 16, 17, 23, 32, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    # >= 1024 output pixels: the input gradient runs as stride-1 phases (forwards)
    "stride2_phases": (2, 16, 48, 47, 32, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    "stem_7x7_s2": (1, 4, 33, 35, 16, (7, 7), (2, 2), (3, 3), (1, 1), 1),
    "dilated": (2, 8, 12, 12, 16, (3, 3), (1, 1), (2, 2), (2, 2), 1),
    "rect": (2, 10, 11, 13, 24, (3, 2), (2, 1), (2, 0), (2, 1), 1),
    "groups": (2, 32, 10, 10, 64, (3, 3), (1, 1), (1, 1), (1, 1), 2),
    "groups_odd_channels": (2, 45, 9, 9, 48, (3, 3), (1, 1), (1, 1), (1, 1), 3),
    "k2_s2_no_padding": (2, 32, 14, 14, 64, (2, 2), (2, 2), (0, 0), (1, 1), 1),
    "small_map": (3, 64, 3, 3, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "k5_no_padding": (2, 8, 12, 11, 24, (5, 5), (1, 1), (0, 0), (1, 1), 1),
    # packed weights past 512 KiB: the rows of a channel block in turn
    "wide_weight": (1, 512, 4, 4, 512, (3, 3), (1, 1), (1, 1), (1, 1), 1),
}


def make(case, seed=0):
    return bf16_conv_case(CASES[case], seed)


def pair_gemm_takes(case):
    n, c, h, w, o, k, s, p, d, g = CASES[case]
    return (c // g) % 2 == 0 and k[0] * k[1] > 1 and s[1] == 1


@contextlib.contextmanager
def direct(on):
    prev = _C._get_bf16_direct()
    _C._set_bf16_direct(on)
    try:
        yield
    finally:
        _C._set_bf16_direct(prev)


def assert_within_rounding(got, x, wt, b, conf):
    ref = F.conv2d(x.double(), wt.double(), None if b is None else b.double(), **conf)
    err = (got.double() - ref).abs()
    assert (err <= 2 ** -8 * ref.abs() + 1e-5 * ref.abs().max()).all(), err.max()


@needs_path
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", list(CASES))
def test_within_a_rounding_of_float64(case, bias):
    x, wt, b, conf = make(case)
    b = b if bias else None
    with expect_path(PATH):
        got = conv2d(x, wt, b, **conf)
    assert got.dtype == torch.bfloat16 and got.is_contiguous()
    assert_within_rounding(got, x, wt, b, conf)


@needs_path
@pytest.mark.parametrize("case", [c for c in CASES if pair_gemm_takes(c)])
def test_bitwise_the_pair_gemm(case):
    x, wt, b, conf = make(case)
    with expect_path(PATH):
        got = conv2d(x, wt, b, **conf)
    with direct(False), expect_path("conv2d.fwd.bf16_gemm_pairs"):
        want = conv2d(x, wt, b, **conf)
    assert counts()[PATH] > 0
    assert_same_bits(got, want)


@needs_path
@pytest.mark.parametrize("case", ["resnet", "stride2", "odd_channels", "groups_odd_channels", "k2_s2_no_padding"])
@pytest.mark.parametrize("layout", ["input", "input_and_weight"])
def test_channels_last_is_the_nchw_result(case, layout):
    x, wt, b, conf = make(case)
    want = conv2d(x, wt, b, **conf)
    xc = x.contiguous(memory_format=torch.channels_last)
    if layout == "input_and_weight":
        wt = wt.contiguous(memory_format=torch.channels_last)
    with expect_path(PATH):
        got = conv2d(xc, wt, b, **conf)
    stock = F.conv2d(xc, wt, b, **conf)  # the layout stock gives these tensors
    assert got.is_contiguous(memory_format=torch.channels_last) == stock.is_contiguous(memory_format=torch.channels_last)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    assert_same_bits(got.contiguous(), want)


@needs_path
def test_fused_eval_relu_is_the_pair_gemm():
    x, wt, b, conf = make("resnet")
    o = wt.shape[0]
    gen = torch.Generator().manual_seed(1)
    bn = [torch.randn(o, generator=gen).bfloat16() for _ in range(2)]
    mean, var = torch.randn(o, generator=gen), torch.rand(o, generator=gen) + 0.5
    args = (list(conf["stride"]), list(conf["padding"]), list(conf["dilation"]), conf["groups"], True)
    with expect_path(PATH):
        got = torch.ops.cnnext.conv_bn_relu2d_eval(x, wt, b, bn[0], bn[1], mean, var, 1e-5, *args)
    with direct(False), expect_path("conv2d.fwd.bf16_gemm_pairs"):
        want = torch.ops.cnnext.conv_bn_relu2d_eval(x, wt, b, bn[0], bn[1], mean, var, 1e-5, *args)
    assert (got.float() >= 0).all() and (got == 0).any()
    assert_same_bits(got, want)


@needs_path
@pytest.mark.parametrize("case", ["resnet", "wide_rows", "groups_odd_channels", "wide_weight"])
def test_thread_count_changes_no_bit(case):
    x, wt, b, conf = make(case)
    prev = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            with expect_path(PATH):
                outs.append(conv2d(x, wt, b, **conf))
    finally:
        torch.set_num_threads(prev)
    for o in outs[1:]:
        assert_same_bits(o, outs[0])


@needs_path
def test_nonfinite_input_as_the_pair_gemm():
    x, wt, b, conf = make("resnet")
    x[0, 3, 5, 7] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    x[1, 9, 13, 13] = -float("inf")
    with expect_path(PATH):
        got = conv2d(x, wt, b, **conf)
    with direct(False):
        want = conv2d(x, wt, b, **conf)
    assert torch.isnan(got).any() and torch.isinf(got).any()
    assert_same_bits(got, want)


@needs_path
@pytest.mark.parametrize("case", ["resnet", "stride2_phases", "groups"])
def test_input_gradient_runs_it(case):
    x, wt, b, conf = make(case)
    x.requires_grad_(True)
    y = conv2d(x, wt, b, **conf)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    how = "conv2d.input_grad.bf16_flip" if conf["stride"] == (1, 1) else "conv2d.input_grad.bf16_phases"
    with expect_path(PATH, how):
        gx, = torch.autograd.grad(y, x, gy)
    if conf["stride"] == (1, 1):  # the flipped forward's pair GEMM: the same sums
        with direct(False):
            want, = torch.autograd.grad(conv2d(x, wt, b, **conf), x, gy)
        assert_same_bits(gx, want)
    xd = x.detach().double().requires_grad_(True)
    ref, = torch.autograd.grad(F.conv2d(xd, wt.double(), None, **conf), xd, gy.double())
    err = (gx.double() - ref).abs()
    assert (err <= 2 ** -8 * ref.abs() + 1e-5 * ref.abs().max()).all(), err.max()


@needs_path
@pytest.mark.parametrize("why", ["few_output_channels", "stride3", "pointwise", "few_odd_channels", "copy_past_bound"])
def test_left_to_the_gemm(why):
    x, wt, b, conf = make("resnet")
    if why == "few_output_channels":
        wt, b = wt[:8].contiguous(), b[:8].contiguous()
    if why == "stride3":
        conf = dict(conf, stride=(3, 3))
    if why == "pointwise":
        wt, conf = wt[:, :, :1, :1].contiguous(), dict(conf, padding=(0, 0))
    if why == "few_odd_channels":
        x, wt = x[:, :3].contiguous(), wt[:, :3].contiguous()
    if why == "copy_past_bound":
        # 256 channels of one pixel under a padding of 100 at stride 2: a padded copy of
        # 202 x 202 x 128 pairs against an output of 16 x 101 x 101
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(1, 256, 1, 1, generator=gen).bfloat16()
        wt = (torch.randn(16, 256, 2, 2, generator=gen) / 32).bfloat16()
        b = None
        conf = dict(stride=(2, 2), padding=(100, 100), dilation=(1, 1), groups=1)
    before = counts()[PATH]
    with expect_path("conv2d.fwd.bf16_gemm"):
        got = conv2d(x, wt, b, **conf)
    assert counts()[PATH] == before, f"{PATH} ran for {why}"
    assert_within_rounding(got, x, wt, b, conf)


@needs_path
def test_off_switch_restores():
    assert _C._get_bf16_direct()
    with direct(False):
        assert not _C._get_bf16_direct()
    assert _C._get_bf16_direct()


# ---- the direct weight gradient (direct_weight_backward) ----
GW_PATH = "conv2d.weight_grad.bf16_direct"

# (N, C, H, W, O, (KH, KW), stride, padding, dilation, groups)
GW_CASES = {
    "resnet": (2, 16, 14, 14, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # 64 channels a block
    "channel_tail": (2, 16, 9, 10, 48, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # blocks of 32, the last half empty
    "odd_width": (2, 8, 9, 7, 16, (3, 3), (1, 1), (0, 0), (1, 1), 1),
    "odd_batch": (3, 8, 9, 9, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # the last sample paired with zeros
    "one_sample": (1, 16, 7, 7, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "stride2": (2, 16, 13, 15, 64, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    "stride3_k5": (1, 6, 20, 23, 32, (5, 5), (3, 3), (2, 2), (1, 1), 1),
    "dilated_rect": (2, 10, 11, 13, 32, (3, 2), (2, 1), (2, 0), (2, 3), 1),
    "groups": (2, 32, 10, 10, 128, (3, 3), (1, 1), (1, 1), (1, 1), 2),
    "pointwise_s2": (2, 32, 9, 9, 32, (1, 1), (2, 2), (0, 0), (1, 1), 1),
    "padding_past_kernel": (1, 8, 6, 6, 16, (3, 3), (1, 1), (3, 3), (1, 1), 1),
    # more rows than one chunk of grad_output pairs (the sums kept in memory between chunks)
    "many_rows": (4, 4, 80, 64, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1),
}


def gw_make(case, seed=0):
    n, c, h, w, o, k, s, p, d, g = GW_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).bfloat16()
    conf = dict(stride=s, padding=p, dilation=d, groups=g)
    oh, ow = F.conv2d(torch.zeros(1, c, h, w), torch.zeros(o, c // g, *k), None, **conf).shape[2:]
    gy = torch.randn(n, o, oh, ow, generator=gen).bfloat16()
    return x, gy, (o, c // g) + tuple(k), conf


def gw_ours(x, gy, wshape, conf):
    return torch.ops.cnnext.conv2d_weight_backward(gy, x, list(wshape), list(conf["stride"]), list(conf["padding"]),
                                                   list(conf["dilation"]), conf["groups"])


def gw_reference(x, gy, wshape, conf):
    return torch.ops.aten.convolution_backward(
        gy.double(), x.double(), torch.zeros(wshape, dtype=torch.double), None, list(conf["stride"]),
        list(conf["padding"]), list(conf["dilation"]), False, [0, 0], conf["groups"], [False, True, False])[1]


@needs_path
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", list(GW_CASES))
def test_weight_gradient_within_a_rounding_of_float64(case, layout):
    x, gy, wshape, conf = gw_make(case)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with expect_path(GW_PATH):
        got = gw_ours(x, gy, wshape, conf)
    assert got.dtype == torch.bfloat16 and got.shape == wshape
    ref = gw_reference(x, gy, wshape, conf)
    err = (got.double() - ref).abs()
    assert (err <= 2 ** -8 * ref.abs() + 1e-5 * ref.abs().max()).all(), err.max()


@needs_path
@pytest.mark.parametrize("case", ["resnet", "odd_batch", "many_rows", "groups"])
def test_weight_gradient_thread_count_changes_no_bit(case):
    x, gy, wshape, conf = gw_make(case)
    prev = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            with expect_path(GW_PATH):
                outs.append(gw_ours(x, gy, wshape, conf))
    finally:
        torch.set_num_threads(prev)
    for o in outs[1:]:
        assert_same_bits(o, outs[0])


@needs_path
@pytest.mark.parametrize("case", ["resnet", "odd_width", "odd_batch"])
def test_weight_gradient_nonfinite_input(case):
    """NaN / Inf in the input reach the weight gradient where float64's do (stock's bfloat16
    kernel puts NaN where float64 has none in the odd-width case: it multiplies a value past
    the row; the zeros pairing an odd batch's last sample are the copy's own, never input)."""
    x, gy, wshape, conf = gw_make(case)
    x[0, 1, 4, 4] = float("nan")
    x[1, 0, 2, 3] = float("inf")
    x[-1, 2, 3, -1] = -float("inf")  # the last column
    with expect_path(GW_PATH):
        got = gw_ours(x, gy, wshape, conf)
    want = gw_reference(x, gy, wshape, conf)
    assert torch.isnan(want).any() and torch.isinf(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    err = (got.double()[fin] - want[fin]).abs()
    assert (err <= 2 ** -8 * want[fin].abs() + 1e-5 * want[fin].abs().max()).all(), err.max()


@needs_path
@pytest.mark.parametrize("why", ["few_output_channels", "group_straddling_block", "copy_past_bound"])
def test_weight_gradient_left_to_the_gemm(why):
    x, gy, wshape, conf = gw_make("resnet")
    if why == "few_output_channels":
        gy, wshape = gy[:, :8].contiguous(), (8,) + wshape[1:]
    if why == "group_straddling_block":  # 48 channels a group: blocks of 32 would straddle groups
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(2, 16, 8, 8, generator=gen).bfloat16()
        gy = torch.randn(2, 96, 8, 8, generator=gen).bfloat16()
        wshape, conf = (96, 8, 3, 3), dict(conf, groups=2)
    if why == "copy_past_bound":
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(1, 256, 1, 1, generator=gen).bfloat16()
        conf = dict(stride=(2, 2), padding=(100, 100), dilation=(1, 1), groups=1)
        gy = torch.randn(1, 16, 100, 100, generator=gen).bfloat16()
        wshape = (16, 256, 2, 2)
    before = counts()[GW_PATH]
    with expect_path("conv2d.weight_grad.bf16_gemm"):
        got = gw_ours(x, gy, wshape, conf)
    assert counts()[GW_PATH] == before, f"{GW_PATH} ran for {why}"
    ref = gw_reference(x, gy, wshape, conf)
    err = (got.double() - ref).abs()
    assert (err <= 2 ** -8 * ref.abs() + 1e-5 * ref.abs().max()).all(), err.max()


@needs_path
def test_training_step_matches_the_gemm_paths():
    """A small bfloat16 net's gradients, direct paths on against off (the GEMMs): the same up
    to the sums' order (each gradient within two roundings of the other)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 16, 20, 20, generator=gen).bfloat16()
    ws = [(torch.randn(sh, generator=gen) / (sh[1] * 9) ** 0.5).bfloat16() for sh in ((32, 16, 3, 3), (64, 32, 3, 3), (64, 32, 3, 3))]

    def grads():
        p = [w.clone().requires_grad_() for w in ws]
        h = conv2d(x, p[0], None, 1, 1).relu()
        h = conv2d(h, p[1], None, 2, 1).relu()
        h = conv2d(h, p[2], None, 1, 1, 1, 2)
        return torch.autograd.grad(h.float().square().mean(), p)

    with expect_path(PATH, GW_PATH):
        on = grads()
    with direct(False):
        off = grads()
    for a, b in zip(on, off):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -6, atol=2 ** -6 * b.float().abs().max().item())


# ---- random shapes: forward and both gradients against float64 ----
from hypothesis import given, settings, strategies as st  # noqa: E402

from conftest import examples  # noqa: E402


@st.composite
def direct_configs(draw):
    g = draw(st.sampled_from([1, 1, 2]))
    cg, og = draw(st.integers(1, 40)), draw(st.sampled_from([16, 32, 48, 64, 80]))
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    s = (draw(st.integers(1, 2)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(max(1, d[0] * (k[0] - 1) + 1 - 2 * p[0]), 20))
    w = draw(st.integers(max(1, d[1] * (k[1] - 1) + 1 - 2 * p[1]), 20))
    return dict(shape=(draw(st.integers(1, 3)), g * cg, h, w, g * og, k, s, p, d, g),
                layout=draw(st.sampled_from(["contiguous", "channels_last"])), seed=draw(st.integers(0, 2 ** 16)))


def _within_rounding(got, ref, what):
    err = (got.double() - ref).abs()
    assert (err <= 2 ** -8 * ref.abs() + 1e-5 * ref.abs().max()).all(), (what, err.max().item())


@needs_path
@settings(deadline=None, derandomize=True, max_examples=examples(300))
@given(c=direct_configs())
def test_random_shapes_forward_and_gradients(c):
    x, wt, b, conf = bf16_conv_case(c["shape"], c["seed"])
    if c["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    n, cin, h, w, o, k, s, p, d, g = c["shape"]
    cg = cin // g
    takes_forward = s[1] <= 2 and k[0] * k[1] > 1 and (cg % 2 == 0 or cg >= 15)
    before = counts()
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, wt, b))
    y = conv2d(xs, ws, bs, **conf)
    ran = counts()
    assert (ran[PATH] > before[PATH]) == takes_forward, c
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(c["seed"] + 1)).bfloat16()
    gx, gw = torch.autograd.grad(y, (xs, ws), gy)
    assert counts()[GW_PATH] > ran[GW_PATH] or (g > 1 and (o // g) % 32 != 0), c  # blocks within groups
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, wt, b))
    yd = F.conv2d(xd, wd, bd, **conf)
    gxd, gwd = torch.autograd.grad(yd, (xd, wd), gy.double())
    _within_rounding(y, yd, "output")
    _within_rounding(gx, gxd, "grad_input")
    _within_rounding(gw, gwd, "grad_weight")


@needs_path
@pytest.mark.parametrize("layout", ["sliced", "permuted", "grad_output_channels_last", "grad_output_sliced",
                                    "unbatched", "channels_last_sliced"])
def test_layouts_forward_and_gradients(layout):
    """Views as users pass them (sliced, permuted, unbatched input; grad_output
    channels_last or sliced): the direct kernels run and the forward and both gradients are
    within a rounding of float64."""
    gen = torch.Generator().manual_seed(11)
    big = torch.randn(3, 40, 20, 30, generator=gen).bfloat16()
    wt = (torch.randn(64, 16, 3, 3, generator=gen) / 12).bfloat16()
    conf = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    x = {"sliced": big[:, 3:35:2, 1:18, 2:29], "permuted": big.permute(0, 1, 3, 2)[:, :16],
         "unbatched": big[0, :16],
         "channels_last_sliced": big[:, :16].contiguous(memory_format=torch.channels_last)[:, :, ::2]}.get(layout, big[:, :16])
    xs, ws = x.detach().requires_grad_(), wt.detach().requires_grad_()
    with expect_path(PATH, GW_PATH):
        y = conv2d(xs, ws, None, **conf)
        gy = torch.randn(y.shape, generator=gen).bfloat16()
        if layout == "grad_output_channels_last":
            gy = gy.contiguous(memory_format=torch.channels_last)
        if layout == "grad_output_sliced":
            gy = torch.randn(y.shape[0], 2 * y.shape[1], *y.shape[2:], generator=gen).bfloat16()[:, ::2]
        gx, gw = torch.autograd.grad(y, (xs, ws), gy)
    xd, wd = x.detach().double().requires_grad_(), wt.detach().double().requires_grad_()
    yd = F.conv2d(xd, wd, None, **conf)
    gxd, gwd = torch.autograd.grad(yd, (xd, wd), gy.double())
    for got, ref, what in ((y, yd, "output"), (gx, gxd, "grad_input"), (gw, gwd, "grad_weight")):
        assert got.shape == ref.shape, what
        _within_rounding(got, ref, what)
