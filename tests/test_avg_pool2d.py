"""cnnext.functional.avg_pool2d, torch.ops.cnnext.avg_pool2d(_backward) and
cnnext.nn.AvgPool2d against torch.nn.functional.avg_pool2d / torch.nn.AvgPool2d."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import cnnext
from cnnext.functional import avg_pool2d
from cnnext.testing import LAYOUTS, assert_double_backward_matches, assert_gradchecks
from cnnext.testing import assert_pool_module_like_torch, check_layout_like_torch, check_parity
from cnnext.testing import check_pool_on_device, cpu_and_cuda, cuda_only, device_dtypes, leaf, to_layout
from conftest import examples
from strategies import batch_shape, pair_arg, pool_layouts

ops = torch.ops.cnnext

# --------------------------------------------------------------------------------------------
# float64 gradcheck / gradgradcheck grid
# --------------------------------------------------------------------------------------------

# (input shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, layout)
GRID = {
    "2x2": ((2, 3, 4, 6), 2, None, 0, False, True, None, "contiguous"),
    "3x3_s2_p1": ((1, 2, 5, 6), 3, 2, 1, False, True, None, "contiguous"),
    "3x3_s2_p1_exclude_pad": ((1, 2, 5, 6), 3, 2, 1, False, False, None, "contiguous"),
    "ceil_mode": ((2, 2, 5, 7), 2, 2, 0, True, True, None, "contiguous"),
    "ceil_mode_pad_exclude": ((1, 2, 6, 5), (3, 2), (2, 3), 1, True, False, None, "contiguous"),
    "ceil_mode_pad_include": ((1, 2, 6, 5), (3, 2), (2, 3), (1, 0), True, True, None, "contiguous"),
    "overlapping": ((1, 2, 5, 5), 3, 1, 1, False, True, None, "contiguous"),
    "divisor_override": ((1, 2, 5, 4), 2, 1, 1, True, False, 3, "contiguous"),
    "negative_divisor": ((1, 1, 4, 4), 2, 2, 0, False, True, -2, "contiguous"),
    "global": ((2, 3, 3, 4), (3, 4), None, 0, False, True, None, "contiguous"),
    "unbatched": ((2, 5, 4), 2, (1, 2), (1, 0), True, False, None, "contiguous"),
    "channels_last": ((2, 3, 5, 4), 3, 2, 1, True, True, None, "channels_last"),
    "channels_last_global": ((2, 3, 3, 3), 3, None, 0, False, True, None, "channels_last"),
    "sliced": ((1, 2, 5, 4), 2, 1, 1, False, False, None, "sliced"),
}


def grid_case(case):
    shape, k, s, p, ceil, cip, div, layout = GRID[case]
    x = leaf(torch.randn(shape, dtype=torch.float64), layout)
    return x, dict(kernel_size=k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=cip,
                   divisor_override=div)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("case", GRID)
def test_gradcheck(case):
    x, kw = grid_case(case)
    assert_gradchecks(lambda t: avg_pool2d(t, **kw), lambda t: F.avg_pool2d(t, **kw), x)


def test_double_backward_runs_on_cnnext_ops_and_matches_torch():
    x, kw = grid_case("ceil_mode_pad_exclude")
    assert_double_backward_matches(lambda t: avg_pool2d(t, **kw), lambda t: F.avg_pool2d(t, **kw), x,
                                   "avg_pool2d_backward")


# --------------------------------------------------------------------------------------------
# Random configurations x layouts, against torch
# --------------------------------------------------------------------------------------------


@st.composite
def configs(draw, max_hw=10):
    dims = []
    for _ in range(2):
        k = draw(st.integers(1, 5))
        p = draw(st.integers(0, k // 2))
        size = draw(st.integers(max(1, k - 2 * p), max_hw))
        s = draw(st.integers(1, 4))
        dims.append((size, k, s, p))
    (h, kh, sh, ph), (w, kw, sw, pw) = dims
    shape = draw(batch_shape(h, w))
    stride = None if draw(st.integers(0, 4)) == 0 else pair_arg(draw, (sh, sw))
    kwargs = dict(kernel_size=pair_arg(draw, (kh, kw)), stride=stride, padding=pair_arg(draw, (ph, pw)),
                  ceil_mode=draw(st.booleans()), count_include_pad=draw(st.booleans()),
                  divisor_override=draw(st.sampled_from([None, None, None, 1, 3, -2])))
    return shape, kwargs


@settings(max_examples=examples(150))
@given(c=configs(), lay=pool_layouts(), dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 99))
def test_parity_random(c, lay, dtype, seed):
    shape, kw = c
    ours = lambda t: avg_pool2d(t, **kw)  # noqa: E731
    ref = lambda t: F.avg_pool2d(t, **kw)  # noqa: E731
    out, gx = check_parity(ours, ref, shape, dtype, lay[0], lay[1], seed)
    if len(shape) == 4 and shape[0] == 0:
        assert out.numel() == 0 and gx.shape == torch.Size(shape)
    check_layout_like_torch(ours, ref, shape, lay[0])


# Sizes whose planes, rows and channel counts cross the kernels' parallel grain and
# channel blocks, multi-threaded.
LARGE = [
    ((4, 40, 28, 28), dict(kernel_size=2, stride=2)),
    ((2, 24, 33, 17), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ((3, 1100, 7, 7), dict(kernel_size=7)),  # global, more channels than a channel block
    ((2, 1030, 5, 6), dict(kernel_size=3, stride=1, padding=1)),
    ((2, 40, 6, 5), dict(kernel_size=1, stride=2)),  # one-pixel windows
    ((2, 36, 11, 10), dict(kernel_size=5, stride=3, padding=2, ceil_mode=True)),  # up to 25 pixels
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(LARGE)))
def test_parity_large(case, dtype, layout):
    shape, kw = LARGE[case]
    check_parity(lambda t: avg_pool2d(t, **kw), lambda t: F.avg_pool2d(t, **kw), shape, dtype, layout,
                 "contiguous" if layout == "permuted" else layout, case)


# Every device: against torch in float64 from the very values the run sees and, on CUDA,
# against cnnext's CPU backend; every layout.
DEVICE_CONFIGS = [
    ((2, 3, 8, 9), dict(kernel_size=2)),
    ((2, 3, 7, 9), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ((1, 4, 7, 6), dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 0), ceil_mode=True)),
    ((2, 2, 5, 5), dict(kernel_size=3, stride=1, padding=1, divisor_override=4)),
    ((4, 64, 7, 7), dict(kernel_size=7)),  # global by kernel
    ((0, 3, 6, 6), dict(kernel_size=2)),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device, dtype", device_dtypes())
@pytest.mark.parametrize("cfg", range(len(DEVICE_CONFIGS)))
def test_parity_on_device(cfg, device, dtype, layout):
    shape, kw = DEVICE_CONFIGS[cfg]
    check_pool_on_device(avg_pool2d, F.avg_pool2d, shape, kw, dtype, layout, device, seed=cfg)


@pytest.mark.parametrize("device", cuda_only())
def test_mixed_devices_raise(device):
    x = torch.randn(2, 3, 6, 6, device=device)
    with pytest.raises(RuntimeError, match="avg_pool2d_backward: expected input to be on the same device"):
        ops.avg_pool2d_backward(torch.randn(2, 3, 3, 3), x, [2, 2], [2, 2], [0, 0], False, True, None)


def test_every_window_holds_input_with_ceil_mode():
    """With torch's ceil_mode rule no window lies wholly in the padding, so
    count_include_pad=False never divides by zero: on ones, every output is exactly 1
    (and torch agrees), over every small configuration."""
    for size, k, s in itertools.product(range(1, 7), range(1, 5), range(1, 5)):
        for p in range(k // 2 + 1):
            if size + 2 * p < k:
                continue
            x = torch.ones(1, 1, size, size + 1, dtype=torch.float64)
            kw = dict(kernel_size=k, stride=s, padding=p, ceil_mode=True, count_include_pad=False)
            y = avg_pool2d(x, **kw)
            assert torch.equal(y, torch.ones_like(y)), (size, k, s, p)
            assert torch.equal(y, F.avg_pool2d(x, **kw)), (size, k, s, p)


def test_empty_batch():
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    y = avg_pool2d(x, 3, 2, 1, ceil_mode=True)
    assert y.shape == (0, 3, 5, 5) == F.avg_pool2d(x, 3, 2, 1, ceil_mode=True).shape
    y.sum().backward()
    assert x.grad.shape == x.shape


# (input shape, grad_output shape) per device
DETERMINISTIC = {"cpu": ((4, 16, 19, 19), (4, 16, 17, 17)), "cuda": ((8, 32, 17, 19), (8, 32, 15, 17))}


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_deterministic(device):
    xshape, gshape = DETERMINISTIC[device]
    x = torch.randn(xshape, dtype=torch.float32, device=device)
    g = torch.randn(gshape, device=device)
    runs = [ops.avg_pool2d_backward(g, x, [3, 3], [1, 1], [0, 0], False, True, None) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_stride_default_and_empty_list():
    x = torch.randn(2, 3, 9, 8)
    for stride in (None, [], ()):
        torch.testing.assert_close(avg_pool2d(x, (3, 2), stride), F.avg_pool2d(x, (3, 2)), rtol=0, atol=1e-6)
    torch.testing.assert_close(ops.avg_pool2d(x, [3, 2], [], [0, 0], False, True, None),
                               F.avg_pool2d(x, (3, 2)), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

BAD = [
    (dict(kernel_size=0), "avg_pool2d: expected kernel_size to be at least 1"),
    (dict(kernel_size=(2, -1)), "avg_pool2d: expected kernel_size to be at least 1"),
    (dict(kernel_size=2, stride=0), "avg_pool2d: expected stride to be at least 1"),
    (dict(kernel_size=2, padding=-1), "avg_pool2d: expected padding to be non-negative"),
    (dict(kernel_size=3, padding=2), "avg_pool2d: expected padding to be at most half of kernel_size"),
    (dict(kernel_size=2, divisor_override=0), "avg_pool2d: expected divisor_override to be non-zero"),
    (dict(kernel_size=9), r"avg_pool2d: expected the window \(kernel_size \[9, 9\].*to fit in the padded input"),
    (dict(kernel_size=(2, 2, 2)), "avg_pool2d: expected kernel_size to be an int or a pair"),
    (dict(kernel_size=2, stride=(1, 2, 3)), "avg_pool2d: expected stride to be an int or a pair"),
]


@pytest.mark.parametrize("kw,match", BAD)
def test_bad_arguments_raise(kw, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        avg_pool2d(torch.randn(2, 3, 8, 8), **kw)


def test_bad_inputs_raise():
    with pytest.raises(RuntimeError, match=r"avg_pool2d: expected input to be 3-D \(C, H, W\) or 4-D"):
        avg_pool2d(torch.randn(8, 8), 2)
    with pytest.raises(NotImplementedError, match="avg_pool2d: expected input to be float16, bfloat16, float32 or float64, got Int"):
        avg_pool2d(torch.ones(1, 1, 4, 4, dtype=torch.int32), 2)
    with pytest.raises(RuntimeError, match="avg_pool2d: expected input with non-zero channels, height and width"):
        avg_pool2d(torch.randn(2, 0, 4, 4), 2)
    with pytest.raises(RuntimeError, match="avg_pool2d: expected input with non-zero channels, height and width"):
        avg_pool2d(torch.randn(2, 3, 0, 4), 1)
    with pytest.raises(TypeError, match="avg_pool2d: expected divisor_override to be an int"):
        avg_pool2d(torch.randn(1, 1, 4, 4), 2, divisor_override=2.5)
    with pytest.raises(TypeError, match="avg_pool2d: expected kernel_size to be an int or a pair"):
        avg_pool2d(torch.randn(1, 1, 4, 4), True)


def test_backward_op_bad_inputs_raise():
    x = torch.randn(2, 3, 6, 6)
    conf = ([2, 2], [2, 2], [0, 0], False, True, None)
    with pytest.raises(RuntimeError, match=r"avg_pool2d_backward: expected grad_output of shape \[2, 3, 3, 3\]"):
        ops.avg_pool2d_backward(torch.randn(2, 3, 3, 4), x, *conf)
    with pytest.raises(RuntimeError, match="avg_pool2d_backward: expected grad_output .* both batched or both"):
        ops.avg_pool2d_backward(torch.randn(3, 3, 3), x, *conf)
    with pytest.raises(RuntimeError, match="avg_pool2d_backward: expected input to have the same dtype as grad_output"):
        ops.avg_pool2d_backward(torch.randn(2, 3, 3, 3, dtype=torch.float64), x, *conf)
    with pytest.raises(RuntimeError, match="avg_pool2d_backward: expected divisor_override to be non-zero"):
        ops.avg_pool2d_backward(torch.randn(2, 3, 3, 3), x, [2, 2], [2, 2], [0, 0], False, True, 0)


# --------------------------------------------------------------------------------------------
# opcheck, fake kernel
# --------------------------------------------------------------------------------------------

OPCHECK = [
    ((2, 3, 7, 6), [3, 3], [2, 2], [1, 1], True, False, None, "contiguous"),
    ((2, 3, 7, 6), [2, 3], [], [0, 1], False, True, 5, "channels_last"),
    ((3, 5, 5), [2, 2], [1, 2], [1, 0], True, True, None, "contiguous"),
    ((0, 2, 4, 4), [2, 2], [2, 2], [0, 0], False, True, None, "contiguous"),
]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", range(len(OPCHECK)))
def test_opcheck(case, device):
    shape, *conf, layout = OPCHECK[case]
    x = to_layout(torch.randn(shape, dtype=torch.float64, device=device), layout).requires_grad_()
    results = torch.library.opcheck(ops.avg_pool2d.default, (x, *conf))
    assert set(results.values()) == {"SUCCESS"}, results
    y = ops.avg_pool2d(x.detach(), *conf)
    g = to_layout(torch.randn(y.shape, dtype=torch.float64, device=device), layout).requires_grad_()
    results = torch.library.opcheck(ops.avg_pool2d_backward.default, (g, x.detach(), *conf))
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("case", range(len(OPCHECK)))
def test_fake_kernel_metadata(case):
    shape, *conf, layout = OPCHECK[case]
    x = to_layout(torch.randn(shape, dtype=torch.float64), layout)
    real = ops.avg_pool2d(x, *conf)
    with FakeTensorMode() as mode:
        fake = ops.avg_pool2d(mode.from_tensor(x), *conf)
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype


def test_torch_compile():
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    fn = torch.compile(lambda t: avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=False).square().sum(),
                       backend="aot_eager", fullgraph=True)
    (g,) = torch.autograd.grad(fn(x), x)
    xx = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(F.avg_pool2d(xx, 3, 2, 1, True, False).square().sum(), xx)
    torch.testing.assert_close(g, want)


# --------------------------------------------------------------------------------------------
# nn.AvgPool2d
# --------------------------------------------------------------------------------------------

MODULES = [
    dict(kernel_size=2),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), ceil_mode=True, count_include_pad=False),
    dict(kernel_size=3, stride=1, padding=1, divisor_override=4),
]


@pytest.mark.parametrize("kw", MODULES)
def test_module_matches_torch(kw):
    assert_pool_module_like_torch(cnnext.nn.AvgPool2d(**kw), torch.nn.AvgPool2d(**kw))
