"""cnnext.functional.conv_transpose2d, torch.ops.cnnext.conv_transpose2d and
cnnext.nn.ConvTranspose2d against torch.nn.functional.conv_transpose2d / torch.nn.ConvTranspose2d."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import cnnext
from cnnext.functional import conv_transpose2d
from cnnext.testing import (GRAD_NAMES, IGEMM_MATHS, RTOL, TOLERANCES, ConvConf, Parity, assert_close_scaled,
                            assert_close_to_reference, assert_matches, cpu_and_cuda, cuda_only, device_dtypes,
                            igemm_math_id, is_channels_last, leaf, outputs_and_grads, rounded, sm80_only, tf32,
                            to_layout)
from conftest import assert_state_dict_round_trip
import conv_tests
from strategies import conv_conf, group_channels, pair_arg

ops = torch.ops.cnnext


# --------------------------------------------------------------------------------------------
# float64 gradcheck / gradgradcheck grid
# --------------------------------------------------------------------------------------------

# (input shape, weight shape (C_in, C_out / groups, kH, kW), bias, stride, padding,
#  output_padding, dilation, groups, input layout)
GRID = {
    "basic": ((2, 3, 4, 5), (3, 4, 3, 3), True, 1, 0, 0, 1, 1, "contiguous"),
    "no_bias": ((2, 3, 4, 5), (3, 4, 3, 3), False, 1, 0, 0, 1, 1, "contiguous"),
    "stride2_pad1": ((2, 3, 4, 3), (3, 2, 3, 3), True, 2, 1, 0, 1, 1, "contiguous"),
    "stride2_output_padding1": ((1, 2, 3, 4), (2, 3, 3, 3), True, 2, 1, 1, 1, 1, "contiguous"),
    "doubling_k4_s2_p1": ((1, 3, 4, 4), (3, 2, 4, 4), True, 2, 1, 0, 1, 1, "contiguous"),
    "rect_kernel_rect_args": ((1, 2, 4, 5), (2, 3, 2, 3), True, (2, 1), (1, 2), (1, 0), 1, 1, "contiguous"),
    "stride3_output_padding2": ((1, 2, 3, 3), (2, 2, 2, 3), False, 3, 0, (2, 1), 1, 1, "contiguous"),
    "dilation2": ((2, 2, 4, 4), (2, 3, 3, 3), True, 1, 2, 0, 2, 1, "contiguous"),
    # output_padding >= stride, allowed because it is below the dilation
    "output_padding_below_dilation": ((1, 2, 4, 3), (2, 2, 3, 2), True, 1, 1, (1, 2), (2, 3), 1, "contiguous"),
    "output_padding_below_dilation_strided": ((1, 2, 3, 4), (2, 2, 2, 2), True, (2, 1), 0, (2, 1), 3, 1,
                                              "contiguous"),
    "groups2": ((2, 4, 3, 4), (4, 3, 3, 3), True, 1, 1, 0, 1, 2, "contiguous"),
    "groups2_strided": ((1, 4, 4, 3), (4, 2, 3, 2), False, 2, (1, 0), (1, 0), (1, 2), 2, "contiguous"),
    "depthwise": ((2, 3, 4, 4), (3, 1, 3, 3), True, 1, 1, 0, 1, 3, "contiguous"),
    "depthwise_multiplier_strided": ((1, 3, 4, 3), (3, 2, 3, 3), True, 2, 1, 1, 1, 3, "contiguous"),
    "pointwise": ((2, 4, 3, 3), (4, 3, 1, 1), True, 1, 0, 0, 1, 1, "contiguous"),
    "pointwise_strided": ((2, 4, 3, 3), (4, 3, 1, 1), True, 2, 0, 1, 1, 1, "contiguous"),
    "padding_eats_output": ((1, 2, 5, 5), (2, 2, 3, 3), True, 1, 2, 0, 1, 1, "contiguous"),
    "unbatched": ((3, 4, 3), (3, 4, 3, 2), True, (2, 1), 1, (1, 0), 1, 1, "contiguous"),
    "unbatched_groups": ((4, 3, 3), (4, 1, 2, 2), False, 2, 0, 0, 1, 2, "contiguous"),
    "channels_last": ((2, 3, 4, 3), (3, 4, 3, 3), True, (2, 1), 1, (1, 0), 1, 1, "channels_last"),
    "channels_last_depthwise": ((2, 4, 3, 3), (4, 1, 3, 3), True, 2, 1, 1, 1, 4, "channels_last"),
    "sliced": ((2, 3, 4, 3), (3, 2, 3, 3), True, 2, 1, 1, (2, 1), 1, "sliced"),
    "permuted": ((1, 2, 4, 5), (2, 2, 3, 3), True, 1, 1, 0, 1, 1, "permuted"),
}


def grid_inputs(case):
    xshape, wshape, bias, stride, padding, output_padding, dilation, groups, layout = GRID[case]
    x = leaf(torch.randn(xshape, dtype=torch.float64), layout)
    w = leaf(torch.randn(wshape, dtype=torch.float64))
    tensors = (x, w, leaf(torch.randn(wshape[1] * groups, dtype=torch.float64))) if bias else (x, w)
    return tensors, dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                         dilation=dilation)


test_gradcheck, test_gradgradcheck = conv_tests.gradcheck_tests(conv_transpose2d, F.conv_transpose2d, GRID, grid_inputs)


test_double_backward_matches_torch = conv_tests.double_backward_test(
    conv_transpose2d, F.conv_transpose2d, ((2, 4, 5, 4), (4, 3, 3, 2), (6,)),
    dict(stride=(2, 1), padding=1, output_padding=(1, 0), groups=2, dilation=(1, 2)),
    "Gradient of a gradient norm (gradient-penalty training) equals torch's.")


# --------------------------------------------------------------------------------------------
# Random configurations: parity with torch.nn.functional.conv_transpose2d
# --------------------------------------------------------------------------------------------

@st.composite
def conv_transpose_confs(draw, batch=st.sampled_from([0, 1, 2, 3, None])):
    groups, cg, og = group_channels(draw, deep=((13, 30), (8, 20)))
    pointwise = draw(st.integers(0, 4)) == 0
    kernel = [1, 1] if pointwise else [draw(st.integers(1, 4)), draw(st.integers(1, 4))]
    stride = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    dilation = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    padding = [draw(st.integers(0, 2)), draw(st.integers(0, 2))]
    # torch's rule: output_padding below the stride or below the dilation, per dim.
    output_padding = [draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)]
    # Input sizes from the smallest with a non-empty output up to a few more.
    spatial = []
    for k, s, p, d, op in zip(kernel, stride, padding, dilation, output_padding):
        need = 2 * p - d * (k - 1) - op  # (H - 1) * s must reach it
        smallest = max(1, -(-need // s) + 1)
        spatial.append(draw(st.integers(smallest, smallest + 4)))
    n = draw(batch)
    xshape = (groups * cg, *spatial) if n is None else (n, groups * cg, *spatial)
    kw = dict(stride=pair_arg(draw, stride), padding=pair_arg(draw, padding),
              output_padding=pair_arg(draw, output_padding), groups=groups, dilation=pair_arg(draw, dilation))
    return conv_conf(draw, xshape, (groups * cg, og, *kernel), kw)


PARITY = Parity(conv_transpose2d, F.conv_transpose2d, bias_size=lambda c: c.wshape[1] * c.kw["groups"])
run_both, check_parity = PARITY.run_both, PARITY.check


test_parity_float64, test_parity_float32, test_parity_empty_batch = conv_tests.parity_tests(check_parity, conv_transpose_confs)


# Larger than one column band of the CPU backend, several threads, past sgemm's blocking.
LARGE = {
    # (input shape, weight shape, stride, padding, output_padding, dilation, groups)
    "doubling_k4": ((2, 64, 14, 14), (64, 32, 4, 4), 2, 1, 0, 1, 1),
    "k3_s2_op1": ((2, 48, 13, 12), (48, 40, 3, 3), 2, 1, 1, 1, 1),
    "grouped_dilated": ((1, 32, 16, 15), (32, 12, 3, 2), (1, 2), (2, 1), (0, 1), (2, 1), 2),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", LARGE)
def test_parity_large(case, dtype, layout):
    xshape, wshape, stride, padding, output_padding, dilation, groups = LARGE[case]
    kw = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation)
    c = ConvConf(xshape, wshape, True, kw, layout, "contiguous", layout, seed=3)
    assert_matches(*run_both(c, dtype), RTOL[dtype])


test_partial_requires_grad = conv_tests.partial_requires_grad_test(
    conv_transpose2d, F.conv_transpose2d, ["x", "w", "b", "xw", "xwb"], ((2, 4, 5, 4), (4, 3, 3, 3), (6,)),
    dict(stride=2, padding=1, output_padding=1, groups=2))


def test_is_the_adjoint_of_conv2d():
    """<conv2d(u, w), v> == <u, conv_transpose2d(v, w)> for the output size torch picks."""
    w = torch.randn(5, 3, 3, 2, dtype=torch.float64)
    v = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    conf = dict(stride=(2, 3), padding=(1, 0), dilation=(1, 2))
    y = conv_transpose2d(v, w, output_padding=(1, 2), **conf)
    u = torch.randn(y.shape, dtype=torch.float64)
    lhs = (F.conv2d(u, w, **conf) * v).sum()
    assert torch.allclose(lhs, (u * y).sum(), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Module: drop-in for torch.nn.ConvTranspose2d
# --------------------------------------------------------------------------------------------

MODULE_CONFIGS = {
    "default": (4, 6, 3, {}),
    "strided": (4, 6, 3, dict(stride=2, padding=1, output_padding=1)),
    "rect": (4, 6, (3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    "groups_no_bias": (4, 6, 3, dict(groups=2, bias=False)),
    "depthwise": (4, 8, 4, dict(stride=2, padding=1, groups=4)),
}


def make_pair(in_ch, out_ch, kernel, kwargs, seed=0):
    torch.manual_seed(seed)
    ours = cnnext.nn.ConvTranspose2d(in_ch, out_ch, kernel, **kwargs)
    torch.manual_seed(seed)
    ref = torch.nn.ConvTranspose2d(in_ch, out_ch, kernel, **kwargs)
    return ours, ref


@pytest.mark.parametrize("case", MODULE_CONFIGS)
def test_module_matches_torch(case):
    ours, ref = make_pair(*MODULE_CONFIGS[case], seed=11)
    assert isinstance(ours, torch.nn.ConvTranspose2d) and type(ours) is not torch.nn.ConvTranspose2d
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), name  # same initialisation from the same seed
    assert repr(ours) == repr(ref)
    for x in (torch.randn(2, 4, 5, 6), torch.randn(4, 5, 6)):
        xo, xr = leaf(x), leaf(x)
        yo, yr = ours(xo), ref(xr)
        assert_close_scaled(yo, yr, 1e-5, "output")
        yo.square().sum().backward()
        yr.square().sum().backward()
        assert_close_scaled(xo.grad, xr.grad, 1e-5, "grad_input")
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close_scaled(a.grad, b.grad, 1e-5, name)


@pytest.mark.parametrize("direction", ["torch_to_cnnext", "cnnext_to_torch"])
def test_module_state_dict_loads_both_ways(direction):
    ours, ref = make_pair(4, 6, 3, dict(stride=2, padding=1, groups=2), seed=0)
    src, dst = (ref, ours) if direction == "torch_to_cnnext" else (ours, ref)
    ours_out, ref_out = assert_state_dict_round_trip(src, dst, torch.randn(2, 4, 5, 5))
    assert_close_scaled(ours_out, ref_out, 1e-5)


@pytest.mark.parametrize("output_size", [[9, 9], [10, 10], [9, 10], (2, 6, 10, 9), torch.Size([10, 9])])
def test_module_output_size(output_size):
    """forward(input, output_size) picks output_padding as torch.nn.ConvTranspose2d does."""
    ours, ref = make_pair(4, 6, 3, dict(stride=2, padding=1, groups=2), seed=5)
    x = torch.randn(2, 4, 5, 5)
    y = ours(x, output_size=output_size)
    assert y.shape[-2:] == tuple(output_size)[-2:]
    assert_close_scaled(y, ref(x, output_size=output_size), 1e-5)


def test_module_output_size_unbatched():
    ours, ref = make_pair(3, 2, (3, 2), dict(stride=(3, 2)), seed=5)
    x = torch.randn(3, 4, 4)
    for size in ([12, 9], [14, 8], (2, 13, 9)):
        assert_close_scaled(ours(x, output_size=size), ref(x, output_size=size), 1e-5, str(size))


@pytest.mark.parametrize("output_size", [[8, 9], [11, 9], [9, 11], [9], [1, 2, 3, 4, 5]])
def test_module_unreachable_output_size_raises(output_size):
    ours, ref = make_pair(4, 6, 3, dict(stride=2, padding=1), seed=5)
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError) as ref_info:
        ref(x, output_size=output_size)
    with pytest.raises(ValueError, match="output_size must have|requested an output size") as info:
        ours(x, output_size=output_size)
    assert str(info.value) == str(ref_info.value)


def test_module_padding_mode_rejected_like_torch():
    with pytest.raises(ValueError, match='Only "zeros" padding mode'):
        cnnext.nn.ConvTranspose2d(4, 6, 3, padding_mode="reflect")


def test_module_double_precision_and_no_grad():
    ours, ref = make_pair(4, 6, 3, dict(stride=2, output_padding=1), seed=2)
    ours, ref = ours.double(), ref.double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = ours(x)
    assert y.dtype == torch.float64 and not y.requires_grad
    assert_close_scaled(y, ref(x).detach(), 1e-12)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def r(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


# (args of cnnext.functional.conv_transpose2d: input, weight, bias, stride, padding,
#  output_padding, groups, dilation; exception type; regex the message must match)
BAD = {
    "input_2d": ((r(5, 5), r(3, 2, 1, 1)), RuntimeError,
                 r"expected input to be 3-D \(C, H, W\) or 4-D \(N, C, H, W\), got 2-D tensor of shape \[5, 5\]"),
    "input_5d": ((r(1, 1, 3, 5, 5), r(3, 2, 1, 1)), RuntimeError,
                 r"expected input to be 3-D .* or 4-D .*got 5-D tensor of shape \[1, 1, 3, 5, 5\]"),
    "weight_3d": ((r(1, 3, 5, 5), r(3, 2, 1)), RuntimeError,
                  r"expected weight to be 4-D \(in_channels, out_channels / groups, kH, kW\), "
                  r"got 3-D tensor of shape \[3, 2, 1\]"),
    "channel_mismatch": ((r(1, 5, 5, 5), r(4, 3, 3, 3)), RuntimeError,
                         r"expected weight.size\(0\) to be in_channels = 5 \(the input's channels\), got 4 "
                         r"\(weight of shape \[4, 3, 3, 3\]\)"),
    "in_channels_not_divisible": ((r(1, 4, 5, 5), r(4, 3, 3, 3), None, 1, 0, 0, 3), RuntimeError,
                                  r"expected in_channels \(weight.size\(0\) = 4\) to be divisible by groups = 3"),
    "output_padding_equals_stride": ((r(1, 3, 5, 5), r(3, 2, 3, 3), None, 2, 0, 2), RuntimeError,
                                     r"expected output_padding to be smaller than either stride or dilation in "
                                     r"each dim, got output_padding \[2, 2\], stride \[2, 2\], dilation \[1, 1\]"),
    "output_padding_unstrided": ((r(1, 3, 5, 5), r(3, 2, 3, 3), None, 1, 0, (0, 1)), RuntimeError,
                                 r"smaller than either stride or dilation in each dim, got output_padding \[0, 1\], "
                                 r"stride \[1, 1\], dilation \[1, 1\]"),
    "output_padding_equals_dilation_and_stride": (
        (r(1, 3, 5, 5), r(3, 2, 3, 3), None, (1, 2), 0, (2, 0), 1, 2), RuntimeError,
        r"got output_padding \[2, 0\], stride \[1, 2\], dilation \[2, 2\]"),
    "output_padding_negative": ((r(1, 3, 5, 5), r(3, 2, 3, 3), None, 2, 0, (-1, 0)), RuntimeError,
                                r"expected output_padding to be non-negative, got \[-1, 0\]"),
    "padding_negative": ((r(1, 3, 5, 5), r(3, 2, 3, 3), None, 1, (0, -1)), RuntimeError,
                         r"expected padding to be non-negative, got \[0, -1\]"),
    "stride_0": ((r(1, 3, 5, 5), r(3, 2, 3, 3), None, 0), RuntimeError,
                 r"expected stride to be at least 1, got \[0, 0\]"),
    "stride_negative": ((r(1, 3, 5, 5), r(3, 2, 3, 3), None, (1, -2)), RuntimeError,
                        r"expected stride to be at least 1, got \[1, -2\]"),
    "dilation_0": ((r(1, 3, 5, 5), r(3, 2, 3, 3), None, 1, 0, 0, 1, (0, 1)), RuntimeError,
                   r"expected dilation to be at least 1, got \[0, 1\]"),
    "groups_0": ((r(1, 3, 5, 5), r(3, 2, 3, 3), None, 1, 0, 0, 0), RuntimeError,
                 r"expected groups to be at least 1, got 0"),
    "groups_negative": ((r(1, 3, 5, 5), r(3, 2, 3, 3), None, 1, 0, 0, -1), RuntimeError,
                        r"expected groups to be at least 1, got -1"),
    "output_too_small": ((r(1, 3, 1, 1), r(3, 2, 3, 3), None, 1, 2), RuntimeError,
                         r"expected a non-empty output, got output size -1 x -1 \(input 1 x 1, kernel 3 x 3, "
                         r"stride \[1, 1\], padding \[2, 2\], output_padding \[0, 0\], dilation \[1, 1\]\)"),
    "output_empty_one_dim": ((r(1, 3, 2, 4), r(3, 2, 1, 3), None, 1, (1, 0)), RuntimeError,
                             r"expected a non-empty output, got output size 0 x 6 \(input 2 x 4, kernel 1 x 3,"),
    "empty_height": ((r(1, 3, 0, 5), r(3, 2, 3, 3)), RuntimeError,
                     r"expected input to have non-zero height and width, got input of shape \[1, 3, 0, 5\]"),
    "empty_kernel": ((r(1, 3, 5, 5), r(3, 2, 0, 1)), RuntimeError,
                     r"non-empty kernel, got weight of shape \[3, 2, 0, 1\]"),
    "no_out_channels": ((r(1, 3, 5, 5), r(3, 0, 1, 1)), RuntimeError,
                        r"at least one input and one output channel.*got weight of shape \[3, 0, 1, 1\]"),
    "weight_dtype": ((r(1, 3, 5, 5), r(3, 2, 1, 1, dtype=torch.float64)), RuntimeError,
                     r"expected weight to have the same dtype as input \(Float\), got Double"),
    "bias_dtype": ((r(1, 3, 5, 5, dtype=torch.float64), r(3, 2, 1, 1, dtype=torch.float64), r(2)), RuntimeError,
                   r"expected bias to have the same dtype as input \(Double\), got Float"),
    "bias_size": ((r(1, 3, 5, 5), r(3, 2, 1, 1), r(3)), RuntimeError,
                  r"expected bias to be 1-D of size out_channels = 2 \(weight.size\(1\) \* groups\), got shape \[3\]"),
    "bias_size_groups": ((r(1, 4, 5, 5), r(4, 3, 1, 1), r(3), 1, 0, 0, 2), RuntimeError,
                         r"expected bias to be 1-D of size out_channels = 6 .*got shape \[3\]"),
    "bias_2d": ((r(1, 3, 5, 5), r(3, 2, 1, 1), r(1, 2)), RuntimeError,
                r"expected bias to be 1-D of size out_channels = 2 .*got shape \[1, 2\]"),
    "int64_cpu": ((torch.ones(1, 3, 5, 5, dtype=torch.int64), torch.ones(3, 2, 1, 1, dtype=torch.int64)),
                  NotImplementedError, r"expected input to be float16, bfloat16, float32 or float64, got Long on cpu"),
    "groups_float": ((r(1, 4, 5, 5), r(4, 2, 1, 1), None, 1, 0, 0, 2.0), TypeError,
                     r"expected groups to be an int, got 2.0"),
    "stride_3_values": ((r(1, 3, 5, 5), r(3, 2, 1, 1), None, (1, 1, 1)), RuntimeError,
                        r"expected stride to be an int or a pair of ints, got \(1, 1, 1\)"),
    "output_padding_float": ((r(1, 3, 5, 5), r(3, 2, 1, 1), None, 2, 0, 0.5), TypeError,
                             r"expected output_padding to be an int or a pair of ints, got 0.5"),
    "padding_string": ((r(1, 3, 5, 5), r(3, 2, 1, 1), None, 1, "same"), TypeError,
                       r"expected padding to be an int or a pair of ints, got 'same'"),
}


BAD_OPS = {
    "op_output_padding_3_values": (
        lambda: ops.conv_transpose2d(r(1, 3, 5, 5), r(3, 2, 1, 1), None, [2, 2], [0, 0], [1, 1, 1], 1, [1, 1]),
        RuntimeError, r"conv_transpose2d: expected output_padding to be a single integer or a pair, got 3 values"),
    "op_dilation_1_value": (
        lambda: ops.conv_transpose2d(r(1, 3, 5, 5), r(3, 2, 1, 1), None, [1, 1], [0, 0], [0, 0], 1, [1]),
        RuntimeError, r"conv_transpose2d: expected dilation to be a single integer or a pair, got 1 values \[1\]"),
}


# integer inputs torch computes in on the CPU, and a bias of another dtype it
# converts (torch 2.13's CPU conv_transpose2d); cnnext rejects them by design, as its conv2d does.
test_bad_input, test_torch_rejects_too, test_bad_op_input = conv_tests.bad_input_tests(
    conv_transpose2d, F.conv_transpose2d, "conv_transpose2d", BAD,
    [case for case in BAD if not case.endswith("_cpu") and case != "bias_dtype"], BAD_OPS)


# --------------------------------------------------------------------------------------------
# opcheck and fake kernel
# --------------------------------------------------------------------------------------------

# (input shape, weight shape, stride, padding, output_padding, dilation, groups, input layout,
#  weight layout)
OPCHECK = {
    "basic": ((2, 3, 4, 5), (3, 4, 3, 3), [1, 1], [0, 0], [0, 0], [1, 1], 1, "contiguous", "contiguous"),
    "strided_grouped": ((2, 4, 4, 3), (4, 3, 2, 3), [2, 1], [1, 1], [1, 0], [1, 2], 2, "contiguous", "contiguous"),
    "output_padding_below_dilation": ((1, 2, 4, 3), (2, 3, 3, 2), [1, 1], [1, 0], [1, 1], [2, 2], 1, "contiguous",
                                      "contiguous"),
    "channels_last_input": ((2, 3, 4, 5), (3, 4, 3, 3), [2, 2], [1, 1], [1, 0], [1, 1], 1, "channels_last",
                            "contiguous"),
    "channels_last_weight": ((2, 4, 4, 4), (4, 1, 3, 3), [1, 1], [1, 1], [0, 0], [1, 1], 4, "contiguous",
                             "channels_last"),
    "sliced_input": ((2, 3, 4, 5), (3, 2, 1, 1), [1, 1], [0, 0], [0, 0], [1, 1], 1, "sliced", "contiguous"),
    "unbatched": ((3, 4, 5), (3, 2, 2, 2), [2, 1], [1, 0], [1, 0], [1, 1], 1, "contiguous", "contiguous"),
    "empty_batch": ((0, 3, 4, 4), (3, 2, 3, 3), [1, 1], [1, 1], [0, 0], [1, 1], 1, "contiguous", "contiguous"),
}


def opcheck_args(case, requires_grad, bias=True):
    xshape, wshape, stride, padding, output_padding, dilation, groups, x_layout, w_layout = OPCHECK[case]
    x = to_layout(torch.randn(xshape, dtype=torch.float64), x_layout).requires_grad_(requires_grad)
    w = to_layout(torch.randn(wshape, dtype=torch.float64), w_layout).requires_grad_(requires_grad)
    b = torch.randn(wshape[1] * groups, dtype=torch.float64).requires_grad_(requires_grad) if bias else None
    return (x, w, b, stride, padding, output_padding, groups, dilation)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", OPCHECK)
def test_opcheck(case, requires_grad, bias):
    results = torch.library.opcheck(ops.conv_transpose2d.default, opcheck_args(case, requires_grad, bias))
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("case", OPCHECK)
def test_fake_kernel_metadata(case):
    """The fake kernel states the real output's shape, strides and dtype exactly (the Python
    output-size math in cnnext/_shapes.py agrees with csrc/common/conv2d.h)."""
    args = opcheck_args(case, False)
    real = ops.conv_transpose2d(*args)
    with FakeTensorMode() as mode:
        fake = ops.conv_transpose2d(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert fake.shape == real.shape
    assert fake.stride() == real.stride()
    assert fake.dtype == real.dtype


def _net(conv, relu):
    """Two transposed convolutions (the second grouped): cnnext's or stock torch's."""
    return lambda x, w1, b1, w2: conv(relu(conv(x, w1, b1, stride=2, padding=1, output_padding=1)), w2, None,
                                      groups=2)


test_torch_compile_dynamic_shapes = conv_tests.compile_dynamic_shapes_test(
    _net(conv_transpose2d, torch.relu), _net(F.conv_transpose2d, torch.relu), [(3, 4, 3, 3), (4,), (4, 1, 2, 3)],
    [(2, 3, 5, 4), (3, 3, 6, 7)], "Symbolic sizes through the fake kernel (aot_eager: no code generation).")


# --------------------------------------------------------------------------------------------
# Every device: against F.conv_transpose2d in float64 on the CPU from the very values the
# run sees and, on CUDA, against cnnext's CPU backend
# --------------------------------------------------------------------------------------------

DEVICE_RTOL = TOLERANCES["device_conv"]

# (N, C_in, H, W), out_channels, (kH, kW), stride, padding, output_padding, dilation, groups, bias
DEVICE_CONFIGS = [
    ((2, 3, 5, 6), 4, (3, 3), 1, 0, 0, 1, 1, True),
    ((2, 4, 6, 5), 6, (3, 2), (2, 1), (1, 0), (1, 0), (1, 2), 2, True),
    ((2, 6, 5, 5), 6, (4, 4), 2, 1, 0, 1, 6, False),           # depthwise, doubling
    ((1, 4, 5, 4), 4, (3, 3), 1, 1, (1, 1), 2, 1, True),        # output_padding >= stride (< dilation)
    ((3, 5, 4, 4), 7, (1, 1), 2, 0, 1, 1, 1, True),             # pointwise, strided
    ((4, 16, 14, 14), 8, (4, 4), 2, 1, 0, 1, 1, True),          # several blocks
]


def transpose_id(cfg):
    shape, o, k, s, p, op, d, g, b = cfg
    return f"x{'x'.join(map(str, shape))}-o{o}-k{k[0]}x{k[1]}-s{s}-p{p}-op{op}-d{d}-g{g}-{'bias' if b else 'nobias'}"


def transpose_run(fn, x, w, b, gy, conf):
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    out = outputs_and_grads(lambda *t: fn(*t, *conf) if b is not None else fn(*t, None, *conf), leaves, gy)
    return (out[0].detach(), *out[1:])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("device, dtype", device_dtypes())
@pytest.mark.parametrize("cfg", DEVICE_CONFIGS, ids=transpose_id)
@pytest.mark.usefixtures("strict_fp32")
def test_parity_on_device(cfg, device, dtype, layout):
    """Forward and every gradient against F.conv_transpose2d (float64 CPU) and, on CUDA for
    float32 and float64, against cnnext's CPU backend."""
    shape, o, (kh, kw), s, p, op, d, g, has_bias = cfg
    conf = (s, p, op, g, d)
    rnd = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731
    x = rnd(torch.randn(shape, dtype=torch.float64))
    w = rnd(torch.randn(shape[1], o // g, kh, kw, dtype=torch.float64))
    b = rnd(torch.randn(o, dtype=torch.float64)) if has_bias else None
    gy = rnd(torch.randn(F.conv_transpose2d(x, w, b, *conf).shape, dtype=torch.float64))
    ref = transpose_run(F.conv_transpose2d, x, w, b, gy, conf)
    dev = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    out = transpose_run(conv_transpose2d, to_layout(dev(x), layout), dev(w), dev(b),
                        to_layout(dev(gy), "permuted"), conf)
    for name, got, want in zip(GRAD_NAMES, out, ref):
        assert got.device.type == device and got.dtype == dtype, name
        assert_close_to_reference(got, want, DEVICE_RTOL[dtype], f"{name} vs F.conv_transpose2d")
    if device != "cpu" and dtype in (torch.float32, torch.float64):
        cpu = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        out_cpu = transpose_run(conv_transpose2d, to_layout(cpu(x), layout), cpu(w), cpu(b),
                                to_layout(cpu(gy), "permuted"), conf)
        for name, got, want in zip(GRAD_NAMES, out, out_cpu):
            assert_close_to_reference(got, want.double(), DEVICE_RTOL[dtype], f"{name} vs cnnext CPU")
        assert is_channels_last(out[0]) == is_channels_last(out_cpu[0])


@pytest.mark.parametrize("device, dtype", device_dtypes())
def test_unbatched_and_empty_on_device(device, dtype):
    w = torch.randn(4, 3, 3, 3, device=device, dtype=dtype)
    b = torch.randn(6, device=device, dtype=dtype)
    x = torch.randn(4, 5, 6, device=device, dtype=dtype)
    got = conv_transpose2d(x, w, b, 2, 1, 1, 2)
    want = F.conv_transpose2d(x.double().cpu(), w.double().cpu(), b.double().cpu(), 2, 1, 1, 2)
    assert got.dim() == 3
    assert_close_to_reference(got, want, DEVICE_RTOL[dtype], "unbatched")
    empty = conv_transpose2d(torch.randn(0, 4, 5, 6, device=device, dtype=dtype), w, b, 2, 1, 1, 2)
    assert empty.shape == (0, 6, 10, 12) and empty.device.type == device


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("device", cuda_only())  # on the CPU: the tests above
def test_gradcheck_and_opcheck_on_device(device):
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 2, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    conf = ([2, 1], [1, 0], [1, 0], 2, [1, 2])
    fn = lambda x, w, b: conv_transpose2d(x, w, b, *conf)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    torch.library.opcheck(ops.conv_transpose2d.default, (x, w, b, *conf))
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(ops.conv_transpose2d.default, (xcl, w, b, *conf))


test_mixed_devices_raise = conv_tests.mixed_devices_test(conv_transpose2d, (2, 3, 3, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.usefixtures("strict_fp32")
def test_half_types_module(device, dtype):
    mod = cnnext.nn.ConvTranspose2d(8, 16, 4, stride=2, padding=1, groups=2).to(device, dtype)
    x = torch.randn(4, 8, 7, 7, device=device).to(dtype)
    want = F.conv_transpose2d(x.double().cpu(), mod.weight.double().cpu(), mod.bias.double().cpu(), 2, 1, 0, 2)
    got = mod(x, output_size=[14, 14])
    assert got.dtype == dtype
    assert_close_to_reference(got, want, DEVICE_RTOL[dtype], "ConvTranspose2d output")


@pytest.mark.parametrize("math", IGEMM_MATHS, ids=igemm_math_id)
@pytest.mark.parametrize("device", sm80_only())
def test_igemm_uses_input_backward(device, math, igemm):
    """conv_transpose2d through the CUDA implicit GEMM's input backward."""
    dtype, fmath = math
    igemm(fmath)
    x, w, b = rounded(dtype, (2, 32, 7, 9), (32, 24, 4, 4), (24,))
    got = conv_transpose2d(x.to(device), w.to(device), b.to(device), 2, 1)
    xr, wr = (tf32(t) if fmath == "tf32" else t for t in (x, w))
    want = F.conv_transpose2d(xr.double(), wr.double(), b.double(), 2, 1)
    rtol = TOLERANCES["device_igemm"]
    assert_close_to_reference(got, want, rtol[fmath] if dtype == torch.float32 else rtol[dtype], "conv_transpose2d")
