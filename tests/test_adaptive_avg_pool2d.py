"""cnnext.functional.adaptive_avg_pool2d, torch.ops.cnnext.adaptive_avg_pool2d(_backward) and
cnnext.nn.AdaptiveAvgPool2d against torch.nn.functional.adaptive_avg_pool2d / torch.nn.AdaptiveAvgPool2d."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import cnnext
from cnnext.functional import adaptive_avg_pool2d
from cnnext.testing import LAYOUTS, assert_double_backward_matches, assert_gradchecks
from cnnext.testing import assert_pool_module_like_torch, check_layout_like_torch, check_parity
from cnnext.testing import check_pool_on_device, cpu_and_cuda, cuda_only, device_dtypes, leaf, to_layout
from conftest import examples
from strategies import batch_shape, pair_arg, pool_layouts

ops = torch.ops.cnnext

# (input shape, output_size, layout)
GRID = {
    "global": ((2, 3, 4, 5), 1, "contiguous"),
    "global_channels_last": ((2, 3, 3, 3), (1, 1), "channels_last"),
    "divides": ((1, 2, 6, 4), (3, 2), "contiguous"),
    "overlapping": ((1, 2, 5, 7), (3, 4), "contiguous"),
    "larger_than_input": ((1, 2, 3, 2), (5, 4), "contiguous"),
    "keep_dim": ((1, 2, 5, 4), (None, 3), "sliced"),
    "unbatched": ((2, 5, 6), (4, 3), "contiguous"),
    "channels_last": ((2, 3, 5, 6), (2, 4), "channels_last"),
}


def grid_case(case):
    shape, size, layout = GRID[case]
    return leaf(torch.randn(shape, dtype=torch.float64), layout), size


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("case", GRID)
def test_gradcheck(case):
    x, size = grid_case(case)
    assert_gradchecks(lambda t: adaptive_avg_pool2d(t, size), lambda t: F.adaptive_avg_pool2d(t, size), x)


def test_double_backward_runs_on_cnnext_ops_and_matches_torch():
    x, size = grid_case("overlapping")
    assert_double_backward_matches(lambda t: adaptive_avg_pool2d(t, size), lambda t: F.adaptive_avg_pool2d(t, size),
                                   x, "adaptive_avg_pool2d_backward")


@st.composite
def configs(draw):
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    shape = draw(batch_shape(h, w))
    oh, ow = draw(st.integers(1, 14)), draw(st.integers(1, 14))
    kind = draw(st.integers(0, 5))
    if kind == 0:
        size = 1  # global
    elif kind == 1:
        size = (None, ow) if draw(st.booleans()) else [oh, None]
    else:
        size = pair_arg(draw, (oh, ow))
    return shape, size


@settings(max_examples=examples(120))
@given(c=configs(), lay=pool_layouts(), dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 99))
def test_parity_random(c, lay, dtype, seed):
    shape, size = c
    ours = lambda t: adaptive_avg_pool2d(t, size)  # noqa: E731
    ref = lambda t: F.adaptive_avg_pool2d(t, size)  # noqa: E731
    check_parity(ours, ref, shape, dtype, lay[0], lay[1], seed)
    check_layout_like_torch(ours, ref, shape, lay[0])


# The hot shapes (global pooling of ResNet / GoogLeNet / DenseNet / NiN) and sizes past
# the kernels' parallel grain and channel blocks.
LARGE = [
    ((8, 512, 7, 7), 1),
    ((4, 1030, 3, 3), 1),
    ((8, 10, 5, 5), 1),
    ((2, 64, 33, 31), 1),
    ((3, 40, 23, 17), (7, 5)),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(LARGE)))
def test_parity_large(case, dtype, layout):
    shape, size = LARGE[case]
    for g_layout in ("contiguous", "expanded"):
        check_parity(lambda t: adaptive_avg_pool2d(t, size), lambda t: F.adaptive_avg_pool2d(t, size), shape,
                     dtype, layout, g_layout, case)


def test_zero_output_size_and_zero_channels_like_torch():
    """torch accepts output_size 0 (an empty output) and C = 0 for adaptive pooling."""
    for shape, size in (((2, 3, 4, 5), 0), ((2, 3, 4, 5), (0, 2)), ((2, 0, 4, 4), 2), ((0, 3, 4, 4), (2, 3))):
        x = torch.randn(shape, requires_grad=True)
        y = adaptive_avg_pool2d(x, size)
        assert y.shape == F.adaptive_avg_pool2d(x, size).shape
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert gx.shape == x.shape and torch.count_nonzero(gx) == 0


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_deterministic(device):
    g = torch.randn(4, 16, 7, 9, device=device)
    x = torch.randn(4, 16, 19, 20, device=device).contiguous(memory_format=torch.channels_last)
    runs = [ops.adaptive_avg_pool2d_backward(g, x) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("device", cuda_only())
def test_mixed_devices_raise(device):
    x = torch.randn(2, 3, 6, 6, device=device)
    with pytest.raises(RuntimeError, match="adaptive_avg_pool2d_backward: expected input to be on the same device"):
        ops.adaptive_avg_pool2d_backward(torch.randn(2, 3, 1, 1, device=device), x.cpu())


# Every device: against torch in float64 from the very values the run sees and, on CUDA,
# against cnnext's CPU backend; every layout.
DEVICE_CONFIGS = [
    ((4, 64, 7, 7), dict(output_size=1)),  # CUDA: a warp per plane
    ((4, 300, 3, 3), dict(output_size=1)),  # CUDA: a thread per plane
    ((2, 3, 7, 9), dict(output_size=(3, 4))),
    ((1, 3, 3, 4), dict(output_size=(5, 7))),
    ((3, 5, 6), dict(output_size=(2, None))),  # unbatched
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device, dtype", device_dtypes())
@pytest.mark.parametrize("cfg", range(len(DEVICE_CONFIGS)))
def test_parity_on_device(cfg, device, dtype, layout):
    check_pool_on_device(adaptive_avg_pool2d, F.adaptive_avg_pool2d, *DEVICE_CONFIGS[cfg], dtype, layout, device, cfg)


def test_bad_inputs_raise():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"adaptive_avg_pool2d: expected output_size to be non-negative, got \[-1, 2\]"):
        adaptive_avg_pool2d(x, (-1, 2))
    with pytest.raises(RuntimeError, match="adaptive_avg_pool2d: expected output_size to be an int or a pair"):
        adaptive_avg_pool2d(x, (1, 2, 3))
    with pytest.raises(TypeError, match="adaptive_avg_pool2d: expected output_size to be an int"):
        adaptive_avg_pool2d(x, 1.5)
    with pytest.raises(RuntimeError, match="adaptive_avg_pool2d: expected input with non-zero height and width"):
        adaptive_avg_pool2d(torch.randn(2, 3, 0, 4), 2)
    with pytest.raises(RuntimeError, match=r"adaptive_avg_pool2d: expected input to be 3-D \(C, H, W\) or 4-D"):
        adaptive_avg_pool2d(torch.randn(2, 2, 3, 4, 4), 2)
    with pytest.raises(NotImplementedError, match="adaptive_avg_pool2d: expected input to be float16, bfloat16, float32 or float64, got Int"):
        adaptive_avg_pool2d(torch.ones(1, 1, 4, 4, dtype=torch.int32), 2)
    with pytest.raises(RuntimeError, match=r"adaptive_avg_pool2d: expected output_size to be a single integer or a pair"):
        ops.adaptive_avg_pool2d(x, [1, 2, 3])
    op = "adaptive_avg_pool2d_backward"
    with pytest.raises(RuntimeError, match=rf"{op}: expected grad_output of shape \[2, 3, 2, 2\]"):
        ops.adaptive_avg_pool2d_backward(torch.randn(2, 4, 2, 2), x)
    with pytest.raises(RuntimeError, match=f"{op}: expected grad_output .* both batched or both unbatched"):
        ops.adaptive_avg_pool2d_backward(torch.randn(3, 2, 2), x)
    with pytest.raises(RuntimeError, match=f"{op}: expected input to have the same dtype as grad_output"):
        ops.adaptive_avg_pool2d_backward(torch.randn(2, 3, 2, 2, dtype=torch.float64), x)


OPCHECK = [
    ((2, 3, 7, 6), [1, 1], "contiguous"),
    ((2, 3, 7, 6), [3, 4], "contiguous"),
    ((2, 3, 7, 6), [3, 4], "channels_last"),
    ((3, 5, 5), [7, 2], "contiguous"),
    ((0, 2, 4, 4), [2, 2], "contiguous"),
]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", range(len(OPCHECK)))
def test_opcheck(case, device):
    shape, size, layout = OPCHECK[case]
    x = to_layout(torch.randn(shape, dtype=torch.float64, device=device), layout).requires_grad_()
    results = torch.library.opcheck(ops.adaptive_avg_pool2d.default, (x, size))
    assert set(results.values()) == {"SUCCESS"}, results
    y = ops.adaptive_avg_pool2d(x.detach(), size)
    g = to_layout(torch.randn(y.shape, dtype=torch.float64, device=device), layout).requires_grad_()
    results = torch.library.opcheck(ops.adaptive_avg_pool2d_backward.default, (g, x.detach()))
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("case", range(len(OPCHECK)))
def test_fake_kernel_metadata(case):
    shape, size, layout = OPCHECK[case]
    x = to_layout(torch.randn(shape, dtype=torch.float64), layout)
    real = ops.adaptive_avg_pool2d(x, size)
    with FakeTensorMode() as mode:
        fake = ops.adaptive_avg_pool2d(mode.from_tensor(x), size)
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype


@pytest.mark.parametrize("size", [1, (3, 2), (None, 4), 7])
def test_module_matches_torch(size):
    assert_pool_module_like_torch(cnnext.nn.AdaptiveAvgPool2d(size), torch.nn.AdaptiveAvgPool2d(size))
