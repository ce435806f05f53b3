"""cnnext.functional.conv2d and the torch.ops.cnnext conv2d ops against torch.nn.functional.conv2d."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import cnnext
from cnnext.functional import conv2d
from cnnext.testing import (GRAD_NAMES, IGEMM_MATHS, LAYOUTS, RTOL, TOLERANCES, ConvConf, Parity, assert_close_scaled,
                            assert_close_to_reference, assert_matches, cpu_and_cuda, cuda_only, device_dtypes,
                            igemm_math_id, is_channels_last, leaf, needs_cuda, outputs_and_grads, pair, sm80_only,
                            tf32, to_layout)
import conv_tests
from strategies import conv_conf, group_channels, pair_arg

ops = torch.ops.cnnext


# --------------------------------------------------------------------------------------------
# float64 gradcheck / gradgradcheck grid
# --------------------------------------------------------------------------------------------

# (input shape, weight shape, bias, stride, padding, dilation, groups, input layout)
GRID = {
    "basic": ((2, 3, 6, 5), (4, 3, 3, 3), True, 1, 0, 1, 1, "contiguous"),
    "no_bias": ((2, 3, 6, 5), (4, 3, 3, 3), False, 1, 0, 1, 1, "contiguous"),
    "stride2_pad1": ((2, 3, 7, 6), (4, 3, 3, 3), True, 2, 1, 1, 1, "contiguous"),
    "rect_kernel_rect_args": ((1, 2, 7, 8), (3, 2, 2, 3), True, (2, 1), (1, 2), 1, 1, "contiguous"),
    "dilation2": ((2, 2, 7, 7), (3, 2, 3, 3), True, 1, 2, 2, 1, "contiguous"),
    "rect_dilation_stride": ((1, 2, 8, 9), (2, 2, 3, 2), False, (1, 2), (0, 1), (2, 3), 1, "contiguous"),
    "odd_sizes": ((1, 3, 7, 9), (2, 3, 3, 5), True, (3, 2), (2, 1), (1, 2), 1, "contiguous"),
    "stride_gt_kernel": ((2, 2, 9, 8), (3, 2, 2, 2), True, 3, 0, 1, 1, "contiguous"),
    "groups2": ((2, 4, 5, 6), (6, 2, 3, 3), True, 1, 1, 1, 2, "contiguous"),
    "groups2_strided": ((1, 4, 7, 6), (4, 2, 3, 2), False, 2, (1, 0), (1, 2), 2, "contiguous"),
    "depthwise": ((2, 3, 6, 6), (3, 1, 3, 3), True, 1, 1, 1, 3, "contiguous"),
    "depthwise_multiplier": ((1, 3, 7, 6), (6, 1, 3, 3), True, 2, 1, 1, 3, "contiguous"),
    "pointwise": ((2, 4, 5, 3), (3, 4, 1, 1), True, 1, 0, 1, 1, "contiguous"),
    "pointwise_groups": ((2, 4, 5, 3), (6, 2, 1, 1), True, 1, 0, 1, 2, "contiguous"),
    "same_odd_kernel": ((2, 2, 5, 6), (3, 2, 3, 3), True, 1, "same", 1, 1, "contiguous"),
    "same_even_kernel": ((2, 2, 5, 6), (3, 2, 4, 2), True, 1, "same", 1, 1, "contiguous"),
    "same_even_kernel_dilated": ((1, 2, 7, 6), (2, 2, 2, 4), False, 1, "same", (3, 1), 1, "contiguous"),
    "same_groups": ((1, 4, 5, 5), (4, 2, 2, 3), True, 1, "same", 1, 2, "contiguous"),
    "valid": ((2, 2, 5, 6), (3, 2, 2, 3), True, 1, "valid", 1, 1, "contiguous"),
    "kernel_fills_padded_input": ((2, 2, 3, 4), (3, 2, 5, 4), True, 1, (1, 0), 1, 1, "contiguous"),
    "unbatched": ((3, 6, 5), (4, 3, 3, 2), True, (1, 2), 1, 1, 1, "contiguous"),
    "unbatched_same_even": ((2, 5, 6), (3, 2, 2, 4), True, 1, "same", 1, 1, "contiguous"),
    "channels_last": ((2, 3, 6, 5), (4, 3, 3, 3), True, (2, 1), 1, 1, 1, "channels_last"),
    "channels_last_depthwise": ((2, 4, 5, 5), (4, 1, 3, 3), True, 1, 1, 1, 4, "channels_last"),
    "channels_last_pointwise": ((2, 4, 3, 5), (3, 4, 1, 1), True, 1, 0, 1, 1, "channels_last"),
    "sliced": ((2, 3, 6, 5), (4, 3, 3, 3), True, 2, 1, (2, 1), 1, "sliced"),
    "sliced_pointwise": ((2, 3, 6, 5), (4, 3, 1, 1), True, 1, 0, 1, 1, "sliced"),
    "permuted": ((1, 2, 6, 7), (2, 2, 3, 3), True, 1, "same", 1, 1, "permuted"),
}


def grid_inputs(case):
    xshape, wshape, bias, stride, padding, dilation, groups, layout = GRID[case]
    x = leaf(torch.randn(xshape, dtype=torch.float64), layout)
    w = leaf(torch.randn(wshape, dtype=torch.float64))
    tensors = (x, w, leaf(torch.randn(wshape[0], dtype=torch.float64))) if bias else (x, w)
    return tensors, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


test_gradcheck, test_gradgradcheck = conv_tests.gradcheck_tests(conv2d, F.conv2d, GRID, grid_inputs)


# The backward ops' own autograd formulas (the pieces double backward is made of).
BACKWARD_GRID = {
    "basic": ((2, 3, 6, 5), (4, 3, 3, 3), 1, 0, 1, 1),
    "strided_dilated_padded": ((1, 2, 8, 7), (3, 2, 2, 3), (2, 1), (1, 2), (2, 1), 1),
    "groups": ((2, 4, 5, 5), (6, 2, 3, 1), 1, 1, 1, 2),
    "pointwise": ((2, 3, 4, 3), (2, 3, 1, 1), 1, 0, 1, 1),
    "unbatched": ((2, 5, 6), (3, 2, 3, 3), 2, 1, 1, 1),
}


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("op_name", ["conv2d_input_backward", "conv2d_weight_backward"])
@pytest.mark.parametrize("case", BACKWARD_GRID)
def test_backward_ops_gradcheck(op_name, case):
    xshape, wshape, stride, padding, dilation, groups = BACKWARD_GRID[case]
    conf = (pair(stride), pair(padding), pair(dilation), groups)
    x = torch.randn(xshape, dtype=torch.float64)
    w = torch.randn(wshape, dtype=torch.float64)
    g = leaf(torch.randn(ops.conv2d(x, w, None, *conf).shape, dtype=torch.float64))
    if op_name == "conv2d_input_backward":
        fn = lambda g, w: ops.conv2d_input_backward(g, w, list(xshape), *conf)  # noqa: E731
        args = (g, leaf(w))
    else:
        fn = lambda g, x: ops.conv2d_weight_backward(g, x, list(wshape), *conf)  # noqa: E731
        args = (g, leaf(x))
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.usefixtures("single_thread")
def test_channel_sum_gradcheck():
    for shape in [(2, 3, 4, 5), (3, 4, 2)]:
        t = leaf(torch.randn(shape, dtype=torch.float64))
        assert torch.autograd.gradcheck(ops.channel_sum, (t,))
        assert torch.autograd.gradgradcheck(ops.channel_sum, (t,))


test_double_backward_matches_torch = conv_tests.double_backward_test(
    conv2d, F.conv2d, ((2, 4, 7, 6), (6, 2, 3, 2), (6,)), dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2),
    "Gradient of a gradient norm (what gradient-penalty training does) equals torch's.")


# --------------------------------------------------------------------------------------------
# Random configurations: parity with torch.nn.functional.conv2d, forward and every gradient
# --------------------------------------------------------------------------------------------

@st.composite
def conv_confs(draw, batch=st.sampled_from([0, 1, 2, 3, None])):
    groups, cg, og = group_channels(draw, deep=((8, 20), (13, 30)))
    pointwise = draw(st.integers(0, 4)) == 0  # 1x1 kernels, which have a path of their own
    kernel = [1, 1] if pointwise else [draw(st.integers(1, 4)), draw(st.integers(1, 4))]
    dilation = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    pad_kind = draw(st.sampled_from(["valid", "valid"] if pointwise else ["explicit", "explicit", "same", "valid"]))
    if pad_kind == "same":
        stride, padding = [1, 1], "same"
        pads = [d * (k - 1) / 2 for k, d in zip(kernel, dilation)]
    else:
        stride = [1, 1] if pointwise and draw(st.booleans()) else [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
        pads = [0, 0] if pad_kind == "valid" else [draw(st.integers(0, 3)), draw(st.integers(0, 3))]
        padding = "valid" if pad_kind == "valid" else pair_arg(draw, pads)
    # Spatial sizes from the smallest the dilated kernel fits in up to a few more.
    spatial = []
    for k, d, p in zip(kernel, dilation, pads):
        smallest = max(1, d * (k - 1) + 1 - int(2 * p))
        spatial.append(draw(st.integers(smallest, smallest + 7)))
    n = draw(batch)
    xshape = (groups * cg, *spatial) if n is None else (n, groups * cg, *spatial)
    kw = dict(stride=pair_arg(draw, stride), padding=padding, dilation=pair_arg(draw, dilation), groups=groups)
    return conv_conf(draw, xshape, (groups * og, cg, *kernel), kw)


PARITY = Parity(conv2d, F.conv2d, bias_size=lambda c: c.wshape[0])
run_both, check_parity = PARITY.run_both, PARITY.check


test_parity_float64, test_parity_float32, test_parity_empty_batch = conv_tests.parity_tests(check_parity, conv_confs)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_string_padding_output_shape(padding, dtype):
    """'same' keeps H x W for every kernel parity and dilation, 'valid' is padding 0."""
    x = torch.randn(2, 3, 9, 10, dtype=dtype)
    for kh, kw, dil in [(1, 1, 1), (3, 3, 1), (4, 2, 1), (2, 5, 2), (3, 4, (2, 3))]:
        w = torch.randn(4, 3, kh, kw, dtype=dtype)
        out = conv2d(x, w, padding=padding, dilation=dil)
        ref = F.conv2d(x, w, padding=padding, dilation=dil)
        if padding == "same":
            assert out.shape == (2, 4, 9, 10)
        assert_close_scaled(out, ref, RTOL[dtype], f"{padding} {kh}x{kw} dilation {dil}")


# Large enough for the CPU backend to cut each sample into several bands of output rows
# (its column buffer holds 2**18 elements) and to run items on several threads; and with
# GEMM sizes past the float32 sgemm's blocking (tiles of 12 x 32, K in blocks of 256) and
# not multiples of it.
BANDS = {
    "deep_k": ((2, 40, 20, 21), (30, 40, 3, 3), 1, 1, 1, 1),                    # K = 360
    "deep_k_strided": ((2, 33, 17, 19), (13, 33, 3, 3), 2, 1, 1, 1),            # K = 297
    "deep_k_groups": ((1, 64, 12, 13), (26, 32, 3, 3), 1, 2, (2, 1), 2),        # K = 288 per group
    "wide_out_pointwise": ((1, 20, 9, 11), (300, 20, 1, 1), 1, 0, 1, 1),        # Og = 300
    "wide_out": ((2, 8, 7, 9), (270, 8, 2, 2), 1, 0, 1, 1),
    "same_3x3": ((2, 16, 66, 70), (24, 16, 3, 3), 1, 1, 1, 1),
    "strided_dilated": ((2, 16, 67, 70), (24, 16, 3, 4), (2, 1), (1, 2), (2, 1), 1),
    "grouped": ((1, 32, 64, 66), (32, 16, 3, 3), 1, 1, 1, 2),
    "pointwise": ((2, 64, 40, 40), (32, 64, 1, 1), 1, 0, 1, 1),
    "depthwise": ((2, 32, 40, 41), (32, 1, 5, 5), (1, 2), 2, 1, 32),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", BANDS)
def test_parity_large(case, dtype, layout):
    xshape, wshape, stride, padding, dilation, groups = BANDS[case]
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    c = ConvConf(xshape, wshape, True, kw, layout, "contiguous", layout, seed=3)
    assert_matches(*run_both(c, dtype), RTOL[dtype])


test_partial_requires_grad = conv_tests.partial_requires_grad_test(
    conv2d, F.conv2d, ["x", "w", "b", "xw", "xb", "wb", "xwb"], ((2, 4, 6, 5), (6, 2, 3, 3), (6,)),
    dict(padding=1, groups=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", [1, 3])
def test_operands_requiring_grad_on_worker_threads(kernel, dtype):
    """The CPU kernels call ATen ops (mm_out, views) on worker threads of at::parallel_for,
    which do not inherit the caller's grad mode: those calls must not see the operands as
    tensors to record autograd for ("mm(): functions with out=... arguments don't support
    automatic differentiation, but one of the arguments requires grad")."""
    x0, w0, b0 = (torch.randn(4, 8, 9, 9, dtype=dtype), torch.randn(12, 8, kernel, kernel, dtype=dtype),
                  torch.randn(12, dtype=dtype))
    results = []
    for f in (conv2d, F.conv2d):
        x, w, b = leaf(x0), leaf(w0), leaf(b0)
        y = f(x, w, b, padding=kernel // 2)
        results.append((y, *torch.autograd.grad(y.square().sum(), (x, w, b))))
    for a, e, name in zip(*results, GRAD_NAMES):
        assert_close_scaled(a, e, 10 * RTOL[dtype], name)
    # The ops called directly with every tensor requiring grad, grad mode on.
    g, w = leaf(results[0][0].detach()), leaf(w0)
    conf = ([1, 1], [kernel // 2] * 2, [1, 1], 1)
    gx = ops.conv2d_input_backward(g, w, list(x0.shape), *conf)
    assert gx.requires_grad
    assert_close_scaled(gx, torch.nn.grad.conv2d_input(x0.shape, w0, g.detach(), *conf), 10 * RTOL[dtype])
    gw = ops.conv2d_weight_backward(g, leaf(x0), list(w0.shape), *conf)
    assert_close_scaled(gw, torch.nn.grad.conv2d_weight(x0, w0.shape, g.detach(), *conf), 10 * RTOL[dtype])


def test_no_grad_output_has_no_graph():
    x, w = torch.randn(1, 2, 4, 4, requires_grad=True), torch.randn(3, 2, 2, 2, requires_grad=True)
    with torch.no_grad():
        y = conv2d(x, w)
    assert not y.requires_grad and y.grad_fn is None
    torch.testing.assert_close(y, F.conv2d(x, w).detach())


def test_expanded_operands():
    """Stride-0 (broadcast) input, weight and bias, as torch accepts them."""
    x = torch.randn(1, 3, 1, 6, dtype=torch.float64).expand(4, 3, 5, 6)
    w = torch.randn(1, 3, 2, 2, dtype=torch.float64).expand(5, 3, 2, 2)
    b = torch.randn(1, dtype=torch.float64).expand(5)
    for kw in [dict(), dict(padding=1, stride=2), dict(padding="same")]:
        assert_close_scaled(conv2d(x, w, b, **kw), F.conv2d(x, w, b, **kw), 1e-12, str(kw))
    xw = torch.randn(2, 6, 1, 1, dtype=torch.float64).expand(2, 6, 4, 5)  # pointwise path
    wp = torch.randn(4, 6, 1, 1, dtype=torch.float64)
    assert_close_scaled(conv2d(xw, wp), F.conv2d(xw, wp), 1e-12)


def test_inputs_not_modified():
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3), torch.randn(4)
    copies = [t.clone() for t in (x, w, b)]
    g = torch.randn(2, 4, 6, 6)
    conv2d(x, w, b, padding=1, groups=4)
    ops.conv2d_input_backward(g, w, list(x.shape), [1, 1], [1, 1], [1, 1], 4)
    ops.conv2d_weight_backward(g, x, list(w.shape), [1, 1], [1, 1], [1, 1], 4)
    for t, c in zip((x, w, b), copies):
        assert torch.equal(t, c)


# --------------------------------------------------------------------------------------------
# Output memory format
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", [1, "same"])
@pytest.mark.parametrize("w_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_output_memory_format(x_layout, w_layout, padding, dtype):
    x0 = torch.randn(2, 4, 7, 6, dtype=dtype)
    w0 = torch.randn(6, 4, 4, 3, dtype=dtype)  # even kH: 'same' takes the drop-a-row path
    gy = to_layout(torch.randn(2, 6, 7 if padding == "same" else 6, 6, dtype=dtype), "channels_last")
    results = []
    for f in (conv2d, F.conv2d):
        x, w = leaf(x0, x_layout), leaf(w0, w_layout)
        y = f(x, w, padding=padding)
        y.backward(gy)
        results.append((y, x.grad, w.grad))
    expect_cl = "channels_last" in (x_layout, w_layout)
    for ours, ref, name in zip(*results, ["output", "grad_input", "grad_weight"]):
        assert_close_scaled(ours, ref, RTOL[dtype], name)
        assert ours.is_contiguous() == ref.is_contiguous(), name
        assert is_channels_last(ours) == is_channels_last(ref), name
    assert is_channels_last(results[0][0]) == expect_cl
    assert results[0][0].is_contiguous() == (not expect_cl)


def test_unbatched_channels_last_like_output_layout():
    x = to_layout(torch.randn(4, 7, 6), "channels_last")
    w = torch.randn(5, 4, 3, 3)
    ours, ref = conv2d(x, w), F.conv2d(x, w)
    torch.testing.assert_close(ours, ref)
    assert ours.stride() == ref.stride()


def _grad_layout_params():
    out = []
    for x_layout in ("contiguous", "channels_last"):
        for w_layout in ("contiguous", "channels_last"):
            out.append(pytest.param(x_layout, w_layout, id=f"{x_layout}-{w_layout}"))
    return out


def _grads_of_both(x_layout, w_layout, wshape):
    """torch.autograd.grad (no AccumulateGrad re-striding) with grad_output in the layout of the
    output, as the next layer of a network hands it back."""
    x0, w0 = torch.randn(2, 4, 7, 6, dtype=torch.float64), torch.randn(wshape, dtype=torch.float64)
    results = []
    for f in (conv2d, F.conv2d):
        gen = torch.Generator().manual_seed(1)
        x, w = leaf(x0, x_layout), leaf(w0, w_layout)
        y = f(x, w, padding=1)
        gy = torch.empty_like(y).copy_(torch.randn(y.shape, dtype=y.dtype, generator=gen))  # y's layout
        assert gy.stride() == y.stride()
        results.append(torch.autograd.grad(y, (x, w), gy))
    for a, e in zip(*results):
        assert_close_scaled(a, e, 1e-12)
    return results


@pytest.mark.parametrize("x_layout, w_layout", _grad_layout_params())
def test_grad_input_memory_format(x_layout, w_layout):
    (gx, _), (ref_gx, _) = _grads_of_both(x_layout, w_layout, (6, 4, 3, 3))
    assert gx.stride() == ref_gx.stride()


@pytest.mark.parametrize("x_layout, w_layout", _grad_layout_params())
def test_grad_weight_memory_format(x_layout, w_layout):
    (_, gw), (_, ref_gw) = _grads_of_both(x_layout, w_layout, (6, 4, 3, 3))
    assert gw.stride() == ref_gw.stride()


@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_grad_input_memory_format_pointwise(x_layout):
    """1x1 kernels take a backward path of their own: grad_input keeps the layout there too."""
    x0, w0 = torch.randn(2, 8, 5, 6, dtype=torch.float64), torch.randn(6, 8, 1, 1, dtype=torch.float64)
    grads = []
    for f in (conv2d, F.conv2d):
        x, w = leaf(x0, x_layout), leaf(w0)
        y = f(x, w)
        grads.append(torch.autograd.grad(y, x, to_layout(torch.ones(y.shape, dtype=y.dtype), x_layout))[0])
    assert_close_scaled(grads[0], grads[1], 1e-12)
    assert grads[0].stride() == grads[1].stride()


# --------------------------------------------------------------------------------------------
# The backward ops called directly
# --------------------------------------------------------------------------------------------

# (input shape, weight shape, stride, padding, dilation, groups)
DIRECT = {
    "basic": ((2, 3, 7, 6), (4, 3, 3, 3), 1, 0, 1, 1),
    "strided_padded_dilated": ((2, 2, 9, 8), (3, 2, 2, 3), (2, 3), (1, 2), (2, 1), 1),
    "stride_leaves_rows_unread": ((1, 2, 9, 8), (2, 2, 2, 2), 3, 0, 1, 1),
    "gemm_path": ((2, 4, 6, 7), (6, 4, 3, 2), (1, 2), 1, (2, 1), 1),
    "groups": ((2, 4, 6, 5), (6, 2, 3, 1), 1, 1, 1, 2),
    "depthwise": ((3, 3, 5, 5), (6, 1, 3, 3), 2, 1, 1, 3),
    "pointwise": ((2, 4, 3, 5), (6, 4, 1, 1), 1, 0, 1, 1),
    "pointwise_thin": ((2, 4, 3, 5), (2, 4, 1, 1), 1, 0, 1, 1),
    "pointwise_strided": ((2, 4, 5, 5), (2, 4, 1, 1), 2, 0, 1, 1),
    "empty_batch": ((0, 3, 5, 5), (2, 3, 3, 3), 1, 1, 1, 1),
}
GRAD_LAYOUTS = LAYOUTS + ("expanded_scalar", "expanded_channel")


def make_grad_output(shape, layout, dtype):
    if layout == "expanded_scalar":
        return torch.randn((), dtype=dtype).expand(shape)
    if layout == "expanded_channel":
        return torch.randn(shape[1], 1, 1, dtype=dtype).expand(shape)
    return to_layout(torch.randn(shape, dtype=dtype), layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("g_layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("case", DIRECT)
def test_backward_ops_match_torch(case, g_layout, dtype):
    xshape, wshape, stride, padding, dilation, groups = DIRECT[case]
    conf = (pair(stride), pair(padding), pair(dilation), groups)
    x = torch.randn(xshape, dtype=dtype)
    w = torch.randn(wshape, dtype=dtype)
    yshape = F.conv2d(x, w, None, *conf).shape
    g = make_grad_output(yshape, g_layout, dtype)
    rtol = RTOL[dtype]

    gx = ops.conv2d_input_backward(g, w, list(xshape), *conf)
    assert_close_scaled(gx, torch.nn.grad.conv2d_input(xshape, w, g, *conf), rtol, "input_backward")
    gw = ops.conv2d_weight_backward(g, x, list(wshape), *conf)
    assert_close_scaled(gw, torch.nn.grad.conv2d_weight(x, wshape, g, *conf), rtol, "weight_backward")
    assert_close_scaled(ops.channel_sum(g), g.sum((0, 2, 3)), rtol, "channel_sum")
    if xshape[0] == 0:
        assert torch.count_nonzero(gw) == 0 and torch.count_nonzero(ops.channel_sum(g)) == 0


@pytest.mark.parametrize("x_layout", LAYOUTS)
def test_weight_backward_input_layouts(x_layout):
    conf = ([2, 1], [1, 1], [1, 2], 1)
    x0 = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64)
    g = torch.randn(F.conv2d(x0, w, None, *conf).shape, dtype=torch.float64)
    ours = ops.conv2d_weight_backward(g, to_layout(x0, x_layout), list(w.shape), *conf)
    assert_close_scaled(ours, torch.nn.grad.conv2d_weight(x0, w.shape, g, *conf), 1e-12)


def test_backward_ops_unbatched():
    conf = ([1, 2], [1, 0], [1, 1], 1)
    x = torch.randn(3, 6, 7, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    g = torch.randn(F.conv2d(x, w, None, *conf).shape, dtype=torch.float64)
    assert g.dim() == 3
    gx = ops.conv2d_input_backward(g, w, [3, 6, 7], *conf)
    ref = torch.nn.grad.conv2d_input((1, 3, 6, 7), w, g.unsqueeze(0), *conf).squeeze(0)
    assert_close_scaled(gx, ref, 1e-12)
    gw = ops.conv2d_weight_backward(g, x, list(w.shape), *conf)
    assert_close_scaled(gw, torch.nn.grad.conv2d_weight(x.unsqueeze(0), w.shape, g.unsqueeze(0), *conf), 1e-12)
    assert_close_scaled(ops.channel_sum(g), g.sum((1, 2)), 1e-12)


@pytest.mark.parametrize("layout", LAYOUTS + ("expanded_scalar", "expanded_channel"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_sum(layout, dtype):
    for shape in [(3, 5, 4, 6), (0, 5, 4, 6), (1, 1, 1, 1), (2, 3, 1, 7)]:
        t = make_grad_output(shape, layout, dtype)
        assert_close_scaled(ops.channel_sum(t), t.sum((0, 2, 3)), RTOL[dtype], str(shape))


def test_channel_sum_large_float32_accuracy():
    """Many float32 values: the result must be as accurate as torch's (pairwise) sum."""
    t = torch.full((64, 3, 64, 64), 0.1, dtype=torch.float32)
    exact = t.double().sum((0, 2, 3))
    torch.testing.assert_close(ops.channel_sum(t).double(), exact, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def r(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


# (args of cnnext.functional.conv2d, exception type, regex the message must match)
BAD = {
    "channels_per_group": (
        (r(1, 6, 5, 5), r(4, 4, 1, 1), None, 1, 0, 1, 2), RuntimeError,
        r"conv2d: expected weight to have 3 input channels per group \(input has 6 channels, "
        r"groups=2\), got 4 \(weight of shape \[4, 4, 1, 1\]\)"),
    "channel_mismatch": (
        (r(1, 3, 5, 5), r(2, 4, 3, 3)), RuntimeError,
        r"expected weight to have 3 input channels per group \(input has 3 channels, groups=1\), got 4"),
    "out_channels_not_divisible": (
        (r(1, 4, 5, 5), r(3, 2, 1, 1), None, 1, 0, 1, 2), RuntimeError,
        r"expected out_channels \(weight.size\(0\) = 3\) to be divisible by groups = 2"),
    "in_channels_not_divisible": (
        (r(1, 3, 5, 5), r(4, 1, 1, 1), None, 1, 0, 1, 2), RuntimeError,
        r"expected in_channels \(input.size\(1\) = 3\) to be divisible by groups = 2"),
    "weight_3d": (
        (r(1, 3, 5, 5), r(2, 3, 1)), RuntimeError,
        r"expected weight to be 4-D \(out_channels, in_channels / groups, kH, kW\), "
        r"got 3-D tensor of shape \[2, 3, 1\]"),
    "weight_5d_same": (
        (r(1, 3, 5, 5), r(2, 3, 1, 1, 1), None, 1, "same"), RuntimeError,
        r"expected weight to be 4-D .*got 5-D tensor of shape \[2, 3, 1, 1, 1\]"),
    "input_2d": (
        (r(5, 5), r(2, 3, 1, 1)), RuntimeError,
        r"expected input to be 3-D \(C, H, W\) or 4-D \(N, C, H, W\), got 2-D tensor of shape \[5, 5\]"),
    "input_5d": (
        (r(1, 1, 3, 5, 5), r(2, 3, 1, 1)), RuntimeError,
        r"expected input to be 3-D .* or 4-D .*got 5-D tensor of shape \[1, 1, 3, 5, 5\]"),
    "kernel_too_large": (
        (r(1, 3, 5, 6), r(2, 3, 6, 3), None, 1, (0, 1)), RuntimeError,
        r"expected the dilated kernel \(6 x 3, kernel 6 x 3, dilation \[1, 1\]\) to fit in the "
        r"padded input \(5 x 8, input 5 x 6, padding \[0, 1\]\)"),
    "dilated_kernel_too_large": (
        (r(1, 3, 5, 5), r(2, 3, 2, 2), None, 1, 0, (5, 1)), RuntimeError,
        r"expected the dilated kernel \(6 x 2, kernel 2 x 2, dilation \[5, 1\]\) to fit"),
    "empty_height": (
        (r(1, 3, 0, 5), r(2, 3, 1, 1), None, 1, 1), RuntimeError,
        r"expected input to have non-zero height and width, got input of shape \[1, 3, 0, 5\]"),
    "empty_kernel": (
        (r(1, 3, 5, 5), r(2, 3, 0, 1)), RuntimeError,
        r"non-empty kernel, got weight of shape \[2, 3, 0, 1\]"),
    "no_out_channels": (
        (r(1, 3, 5, 5), r(0, 3, 1, 1)), RuntimeError,
        r"at least one output channel.*got weight of shape \[0, 3, 1, 1\]"),
    "stride_0": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, 0), RuntimeError,
                 r"expected stride to be at least 1, got \[0, 0\]"),
    "stride_pair_0": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, (1, 0)), RuntimeError,
                      r"expected stride to be at least 1, got \[1, 0\]"),
    "stride_negative": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, -2), RuntimeError,
                        r"expected stride to be at least 1, got \[-2, -2\]"),
    "dilation_0": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, 1, 0, (0, 1)), RuntimeError,
                   r"expected dilation to be at least 1, got \[0, 1\]"),
    "padding_negative": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, 1, (0, -1)), RuntimeError,
                         r"expected padding to be non-negative, got \[0, -1\]"),
    "groups_0": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, 1, 0, 1, 0), RuntimeError,
                 r"expected groups to be at least 1, got 0"),
    "groups_negative": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, 1, 0, 1, -1), RuntimeError,
                        r"expected groups to be at least 1, got -1"),
    "groups_float": ((r(1, 4, 5, 5), r(2, 2, 1, 1), None, 1, 0, 1, 2.0), TypeError,
                     r"expected groups to be an int, got 2.0"),
    "stride_3_values": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, (1, 1, 1)), RuntimeError,
                        r"expected stride to be an int or a pair of ints, got \(1, 1, 1\)"),
    "padding_3_values": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, 1, [0, 0, 0]), RuntimeError,
                         r"expected padding to be an int or a pair of ints, got \[0, 0, 0\]"),
    "dilation_empty": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, 1, 0, ()), RuntimeError,
                       r"expected dilation to be an int or a pair of ints, got \(\)"),
    "stride_float": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, 1.5), TypeError,
                     r"expected stride to be an int or a pair of ints, got 1.5"),
    "stride_bool": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, True), TypeError,
                    r"expected stride to be an int or a pair of ints, got True"),
    "padding_pair_of_floats": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, 1, (1.0, 1.0)), TypeError,
                               r"expected padding to be an int or a pair of ints, got \(1.0, 1.0\)"),
    "padding_string": ((r(1, 3, 5, 5), r(2, 3, 1, 1), None, 1, "full"), ValueError,
                       r"expected padding to be 'valid', 'same', an int or a pair of ints, got 'full'"),
    "same_strided": ((r(1, 3, 5, 5), r(2, 3, 3, 3), None, 2, "same"), ValueError,
                     r"padding='same' is not supported for strided convolutions, got stride=\(2, 2\)"),
    "same_strided_pair": ((r(1, 3, 5, 5), r(2, 3, 3, 3), None, (1, 3), "same"), ValueError,
                          r"padding='same' is not supported for strided convolutions, got stride=\(1, 3\)"),
    "weight_dtype": ((r(1, 3, 5, 5), r(2, 3, 1, 1, dtype=torch.float64)), RuntimeError,
                     r"expected weight to have the same dtype as input \(Float\), got Double"),
    "weight_half": ((r(1, 3, 5, 5), r(2, 3, 1, 1, dtype=torch.float16)), RuntimeError,
                    r"expected weight to have the same dtype as input \(Float\), got Half"),
    "bias_dtype": ((r(1, 3, 5, 5, dtype=torch.float64), r(2, 3, 1, 1, dtype=torch.float64), r(2)),
                   RuntimeError, r"expected bias to have the same dtype as input \(Double\), got Float"),
    "bias_size": ((r(1, 3, 5, 5), r(2, 3, 1, 1), r(3)), RuntimeError,
                  r"expected bias to be 1-D of size out_channels = 2, got shape \[3\]"),
    "bias_2d": ((r(1, 3, 5, 5), r(2, 3, 1, 1), r(1, 2)), RuntimeError,
                r"expected bias to be 1-D of size out_channels = 2, got shape \[1, 2\]"),
    "bias_0d": ((r(1, 3, 5, 5), r(2, 3, 1, 1), r()), RuntimeError,
                r"expected bias to be 1-D of size out_channels = 2, got shape \[\]"),
    "int64_cpu": ((torch.ones(1, 3, 5, 5, dtype=torch.int64), torch.ones(2, 3, 1, 1, dtype=torch.int64)),
                  NotImplementedError, r"expected input to be float16, bfloat16, float32 or float64, got Long on cpu"),
    "complex_cpu": ((r(1, 3, 5, 5, dtype=torch.complex64), r(2, 3, 1, 1, dtype=torch.complex64)),
                    NotImplementedError, r"expected input to be float16, bfloat16, float32 or float64, got ComplexFloat"),
}


# Direct op calls: what reaches C++ without the Python normalisation.
BAD_OPS = {
    "op_stride_3_values": (
        lambda: ops.conv2d(r(1, 3, 5, 5), r(2, 3, 1, 1), None, [1, 1, 1], [0, 0], [1, 1], 1),
        RuntimeError, r"conv2d: expected stride to be a single integer or a pair, got 3 values \[1, 1, 1\]"),
    "op_padding_1_value": (
        lambda: ops.conv2d(r(1, 3, 5, 5), r(2, 3, 1, 1), None, [1, 1], [0], [1, 1], 1),
        RuntimeError, r"conv2d: expected padding to be a single integer or a pair, got 1 values \[0\]"),
    "op_negative_padding": (
        lambda: ops.conv2d(r(1, 3, 5, 5), r(2, 3, 1, 1), None, [1, 1], [-1, 0], [1, 1], 1),
        RuntimeError, r"expected padding to be non-negative, got \[-1, 0\]"),
    "input_backward_grad_shape": (
        lambda: ops.conv2d_input_backward(r(2, 4, 3, 4), r(4, 3, 3, 3), [2, 3, 5, 5], [1, 1], [0, 0], [1, 1], 1),
        RuntimeError, r"conv2d_input_backward: expected grad_output of shape \[2, 4, 3, 3\], got \[2, 4, 3, 4\]"),
    "input_backward_grad_channels": (
        lambda: ops.conv2d_input_backward(r(2, 5, 3, 3), r(4, 3, 3, 3), [2, 3, 5, 5], [1, 1], [0, 0], [1, 1], 1),
        RuntimeError, r"expected grad_output of shape \[2, 4, 3, 3\], got \[2, 5, 3, 3\]"),
    "input_backward_grad_batch": (
        lambda: ops.conv2d_input_backward(r(3, 4, 3, 3), r(4, 3, 3, 3), [2, 3, 5, 5], [1, 1], [0, 0], [1, 1], 1),
        RuntimeError, r"expected grad_output of shape \[2, 4, 3, 3\], got \[3, 4, 3, 3\]"),
    "input_backward_input_size_entries": (
        lambda: ops.conv2d_input_backward(r(2, 4, 3, 3), r(4, 3, 3, 3), [3, 5, 5], [1, 1], [0, 0], [1, 1], 1),
        RuntimeError, r"conv2d_input_backward: expected input_size of 4 entries to match grad_output's 4 dims, "
                      r"got \[3, 5, 5\]"),
    "input_backward_grad_2d": (
        lambda: ops.conv2d_input_backward(r(4, 9), r(4, 3, 3, 3), [2, 3, 5, 5], [1, 1], [0, 0], [1, 1], 1),
        RuntimeError, r"conv2d_input_backward: expected grad_output to be 3-D .* or 4-D .*got 2-D"),
    "input_backward_dtype": (
        lambda: ops.conv2d_input_backward(r(2, 4, 3, 3), r(4, 3, 3, 3, dtype=torch.float64), [2, 3, 5, 5],
                                          [1, 1], [0, 0], [1, 1], 1),
        RuntimeError, r"conv2d_input_backward: expected weight to have the same dtype as grad_output \(Float\), got Double"),
    "input_backward_int": (
        lambda: ops.conv2d_input_backward(torch.ones(2, 4, 3, 3, dtype=torch.int32), torch.ones(4, 3, 3, 3, dtype=torch.int32),
                                          [2, 3, 5, 5], [1, 1], [0, 0], [1, 1], 1),
        NotImplementedError, r"conv2d_input_backward: expected grad_output to be float16, bfloat16, float32 or float64, got Int"),
    "input_backward_stride_0": (
        lambda: ops.conv2d_input_backward(r(2, 4, 3, 3), r(4, 3, 3, 3), [2, 3, 5, 5], [0, 1], [0, 0], [1, 1], 1),
        RuntimeError, r"conv2d_input_backward: expected stride to be at least 1, got \[0, 1\]"),
    "weight_backward_grad_shape": (
        lambda: ops.conv2d_weight_backward(r(2, 4, 3, 4), r(2, 3, 5, 5), [4, 3, 3, 3], [1, 1], [0, 0], [1, 1], 1),
        RuntimeError, r"conv2d_weight_backward: expected grad_output of shape \[2, 4, 3, 3\], got \[2, 4, 3, 4\]"),
    "weight_backward_weight_size_3": (
        lambda: ops.conv2d_weight_backward(r(2, 4, 3, 3), r(2, 3, 5, 5), [4, 3, 3], [1, 1], [0, 0], [1, 1], 1),
        RuntimeError, r"conv2d_weight_backward: expected weight to be 4-D .*got 3-D tensor of shape \[4, 3, 3\]"),
    "weight_backward_batched_mismatch": (
        lambda: ops.conv2d_weight_backward(r(4, 3, 3), r(2, 3, 5, 5), [4, 3, 3, 3], [1, 1], [0, 0], [1, 1], 1),
        RuntimeError, r"conv2d_weight_backward: expected grad_output \(3-D\) and input \(4-D\) to be both "
                      r"batched or both unbatched"),
    "weight_backward_dtype": (
        lambda: ops.conv2d_weight_backward(r(2, 4, 3, 3), r(2, 3, 5, 5, dtype=torch.float64), [4, 3, 3, 3],
                                           [1, 1], [0, 0], [1, 1], 1),
        RuntimeError, r"conv2d_weight_backward: expected input to have the same dtype as grad_output \(Float\), "
                   r"got Double"),
    "weight_backward_groups": (
        lambda: ops.conv2d_weight_backward(r(2, 4, 3, 3), r(2, 3, 5, 5), [4, 3, 3, 3], [1, 1], [0, 0], [1, 1], 2),
        RuntimeError, r"conv2d_weight_backward: expected in_channels \(input.size\(1\) = 3\) to be divisible by "
                      r"groups = 2"),
    "channel_sum_2d": (
        lambda: ops.channel_sum(r(3, 4)), RuntimeError,
        r"channel_sum: expected input to be 3-D \(C, H, W\) or 4-D \(N, C, H, W\), got 2-D tensor of shape \[3, 4\]"),
    "channel_sum_int": (
        lambda: ops.channel_sum(torch.ones(1, 3, 4, 4, dtype=torch.int32)), NotImplementedError,
        r"channel_sum: expected input to be float16, bfloat16, float32 or float64, got Int"),
}


# integer and complex inputs torch computes in on the CPU; cnnext rejects them by design.
test_bad_input, test_torch_rejects_too, test_bad_op_input = conv_tests.bad_input_tests(
    conv2d, F.conv2d, "conv2d", BAD, [case for case in BAD if not case.endswith("_cpu")], BAD_OPS)


# Odd but valid: cnnext computes what torch computes.
ODD = {
    "kernel_is_padded_input": ((2, 3, 3, 4), (2, 3, 5, 6), 1, 1, 1, 1),
    "kernel_is_input": ((2, 3, 4, 5), (2, 3, 4, 5), 1, 0, 1, 1),
    "dilated_kernel_is_padded_input": ((1, 2, 5, 5), (2, 2, 3, 2), 1, (1, 0), (3, 4), 1),
    "height_1": ((2, 3, 1, 6), (4, 3, 1, 3), 1, 0, 1, 1),
    "height_1_padded": ((2, 3, 1, 6), (4, 3, 3, 3), (2, 1), 1, 1, 1),
    "width_1": ((2, 3, 6, 1), (4, 3, 2, 1), 2, 0, 1, 1),
    "one_pixel": ((3, 2, 1, 1), (4, 2, 1, 1), 1, 0, 1, 1),
    "stride_one_tuple": ((2, 3, 5, 5), (2, 3, 2, 2), (2,), (1,), [2], 1),
    "pointwise_stride_beyond_size": ((2, 3, 3, 2), (2, 3, 1, 1), (5, 7), 0, 1, 1),
    "stride_beyond_size": ((2, 3, 4, 4), (2, 3, 2, 2), 9, 1, 1, 1),
    "padding_larger_than_kernel": ((1, 2, 3, 3), (2, 2, 2, 2), 1, (4, 3), 1, 1),
    "padding_only_output": ((1, 2, 2, 2), (3, 2, 3, 3), 3, 5, 2, 1),
    "pointwise_padded": ((2, 3, 4, 4), (2, 3, 1, 1), 1, 2, 1, 1),
    "pointwise_dilated": ((2, 3, 4, 4), (2, 3, 1, 1), 1, 0, 3, 1),
    "groups_equal_channels_one_out": ((2, 4, 5, 5), (4, 1, 1, 1), 1, 0, 1, 4),
    "many_groups_one_channel_each": ((1, 6, 4, 4), (6, 1, 2, 2), 1, 0, 1, 6),
    "large_dilation_small_kernel": ((1, 2, 9, 9), (2, 2, 2, 2), 1, 0, 8, 1),
    "single_output_channel": ((2, 3, 5, 5), (1, 3, 3, 3), 1, 1, 1, 1),
    "batch_1_channel_1": ((1, 1, 5, 6), (1, 1, 3, 3), 1, 1, 1, 1),
    "same_kernel_larger_than_input": ((1, 2, 2, 3), (3, 2, 5, 4), 1, "same", 1, 1),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("case", ODD)
def test_odd_but_valid_matches_torch(case, layout):
    xshape, wshape, stride, padding, dilation, groups = ODD[case]
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    c = ConvConf(xshape, wshape, True, kw, layout, "contiguous", layout, seed=7)
    assert_matches(*run_both(c, torch.float64), 1e-12)


# --------------------------------------------------------------------------------------------
# opcheck and fake kernels
# --------------------------------------------------------------------------------------------

# (input shape, weight shape, stride, padding, dilation, groups, input layout, weight layout)
OPCHECK = {
    "basic": ((2, 3, 6, 5), (4, 3, 3, 3), [1, 1], [0, 0], [1, 1], 1, "contiguous", "contiguous"),
    "strided_grouped": ((2, 4, 7, 6), (6, 2, 2, 3), [2, 1], [1, 2], [1, 2], 2, "contiguous", "contiguous"),
    "channels_last_input": ((2, 3, 6, 5), (4, 3, 3, 3), [1, 2], [1, 1], [1, 1], 1, "channels_last", "contiguous"),
    "channels_last_weight": ((2, 4, 5, 5), (4, 1, 3, 3), [1, 1], [1, 1], [1, 1], 4, "contiguous", "channels_last"),
    "channels_last_pointwise": ((2, 8, 4, 5), (6, 8, 1, 1), [1, 1], [0, 0], [1, 1], 1, "channels_last", "contiguous"),
    "sliced_input": ((2, 3, 6, 5), (2, 3, 1, 1), [1, 1], [0, 0], [1, 1], 1, "sliced", "contiguous"),
    "unbatched": ((3, 6, 5), (2, 3, 2, 2), [1, 1], [1, 0], [1, 1], 1, "contiguous", "contiguous"),
    "empty_batch": ((0, 3, 5, 5), (2, 3, 3, 3), [1, 1], [1, 1], [1, 1], 1, "contiguous", "contiguous"),
}


def opcheck_args(case, requires_grad):
    xshape, wshape, stride, padding, dilation, groups, x_layout, w_layout = OPCHECK[case]
    conf = [stride, padding, dilation, groups]
    x = to_layout(torch.randn(xshape, dtype=torch.float64), x_layout).requires_grad_(requires_grad)
    w = to_layout(torch.randn(wshape, dtype=torch.float64), w_layout).requires_grad_(requires_grad)
    b = torch.randn(wshape[0], dtype=torch.float64).requires_grad_(requires_grad)
    y = ops.conv2d(x.detach(), w.detach(), None, *conf)
    g = to_layout(torch.randn(y.shape, dtype=torch.float64), x_layout).requires_grad_(requires_grad)
    return {
        "conv2d": (x, w, b, *conf),
        "conv2d_input_backward": (g, w, list(xshape), *conf),
        "conv2d_weight_backward": (g, x, list(wshape), *conf),
        "channel_sum": (g,),
    }


OP_NAMES = ["conv2d", "conv2d_input_backward", "conv2d_weight_backward", "channel_sum"]


def _op_case_params():
    out = []
    for op_name in OP_NAMES:
        for case in OPCHECK:
            out.append(pytest.param(op_name, case, id=f"{op_name}-{case}"))
    return out


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("op_name, case", _op_case_params())
def test_opcheck(op_name, case, requires_grad):
    args = opcheck_args(case, requires_grad)[op_name]
    results = torch.library.opcheck(getattr(ops, op_name).default, args)
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("op_name, case", _op_case_params())
def test_fake_kernel_metadata(op_name, case):
    """The fake kernels state the real outputs' shape, strides and dtype exactly (the Python
    copy of the output-size math in cnnext/_shapes.py agrees with csrc/common/conv2d.h)."""
    args = opcheck_args(case, False)[op_name]
    real = getattr(ops, op_name)(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = getattr(ops, op_name)(*fake_args)
    assert fake.shape == real.shape
    assert fake.stride() == real.stride()
    assert fake.dtype == real.dtype


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------

def _compile_available():
    try:
        import torch._dynamo  # noqa: F401
        import torch._inductor  # noqa: F401
    except Exception:  # pragma: no cover
        return False
    return hasattr(torch, "compile")


@pytest.mark.skipif(not _compile_available(), reason="torch.compile is not available")
def test_torch_compile_fullgraph():
    import torch._dynamo

    def net(x, w1, b1, w2):
        y = torch.relu(conv2d(x, w1, b1, stride=2, padding=1))
        return conv2d(y, w2, None, padding="same", groups=2)

    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, dynamic=False)
    x0, w10, b10, w20 = torch.randn(2, 3, 9, 8), torch.randn(4, 3, 3, 3), torch.randn(4), torch.randn(6, 2, 2, 3)
    results = []
    for f in (net, compiled):
        inputs = [leaf(t) for t in (x0, w10, b10, w20)]
        out = f(*inputs)
        out.backward(torch.full_like(out, 0.5))
        results.append((out, *(t.grad for t in inputs)))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
    # And the same function in stock torch agrees with both.
    ref = F.conv2d(torch.relu(F.conv2d(x0, w10, b10, stride=2, padding=1)), w20, None, padding="same", groups=2)
    torch.testing.assert_close(results[1][0], ref, rtol=1e-5, atol=1e-5)


def _net(conv, relu):
    """Two convolutions (the second grouped, 'same'): cnnext's or stock torch's."""
    return lambda x, w1, b1, w2: conv(relu(conv(x, w1, b1, stride=2, padding=1)), w2, None, padding="same", groups=2)


test_torch_compile_dynamic_shapes = pytest.mark.skipif(not _compile_available(), reason="torch.compile is not available")(
    conv_tests.compile_dynamic_shapes_test(
        _net(conv2d, torch.relu), _net(F.conv2d, torch.relu), [(4, 3, 3, 3), (4,), (6, 2, 2, 3)],
        [(2, 3, 9, 8), (3, 3, 12, 11)],
        "Symbolic sizes through the fake kernels (aot_eager: no code generation, so it stays quick)."))


# --------------------------------------------------------------------------------------------
# Every device: against F.conv2d in float64 on the CPU from the very values the run sees
# (inputs rounded to the tested dtype first, so the tolerances measure the kernels, not
# the rounding of the inputs) and, on CUDA, against cnnext's CPU backend
# --------------------------------------------------------------------------------------------

DEVICE_RTOL = TOLERANCES["device_conv"]
DEVICE_LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted")

# (N, C, H, W), out_channels, (kH, kW), stride, padding, dilation, groups, bias
DEVICE_CONFIGS = [
    ((2, 3, 8, 9), 4, (3, 3), 1, 1, 1, 1, True),
    ((2, 4, 9, 7), 6, (3, 2), (2, 1), (0, 1), (1, 2), 2, True),
    ((2, 6, 9, 8), 6, (3, 3), 2, 1, 1, 6, False),          # depthwise
    ((1, 4, 7, 7), 8, (5, 5), 1, 2, 1, 4, True),           # depthwise, multiplier 2
    ((3, 5, 6, 5), 7, (1, 1), 1, 0, 1, 1, True),           # pointwise
    ((2, 2, 11, 10), 3, (5, 3), (3, 2), (2, 0), (2, 1), 1, False),
    ((1, 4, 4, 4), 4, (4, 4), 1, 0, 1, 2, True),           # kernel as large as the input
    ((1, 2, 3, 3), 2, (3, 3), 2, 4, 1, 1, True),           # padding wider than the input
    ((2, 6, 6, 5), 9, (2, 3), (1, 3), (3, 2), 1, 3, True),
    ((4, 16, 14, 14), 32, (3, 3), 1, 1, 1, 1, True),       # several blocks per kernel
    ((2, 3, 20, 20), 8, (7, 7), 2, 3, 1, 1, True),         # a ResNet stem
]


def config_id(cfg):
    shape, o, k, s, p, d, g, b = cfg
    return f"x{'x'.join(map(str, shape))}-o{o}-k{k[0]}x{k[1]}-s{s}-p{p}-d{d}-g{g}-{'bias' if b else 'nobias'}"


def make_inputs(cfg, dtype):
    """Random x, w, b (or None) and grad_output as float64 CPU tensors holding values
    exactly representable in dtype."""
    shape, o, (kh, kw), s, p, d, g, has_bias = cfg
    sd, pd, dl = pair(s), pair(p), pair(d)
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(o, shape[1] // g, kh, kw, dtype=torch.float64)
    b = torch.randn(o, dtype=torch.float64) if has_bias else None
    oh = (shape[2] + 2 * pd[0] - dl[0] * (kh - 1) - 1) // sd[0] + 1
    ow = (shape[3] + 2 * pd[1] - dl[1] * (kw - 1) - 1) // sd[1] + 1
    gy = torch.randn(shape[0], o, oh, ow, dtype=torch.float64)
    rnd = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731
    return rnd(x), rnd(w), rnd(b), rnd(gy)


def run_conv(fn, x, w, b, gy, *conf):
    """Output and gradients of fn(x, w, b, *conf) on whatever device x is on."""
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    out = outputs_and_grads(lambda *t: fn(*t, *conf) if b is not None else fn(*t, None, *conf), leaves, gy)
    return (out[0].detach(), *out[1:])


def moved(device, dtype, *tensors):
    return [None if t is None else t.to(dtype=dtype, device=device) for t in tensors]


@pytest.mark.parametrize("layout", DEVICE_LAYOUTS)
@pytest.mark.parametrize("device, dtype", device_dtypes())
@pytest.mark.parametrize("cfg", DEVICE_CONFIGS, ids=config_id)
@pytest.mark.usefixtures("strict_fp32")
def test_parity_on_device(cfg, device, dtype, layout):
    """Forward and every gradient against F.conv2d (float64 CPU) and, on CUDA for float32
    and float64, against cnnext's CPU backend, with input and grad_output in every layout."""
    _, _, _, s, p, d, g, _ = cfg
    x, w, b, gy = make_inputs(cfg, dtype)
    ref = run_conv(F.conv2d, x, w, b, gy, s, p, d, g)
    # grad_output in another layout than the input, so both kernels see mixed layouts.
    gy_layout = DEVICE_LAYOUTS[(DEVICE_LAYOUTS.index(layout) + 1) % len(DEVICE_LAYOUTS)]
    xd, wd, bd, gyd = moved(device, dtype, x, w, b, gy)
    xc = to_layout(xd, layout)
    out = run_conv(conv2d, xc, wd, bd, to_layout(gyd, gy_layout), s, p, d, g)
    for name, got, want in zip(GRAD_NAMES, out, ref):
        assert got.device.type == device and got.dtype == dtype, name
        assert_close_to_reference(got, want, DEVICE_RTOL[dtype], f"{name} vs F.conv2d")
    if device == "cpu":  # the CPU backend's layout rules: test_output_memory_format and those after it
        return
    # Layout rule of the CUDA backend: channels_last output iff an operand is channels_last.
    fmt = torch.channels_last if is_channels_last(xc) else torch.contiguous_format
    assert out[0].is_contiguous(memory_format=fmt)
    assert out[2].is_contiguous()

    if dtype in (torch.float32, torch.float64):
        xh, wh, bh, gyh = moved("cpu", dtype, x, w, b, gy)
        out_cpu = run_conv(conv2d, to_layout(xh, layout), wh, bh, to_layout(gyh, gy_layout), s, p, d, g)
        for name, got, want in zip(GRAD_NAMES, out, out_cpu):
            assert_close_to_reference(got, want.double(), DEVICE_RTOL[dtype], f"{name} vs cnnext CPU")
        assert is_channels_last(out[0]) == is_channels_last(out_cpu[0])
        assert is_channels_last(out[1]) == is_channels_last(out_cpu[1])


@pytest.mark.parametrize("device, dtype", device_dtypes())
@pytest.mark.usefixtures("strict_fp32")
def test_expanded_grad_output(device, dtype):
    """y.sum() gives backward a grad_output of stride 0 in every dim."""
    cfg = ((2, 4, 9, 8), 6, (3, 3), 2, 1, 1, 2, True)
    _, _, _, s, p, d, g, _ = cfg
    x, w, b, gy = make_inputs(cfg, dtype)
    ref = run_conv(F.conv2d, x, w, b, torch.ones_like(gy), s, p, d, g)
    xc, wc, bc = (t.requires_grad_() for t in moved(device, dtype, x, w, b))
    grads = torch.autograd.grad(conv2d(xc, wc, bc, s, p, d, g).sum(), (xc, wc, bc))
    for name, got, want in zip(GRAD_NAMES[1:], grads, ref[1:]):
        assert_close_to_reference(got, want, DEVICE_RTOL[dtype], name)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding(padding, device):
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    w = torch.randn(6, 2, 4, 3, dtype=torch.float64)  # kH = 4: 'same' pads H asymmetrically
    want = F.conv2d(x, w, None, 1, padding, (1, 2), 2)
    got = conv2d(x.to(device), w.to(device), None, 1, padding, (1, 2), 2)
    assert_close_to_reference(got, want, DEVICE_RTOL[torch.float64], padding)


@pytest.mark.parametrize("device, dtype", device_dtypes())
def test_empty_batch(device, dtype):
    """N = 0: empty output and grad_input, zero grad_weight and grad_bias."""
    x = torch.randn(0, 4, 7, 7, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(6, device=device, dtype=dtype, requires_grad=True)
    y = conv2d(x, w, b, 1, 1, 1, 2)
    assert y.shape == (0, 6, 7, 7) and y.device.type == device
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w))
    assert torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("device, dtype", device_dtypes())
@pytest.mark.usefixtures("strict_fp32")
def test_unbatched(device, dtype):
    """A (C, H, W) input is a batch of one; output and grad_input are 3-D."""
    cfg = ((1, 6, 8, 7), 9, (3, 2), (2, 1), 1, (1, 2), 3, True)
    _, _, _, s, p, d, g, _ = cfg
    x, w, b, gy = make_inputs(cfg, dtype)
    ref = run_conv(F.conv2d, x[0], w, b, gy[0], s, p, d, g)
    xd, wd, bd, gyd = moved(device, dtype, x[0], w, b, gy[0])
    out = run_conv(conv2d, xd, wd, bd, gyd, s, p, d, g)
    assert out[0].dim() == 3 and out[1].dim() == 3
    for name, got, want in zip(GRAD_NAMES, out, ref):
        assert_close_to_reference(got, want, DEVICE_RTOL[dtype], name)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_deterministic(device):
    """Two runs give bitwise equal results (no atomics, fixed summation order)."""
    cfg = ((8, 16, 20, 20), 32, (3, 3), 1, 1, 1, 1, True)
    x, w, b, gy = moved(device, torch.float32, *make_inputs(cfg, torch.float32))
    first = run_conv(conv2d, x, w, b, gy, 1, 1, 1, 1)
    second = run_conv(conv2d, x, w, b, gy, 1, 1, 1, 1)
    for name, a, c in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, c), name


@pytest.mark.parametrize("device", cuda_only())
def test_side_stream(device):
    """Kernels run on the current stream, not the default one."""
    cfg = ((4, 8, 16, 16), 16, (3, 3), 1, 1, 1, 2, True)
    x, w, b, gy = make_inputs(cfg, torch.float64)
    ref = run_conv(F.conv2d, x, w, b, gy, 1, 1, 1, 2)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = run_conv(conv2d, *moved(device, torch.float64, x, w, b, gy), 1, 1, 1, 2)
    stream.synchronize()
    for name, got, want in zip(GRAD_NAMES, out, ref):
        assert_close_to_reference(got, want, DEVICE_RTOL[torch.float64], name)


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the device guard picks cuda:1."""
    cfg = ((2, 4, 8, 8), 6, (3, 3), 1, 1, 1, 2, True)
    x, w, b, gy = make_inputs(cfg, torch.float64)
    ref = run_conv(F.conv2d, x, w, b, gy, 1, 1, 1, 2)
    with torch.cuda.device(0):
        out = run_conv(conv2d, *moved("cuda:1", torch.float64, x, w, b, gy), 1, 1, 1, 2)
    for name, got, want in zip(GRAD_NAMES, out, ref):
        assert got.device == torch.device("cuda:1"), name
        assert_close_to_reference(got, want, DEVICE_RTOL[torch.float64], name)


GRADCHECK_CONFIGS = [
    ((2, 4, 6, 5), 4, (3, 2), (2, 1), (1, 0), (1, 2), 2, True),
    ((1, 3, 5, 5), 3, (3, 3), 1, 1, 1, 3, False),          # depthwise
    ((2, 2, 4, 6), 3, (1, 1), 1, 0, 1, 1, True),
]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("device", cuda_only())  # on the CPU: the tests above
@pytest.mark.parametrize("cfg", GRADCHECK_CONFIGS, ids=config_id)
def test_gradcheck_on_device(cfg, device):
    _, _, _, s, p, d, g, _ = cfg
    x, w, b, _ = make_inputs(cfg, torch.float64)
    args = [t.to(device).requires_grad_() for t in (x, w, b) if t is not None]
    fn = (lambda x, w, b: conv2d(x, w, b, s, p, d, g)) if b is not None else (lambda x, w: conv2d(x, w, None, s, p, d, g))
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("device", cuda_only())  # on the CPU: the tests above
def test_gradcheck_channels_last(device):
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, device=device)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: conv2d(x, w, None, 2, 1, 1, 2), (x, w))


def device_opcheck_cases(device):
    """{name: (op, args)} on float64 tensors of the device that require grad."""
    x = torch.randn(2, 4, 7, 6, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, device=device, dtype=torch.float64, requires_grad=True)
    conf = ([2, 1], [1, 0], [1, 2], 2)
    y = ops.conv2d(x.detach(), w.detach(), b.detach(), *conf)
    gy = torch.randn_like(y).requires_grad_()
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    x3 = x.detach()[0].clone().requires_grad_()
    return {
        "conv2d": (ops.conv2d.default, (x, w, b, *conf)),
        "conv2d_nobias": (ops.conv2d.default, (x, w, None, *conf)),
        "conv2d_channels_last": (ops.conv2d.default, (xcl, w, b, *conf)),
        "conv2d_unbatched": (ops.conv2d.default, (x3, w, b, *conf)),
        "conv2d_input_backward": (ops.conv2d_input_backward.default, (gy, w, list(x.shape), *conf)),
        "conv2d_weight_backward": (ops.conv2d_weight_backward.default, (gy, x, list(w.shape), *conf)),
        "channel_sum": (ops.channel_sum.default, (gy,)),
    }


DEVICE_OPCHECK_CASES = ["conv2d", "conv2d_nobias", "conv2d_channels_last", "conv2d_unbatched",
                        "conv2d_input_backward", "conv2d_weight_backward", "channel_sum"]


@pytest.mark.parametrize("device", cuda_only())  # on the CPU: the tests above
@pytest.mark.parametrize("case", DEVICE_OPCHECK_CASES)
def test_opcheck_on_device(case, device):
    op, args = device_opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


test_mixed_devices_raise = conv_tests.mixed_devices_test(conv2d, (3, 2, 3, 3))


@pytest.mark.parametrize("device", cuda_only())
def test_mixed_devices_backward_ops_raise(device):
    gy = torch.randn(1, 3, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="same device"):
        ops.conv2d_input_backward(gy, torch.randn(3, 2, 3, 3), [1, 2, 5, 5], [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="same device"):
        ops.conv2d_weight_backward(gy, torch.randn(1, 2, 5, 5), [3, 2, 3, 3], [1, 1], [0, 0], [1, 1], 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.usefixtures("strict_fp32")
def test_half_types_module(device, dtype):
    """cnnext.nn.Conv2d in half precision tracks torch.nn.Conv2d in float32."""
    mod = cnnext.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2).to(device)
    ref = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2).to(device)
    ref.load_state_dict(mod.state_dict())
    x = torch.randn(4, 8, 15, 15, device=device).to(dtype)
    want = F.conv2d(x.double().cpu(), ref.weight.to(dtype).double().cpu(), ref.bias.to(dtype).double().cpu(),
                    2, 1, 1, 2)
    got = mod.to(dtype)(x)
    assert got.dtype == dtype
    assert_close_to_reference(got, want, DEVICE_RTOL[dtype], "Conv2d output")


# --------------------------------------------------------------------------------------------
# The CUDA implicit GEMM (csrc/cuda/conv2d_igemm_kernels.cuh): forward (with the bias
# epilogue), input backward and weight backward (split K), against F.conv2d in float64 on
# the CPU and against cnnext's CPU backend. The `igemm` fixture sends every supported
# problem through it; float32 follows torch.backends.cudnn.allow_tf32 (strict SIMT or TF32).
# --------------------------------------------------------------------------------------------

IGEMM_RTOL = TOLERANCES["device_igemm"]

# (N, C, H, W), out_channels, (kH, kW), stride, padding, dilation, groups, bias
IGEMM_CONFIGS = [
    ((2, 16, 9, 11), 24, (3, 3), 1, 1, 1, 1, True),              # 2 row tiles, partial K
    ((1, 8, 12, 11), 136, (1, 1), 1, 0, 1, 1, False),            # 2 column tiles
    ((2, 12, 10, 9), 18, (3, 2), (2, 1), (0, 1), (1, 2), 3, True),
    ((1, 16, 7, 7), 16, (5, 5), 1, 2, 1, 2, True),               # 8 channels per group
    ((2, 3, 15, 13), 16, (7, 7), 2, 3, 1, 1, True),              # a stem
    ((1, 8, 9, 9), 8, (2, 2), 3, 0, 1, 1, False),                # stride > kernel
    ((3, 24, 6, 5), 40, (3, 3), 1, 2, 2, 1, True),               # dilation 2
    ((4, 64, 28, 28), 128, (3, 3), 1, 1, 1, 1, True),            # many full tiles
]


def igemm_inputs(cfg, dtype):
    shape, o, (kh, kw), s, p, d, g, has_bias = cfg
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    w = torch.randn(o, shape[1] // g, kh, kw, dtype=torch.float64).to(dtype)
    b = torch.randn(o, dtype=torch.float64).to(dtype) if has_bias else None
    y = F.conv2d(x.double(), w.double(), None, s, p, d, g)
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    return x, w, b, gy


@pytest.mark.parametrize("layout", DEVICE_LAYOUTS)
@pytest.mark.parametrize("math", IGEMM_MATHS, ids=igemm_math_id)
@pytest.mark.parametrize("cfg", IGEMM_CONFIGS, ids=config_id)
@pytest.mark.parametrize("device", sm80_only())
def test_igemm_forward_and_gradients(device, cfg, math, layout, igemm):
    dtype, fmath = math
    igemm(fmath)
    _, _, _, s, p, d, g, _ = cfg
    x, w, b, gy = igemm_inputs(cfg, dtype)
    rtol = IGEMM_RTOL[fmath] if dtype == torch.float32 else IGEMM_RTOL[dtype]
    # References from the operands the kernel multiplies (TF32: rounded first, so the
    # bound measures the accumulation, with slack for TF32's own rounding of products).
    xr, wr, gyr = (tf32(t) if fmath == "tf32" else t for t in (x, w, gy))
    want_y = F.conv2d(xr.double(), wr.double(), None if b is None else b.double(), s, p, d, g)
    want_gx = torch.nn.grad.conv2d_input(x.shape, wr.double(), gyr.double(), s, p, d, g)
    want_gw = torch.nn.grad.conv2d_weight(xr.double(), w.shape, gyr.double(), s, p, d, g)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    xc = to_layout(dev(x), layout).requires_grad_()
    wc = dev(w).requires_grad_()
    y = conv2d(xc, wc, dev(b), s, p, d, g)
    gx, gw = torch.autograd.grad(y, (xc, wc), to_layout(dev(gy), DEVICE_LAYOUTS[(DEVICE_LAYOUTS.index(layout) + 1) % 4]))
    assert_close_to_reference(y, want_y, rtol, "output")
    assert_close_to_reference(gx, want_gx, rtol, "grad_input")
    assert_close_to_reference(gw, want_gw, rtol, "grad_weight")
    assert y.dtype == dtype and gx.dtype == dtype
    if fmath == "strict":  # and against the CPU backend
        xcpu, wcpu = to_layout(x, layout).requires_grad_(), w.clone().requires_grad_()
        ycpu = conv2d(xcpu, wcpu, b, s, p, d, g)
        gxcpu, gwcpu = torch.autograd.grad(ycpu, (xcpu, wcpu), gy)
        assert_close_to_reference(y, ycpu.double(), rtol, "output vs cnnext CPU")
        assert_close_to_reference(gx, gxcpu.double(), rtol, "grad_input vs cnnext CPU")
        assert_close_to_reference(gw, gwcpu.double(), rtol, "grad_weight vs cnnext CPU")


@pytest.mark.parametrize("math", IGEMM_MATHS, ids=igemm_math_id)
@pytest.mark.parametrize("device", sm80_only())
def test_igemm_empty_batch(device, math, igemm):
    dtype, fmath = math
    igemm(fmath)
    x = torch.randn(0, 16, 7, 7, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(32, 16, 3, 3, device=device, dtype=dtype, requires_grad=True)
    y = conv2d(x, w, None, 1, 1)
    assert y.shape == (0, 32, 7, 7)
    gx, gw = torch.autograd.grad(y, (x, w), torch.randn_like(y))
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w))  # the GEMM's K = 0: zeros


@pytest.mark.parametrize("device", sm80_only())
@pytest.mark.usefixtures("strict_fp32")
def test_igemm_auto_mode_large_shape(device, monkeypatch):
    """Without the override a ResNet-like layer takes the GEMM (profitable) and agrees
    with the direct kernels (=0) to float32 accuracy."""
    x = torch.randn(8, 64, 28, 28, device=device)
    w = torch.randn(64, 64, 3, 3, device=device)
    monkeypatch.delenv("CNNEXT_CUDA_IGEMM", raising=False)
    auto = conv2d(x, w, None, 1, 1)
    monkeypatch.setenv("CNNEXT_CUDA_IGEMM", "0")
    direct = conv2d(x, w, None, 1, 1)
    assert_close_to_reference(auto, direct.double().cpu(), 2e-5, "auto vs direct")


@pytest.mark.parametrize("device", sm80_only())
def test_igemm_deterministic(device, igemm):
    igemm("strict")
    x = torch.randn(8, 32, 20, 20, device=device, requires_grad=True)
    w = torch.randn(64, 32, 3, 3, device=device)
    y1 = conv2d(x, w, None, 1, 1)
    y2 = conv2d(x, w, None, 1, 1)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    assert torch.equal(torch.autograd.grad(y1, x, g)[0], torch.autograd.grad(y2, x, g)[0])
    wg = w.clone().requires_grad_()
    gw1 = torch.autograd.grad(conv2d(x, wg, None, 1, 1), wg, g)[0]
    gw2 = torch.autograd.grad(conv2d(x, wg, None, 1, 1), wg, g)[0]
    assert torch.equal(gw1, gw2)  # split-K partials added in a fixed order


@pytest.mark.parametrize("device", sm80_only())
def test_igemm_float64_stays_direct(device, igemm):
    """float64 never goes through the GEMM kernels (they do not support it): exact parity."""
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    w = torch.randn(32, 16, 3, 3, dtype=torch.float64)
    got = conv2d(x.to(device), w.to(device), None, 1, 1)
    assert_close_to_reference(got, F.conv2d(x, w, None, 1, 1), 1e-10, "float64")
