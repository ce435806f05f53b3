"""The bfloat16 forward convolution on AVX2 CPUs without the AVX-512 GEMM where the float path
unfolds the input for at::mm (csrc/cpu/conv2d.cpp, conv2d_forward_bf16_unfolded): bfloat16
input unfolded straight into float columns, the output rounded from each GEMM band, instead of
the float path on float copies of input and output. It runs the float path's items and GEMMs
on the same float columns, so its output must be **bitwise** the float path's output rounded
to bfloat16 (cnnext's float32 conv2d on x.float(), then .bfloat16(), as torch rounds) -- NaN
where that has NaN. Checked for unit-stride, stride-2 (vector gather) and stride-3 rows,
groups, dilation, bias or none, several row bands; and the shapes it leaves to the float
copies. On an AVX-512 CPU the file reruns itself under CNNEXT_CPU_ISA=avx2."""
import os

import pytest
import torch
import torch.nn.functional as F

from cnnext._paths import counts, expect_path, runnable
from cnnext.functional import conv2d
from conftest import assert_same_bits, bf16_conv_case, rerun_under_avx2_cap

PATH = "conv2d.fwd.mm_bf16_unfolded_avx2"
HERE = runnable(PATH) and not runnable("sgemm.gemm")
needs_path = pytest.mark.skipif(not HERE, reason="the bfloat16 unfolded forward does not run on this CPU")

# (N, C, H, W, O, (KH, KW), stride, padding, dilation, groups)
CASES = {
    "resnet_down": (2, 16, 28, 28, 32, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    "odd_width_s2": (2, 16, 17, 23, 24, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    "k5_s1": (2, 12, 19, 21, 16, (5, 5), (1, 1), (2, 2), (1, 1), 1),
    "k3_s3": (2, 12, 25, 26, 16, (3, 3), (3, 3), (1, 0), (1, 1), 1),
    "k7_s2": (2, 12, 40, 36, 16, (7, 7), (2, 2), (3, 3), (1, 1), 1),
    "groups": (2, 16, 20, 20, 32, (3, 3), (2, 2), (1, 1), (1, 1), 2),
    "dilated_s1": (2, 16, 20, 18, 16, (3, 3), (1, 1), (2, 2), (2, 2), 1),
    "no_padding": (2, 16, 21, 21, 16, (4, 4), (2, 2), (0, 0), (1, 1), 1),
    # columns past the band budget: several bands a sample (64 x 5 x 5 taps by 100 x 100 positions)
    "bands": (1, 64, 100, 100, 8, (5, 5), (1, 1), (2, 2), (1, 1), 1),
}


def make(case, seed=0):
    return bf16_conv_case(CASES[case], seed)


def float_path(x, wt, b, conf):
    """cnnext's float32 forward on float copies, rounded once as torch rounds."""
    return conv2d(x.float(), wt.float(), None if b is None else b.float(), **conf).bfloat16()


@needs_path
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", list(CASES))
def test_bitwise_the_float_path_rounded(case, bias):
    x, wt, b, conf = make(case)
    b = b if bias else None
    with expect_path(PATH):
        got = conv2d(x, wt, b, **conf)
    assert got.dtype == torch.bfloat16
    assert_same_bits(got, float_path(x, wt, b, conf))
    # and within a bfloat16 rounding of the float64 result
    ref = F.conv2d(x.double(), wt.double(), None if b is None else b.double(), **conf)
    err = (got.double() - ref).abs()
    assert (err <= 2 ** -8 * ref.abs() + 1e-6 * ref.abs().max()).all()


@needs_path
def test_strided_input_view():
    x, wt, b, conf = make("resnet_down")
    wide = torch.cat([x, x], dim=3)[..., ::2]  # a view whose rows are 2 values apart
    with expect_path(PATH):
        got = conv2d(wide, wt, b, **conf)
    assert_same_bits(got, float_path(wide, wt, b, conf))


@needs_path
def test_nonfinite_input_propagates_as_the_float_path():
    x, wt, b, conf = make("resnet_down")
    x[0, 3, 5, 7] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    x[1, 9, 27, 27] = -float("inf")
    with expect_path(PATH):
        got = conv2d(x, wt, b, **conf)
    assert_same_bits(got, float_path(x, wt, b, conf))
    assert torch.isnan(got).any() and torch.isinf(got).any()


@needs_path
def test_relu_of_the_fused_eval_op():
    x, wt, b, conf = make("resnet_down")
    o = wt.shape[0]
    gen = torch.Generator().manual_seed(1)
    bn = [torch.randn(o, generator=gen).bfloat16() for _ in range(2)]
    mean, var = torch.randn(o, generator=gen), torch.rand(o, generator=gen) + 0.5
    args = (conf["stride"], conf["padding"], conf["dilation"], conf["groups"], True)
    before = counts()[PATH]
    got = torch.ops.cnnext.conv_bn_relu2d_eval(x, wt, b, bn[0], bn[1], mean, var, 1e-5, *args)
    assert counts()[PATH] > before
    want = torch.ops.cnnext.conv_bn_relu2d_eval(x.float(), wt.float(), b.float(), bn[0].float(), bn[1].float(),
                                                mean, var, 1e-5, *args)
    assert (got.float() >= 0).all() and (got == 0).any()
    # The op folds the batch norm into a bfloat16 weight: within a few of its roundings.
    torch.testing.assert_close(got.float(), want, rtol=2 ** -6, atol=5e-2)


@needs_path
@pytest.mark.parametrize("why", ["channels_last", "winograd_shape", "sample_blocks", "nonfinite_weight", "pointwise"])
def test_left_to_the_float_copies(why):
    x, wt, b, conf = make("resnet_down")
    if why == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if why == "winograd_shape":
        conf = dict(conf, stride=(1, 1))
    if why == "sample_blocks":  # 8 x 8 output positions a sample: blocks of samples
        x = x.repeat(4, 1, 1, 1)[:, :, :16, :16]
    if why == "nonfinite_weight":
        wt[0, 0, 0, 0] = float("inf")
    if why == "pointwise":
        wt, conf = wt[:, :, :1, :1].contiguous(), dict(conf, stride=(1, 1), padding=(0, 0))
    before = counts()[PATH]
    got = conv2d(x, wt, b, **conf)
    assert counts()[PATH] == before, f"{PATH} ran for {why}"
    want = F.conv2d(x.float(), wt.float(), b.float(), **conf)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want.bfloat16()))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got.float()[fin], want[fin], rtol=2 ** -7, atol=1e-2)


@pytest.mark.skipif(HERE or not runnable(PATH) or os.environ.get("CNNEXT_CPU_ISA") == "avx2",
                    reason="runs the file under the AVX2 cap on CPUs with AVX-512F")
def test_under_avx2_cap():
    """On an AVX-512 CPU: this file again with CNNEXT_CPU_ISA=avx2, where the path runs."""
    rerun_under_avx2_cap(__file__, "test_under_avx2_cap")
