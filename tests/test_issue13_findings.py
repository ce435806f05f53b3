"""Regression tests of what torch's OpInfo/ModuleInfo suite (tests/test_opinfo.py) and the
fuzz (tests/test_fuzz.py) found, and of issue 13's items 9, 11 and 12 remainders. Each
failed on main before its fix."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

import cnnext
import cnnext.functional as CF
from reference import memory_format


def _sliced_channels_last(shape, dtype=torch.float64):
    """A channels_last tensor of the given shape taken every other column of a wider one:
    torch suggests channels_last for it, though it is not channels_last-contiguous."""
    n, c, h, w = shape
    wide = torch.randn(n, c, h, 2 * w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x = wide[..., ::2]
    assert suggest_memory_format(x) == torch.channels_last and not x.is_contiguous(memory_format=torch.channels_last)
    return x


# --------------------------------------------------------------------------------------------
# Item 12: memory formats decided as torch decides them (Tensor.suggest_memory_format)
# --------------------------------------------------------------------------------------------

POOLS = {
    "max_pool2d": (lambda f: lambda x: f(x, 2)),
    "avg_pool2d": (lambda f: lambda x: f(x, 2)),
    "adaptive_avg_pool2d": (lambda f: lambda x: f(x, (2, 3))),
    "adaptive_avg_pool2d_global": (lambda f: lambda x: f(x, 1)),
}
STOCK = {"max_pool2d": F.max_pool2d, "avg_pool2d": F.avg_pool2d, "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
         "adaptive_avg_pool2d_global": F.adaptive_avg_pool2d}
OURS = {"max_pool2d": CF.max_pool2d, "avg_pool2d": CF.avg_pool2d, "adaptive_avg_pool2d": CF.adaptive_avg_pool2d,
        "adaptive_avg_pool2d_global": CF.adaptive_avg_pool2d}


@pytest.mark.parametrize("op", list(POOLS))
def test_item12_sliced_channels_last_pooling_output_and_gradient_layout(op):
    # The OpInfo max_pool2d samples include such inputs: the output and the input gradient
    # came back NCHW where torch's are channels_last.
    x = _sliced_channels_last((2, 3, 6, 8)).requires_grad_()
    got = POOLS[op](OURS[op])(x)
    want = POOLS[op](STOCK[op])(x)
    g = torch.randn(want.shape, dtype=want.dtype)
    gx, = torch.autograd.grad(got, x, g)
    sx, = torch.autograd.grad(want, x, g)
    assert memory_format(got) == memory_format(want)
    assert memory_format(gx) == memory_format(sx)
    if op != "adaptive_avg_pool2d_global":  # torch's global pooling gradient is contiguous (below)
        assert memory_format(gx) == "channels_last"
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, sx)


@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
def test_item12_sliced_channels_last_conv_output(op):
    x = _sliced_channels_last((2, 4, 5, 6)).requires_grad_()
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    ours, stock = (CF.conv2d, F.conv2d) if op == "conv2d" else (CF.conv_transpose2d, F.conv_transpose2d)
    got, want = ours(x, w, padding=1), stock(x, w, padding=1)
    assert memory_format(got) == memory_format(want) == "channels_last"
    torch.testing.assert_close(got, want)
    g = torch.randn(want.shape, dtype=want.dtype)
    gx, gw = torch.autograd.grad(got, (x, w), g)
    sx, sw = torch.autograd.grad(want, (x, w), g)
    assert memory_format(gx) == memory_format(sx)
    torch.testing.assert_close(gx, sx)
    torch.testing.assert_close(gw, sw)


@pytest.mark.parametrize("layout", ["channels_last", "sliced_channels_last"])
def test_item12_global_adaptive_pool_gradient_is_contiguous(layout):
    # torch computes a 1 x 1 adaptive output as a mean over H and W: its gradient comes back
    # contiguous whatever the input's layout (cnnext's was channels_last).
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last) \
        if layout == "channels_last" else _sliced_channels_last((2, 3, 6, 6))
    x.requires_grad_()
    g = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    gx, = torch.autograd.grad(CF.adaptive_avg_pool2d(x, 1), x, g)
    sx, = torch.autograd.grad(F.adaptive_avg_pool2d(x, 1), x, g)
    assert memory_format(sx) == "contiguous" and memory_format(gx) == "contiguous"
    torch.testing.assert_close(gx, sx)


def test_item12_fake_kernel_layout_matches_the_op():
    # The fake (meta) kernels state the same rule: torch.compile and opcheck see the layout
    # the real kernel returns.
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = _sliced_channels_last((2, 3, 6, 8), torch.float32)
    real = torch.ops.cnnext.avg_pool2d(x, [2, 2], [], [0, 0], False, True, None)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fake = torch.ops.cnnext.avg_pool2d(fx, [2, 2], [], [0, 0], False, True, None)
    assert fake.stride() == real.stride()
    assert memory_format(real) == "channels_last"


# --------------------------------------------------------------------------------------------
# Item 11 and the OpInfo error inputs: exception types as torch's
# --------------------------------------------------------------------------------------------

def _raises_like_torch(ours, stock, match):
    with pytest.raises(Exception) as s:
        stock()
    with pytest.raises(Exception, match=match) as o:
        ours()
    assert type(o.value) is type(s.value), f"cnnext {type(o.value).__name__}, torch {type(s.value).__name__}"


@pytest.mark.parametrize("case", ["weight", "bias", "long_input"])
@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
def test_item11_conv_dtype_mismatch_is_runtime_error(op, case):
    # torch: RuntimeError ("expected scalar type Float but found Double", "Input type
    # (long int) and bias type (double) should be the same"); cnnext raised TypeError.
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(2, 2, 3, 3)
    b = None
    if case == "weight":
        w = w.double()
    elif case == "bias":
        b = torch.zeros(2, dtype=torch.float64)
    else:
        x, w, b = x.long(), w.double(), torch.zeros(2, dtype=torch.float64)
    ours, stock = (CF.conv2d, F.conv2d) if op == "conv2d" else (CF.conv_transpose2d, F.conv_transpose2d)
    if op == "conv_transpose2d" and case == "bias":
        # torch's transposed convolution takes a float64 bias with float32 input; cnnext
        # refuses it, with torch's exception type for a dtype mismatch.
        with pytest.raises(RuntimeError, match="expected bias to have the same dtype as input"):
            ours(x, w, b)
        return
    _raises_like_torch(lambda: ours(x, w, b), lambda: stock(x, w, b), "weight|bias")


@pytest.mark.parametrize("size", [(), (5,), [5], (2, 3, 4)])
def test_item11_adaptive_output_size_length_is_runtime_error(size):
    # torch: RuntimeError "output_size must be 2"; cnnext raised ValueError (and took (5,)).
    x = torch.randn(1, 2, 6, 6)
    _raises_like_torch(lambda: CF.adaptive_avg_pool2d(x, size), lambda: F.adaptive_avg_pool2d(x, size),
                       "output_size")


def test_item11_pair_arguments_of_three_are_runtime_error():
    x = torch.randn(1, 2, 6, 6)
    _raises_like_torch(lambda: CF.max_pool2d(x, (2, 2, 2)), lambda: F.max_pool2d(x, (2, 2, 2)), "kernel_size")
    _raises_like_torch(lambda: CF.avg_pool2d(x, (2, 2, 2)), lambda: F.avg_pool2d(x, (2, 2, 2)), "kernel_size")
    w = torch.randn(2, 2, 1, 1)
    _raises_like_torch(lambda: CF.conv2d(x, w, stride=(1, 1, 1)), lambda: F.conv2d(x, w, stride=(1, 1, 1)),
                       "stride")


def test_item11_unpool_indices_dtype_is_runtime_error():
    x = torch.randn(1, 2, 3, 3)
    idx = torch.zeros(1, 2, 3, 3, dtype=torch.int32)
    _raises_like_torch(lambda: CF.max_unpool2d(x, idx, 2), lambda: F.max_unpool2d(x, idx, 2), "indices")


def test_item11_unsupported_dtype_is_not_implemented_error():
    # torch's dtype dispatch raises NotImplementedError ("not implemented for 'ComplexFloat'").
    x = torch.randn(1, 2, 4, 4).to(torch.complex64)
    _raises_like_torch(lambda: CF.avg_pool2d(x, 2), lambda: F.avg_pool2d(x, 2), "avg_pool2d: expected input")


@pytest.mark.parametrize("eps, training", [(0.0, True), (-1.0, True), (-1.0, False)])
def test_batch_norm_eps_checked_as_torch(eps, training):
    # BatchNorm2d's ModuleInfo error inputs: torch raises ValueError for eps <= 0 in
    # training (eps < 0 in eval); the fused op ran with it.
    x = torch.randn(2, 3, 4, 4)
    stock = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, eps=eps)).train(training)
    ours = cnnext.fuse(stock)
    assert isinstance(ours[0], cnnext.nn.FusedConv2d)
    _raises_like_torch(lambda: ours(x), lambda: stock(x), "eps")


# --------------------------------------------------------------------------------------------
# Item 9 remainder: accurate sums in float32 (float64 references, under 1 GB)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("output_size", [2, 3, (1, 5), (7, 1)])
def test_item09_adaptive_large_windows_float32(output_size, transposed):
    # A few outputs of a 4096^2 plane: windows of millions of elements, which the row
    # kernel summed as columns of whole window heights in float (1.8e-6 off).
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 4096, 4096, generator=g) + 3
    if transposed:
        x = x.transpose(-1, -2)
    want = F.adaptive_avg_pool2d(x.double(), output_size)
    got = CF.adaptive_avg_pool2d(x, output_size)
    err = ((got.double() - want).abs() / want.abs()).max().item()
    assert err < 3e-7, f"relative error {err}"


def test_item09_avg_pool_huge_kernel_float32():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 4096, 4096, generator=g) + 3
    want = F.avg_pool2d(x.double(), 2000)
    err = ((CF.avg_pool2d(x, 2000).double() - want).abs() / want.abs()).max().item()
    assert err < 3e-7, f"relative error {err}"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_item09_weight_and_bias_gradients_float32_large_planes(layout):
    # Sums over 2 x 2048^2 positions: the weight and bias gradients stay within a few
    # float32 roundings of the float64 ones.
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 2, 1024, 2048, generator=g) + 3
    gy = torch.rand(2, 3, 1024, 2048, generator=g) + 1
    if layout == "channels_last":
        x, gy = x.contiguous(memory_format=torch.channels_last), gy.contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 2, 1, 1, generator=g, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    gw, gb = torch.autograd.grad(CF.conv2d(x, w, b), (w, b), gy)
    want_w = torch.einsum("nchw,nohw->oc", x.double(), gy.double()).view(3, 2, 1, 1)
    want_b = gy.double().sum((0, 2, 3))
    assert ((gw.double() - want_w).abs() / want_w.abs()).max().item() < 1e-6
    assert ((gb.double() - want_b).abs() / want_b.abs()).max().item() < 1e-6


def test_item09_batch_norm_statistics_float32_large_planes():
    # The fused op's batch statistics (mean and variance over 2 x 1024 x 2048 values)
    # against float64: the normalised output and the running statistics.
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 2, 1024, 2048, generator=g) * 0.01 + 100
    w = torch.ones(2, 1, 1, 1)
    rm, rv = torch.zeros(2), torch.ones(2)
    out = CF.conv_bn_relu2d(x, w, None, None, None, rm, rv, True, momentum=1.0, groups=2, relu=False)
    x64 = x.double()
    mean = x64.mean((0, 2, 3))
    var = x64.var((0, 2, 3))
    torch.testing.assert_close(rm.double(), mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(rv.double(), var, rtol=1e-4, atol=0)
    want = (x64 - mean.view(1, 2, 1, 1)) / (x64.var((0, 2, 3), unbiased=False).view(1, 2, 1, 1) + 1e-5).sqrt()
    assert (out.double() - want).abs().max().item() < 1e-3


def test_item12_unbatched_transposed_conv_cut_gradient_keeps_channels_last():
    # OpInfo conv_transpose2d sample 3 (unbatched, output_padding >= stride) with channels
    # innermost, found by tests/test_opinfo.py and the fuzz: torch's input gradient has strides
    # (1, W*C, C); cnnext's is contiguous. Fix: for a 3-D gx, take the layout of gx.unsqueeze(0)
    # and squeeze after: gx.unsqueeze(0).contiguous(layout_of({gx.unsqueeze(0)})).squeeze(0).
    x = torch.randn(2, 4, 4, dtype=torch.float64).permute(1, 2, 0).contiguous().permute(2, 0, 1).requires_grad_()
    w = torch.randn(2, 2, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    kw = dict(stride=(3, 2), padding=(1, 2), output_padding=(2, 3), groups=2, dilation=(4, 4))
    y, ys = CF.conv_transpose2d(x, w, **kw), F.conv_transpose2d(x, w, **kw)
    g = torch.randn(ys.shape, dtype=ys.dtype)
    gx, = torch.autograd.grad(y, x, g)
    sx, = torch.autograd.grad(ys, x, g)
    torch.testing.assert_close(gx, sx)
    assert gx.stride() == sx.stride()


@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
def test_item12_ambiguous_output_gradient_takes_the_input_layout(op):
    # Found by the fuzz: input (1, 2, 1, 2) channels_last, one output channel: the output is
    # both contiguous and channels_last, grad_output.contiguous(channels_last) keeps NCHW
    # strides, and the input gradient comes back NCHW; torch's is channels_last (it takes the
    # layout from the input and weight). Fix: in in_forward_layout, when the forward was
    # channels_last, give g exact channels_last strides (at::empty_like(g,
    # at::MemoryFormat::ChannelsLast).copy_(g) when g.suggest_memory_format() is not
    # ChannelsLast), or pass the forward's layout to the backward ops.
    x = torch.randn(1, 2, 1, 2, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    if op == "conv2d":
        w = torch.randn(1, 2, 1, 1, dtype=torch.float64)
        y, ys = CF.conv2d(x, w), F.conv2d(x, w)
    else:
        w = torch.randn(2, 1, 1, 1, dtype=torch.float64)
        y, ys = CF.conv_transpose2d(x, w), F.conv_transpose2d(x, w)
    g = torch.randn(ys.shape, dtype=ys.dtype)
    gx, = torch.autograd.grad(y, x, g)
    sx, = torch.autograd.grad(ys, x, g)
    torch.testing.assert_close(gx, sx)
    assert memory_format(sx) == "channels_last"
    assert memory_format(gx) == memory_format(sx)
