"""Shared helpers of the cnnext test suite: seeding, memory layouts, comparisons."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import cnnext  # noqa: F401  (registers torch.ops.cnnext.*)

# No example database in the repository; deadlines are meaningless on a shared CI box.
settings.register_profile(
    "cnnext", database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("cnnext")

# CNNEXT_HYPOTHESIS_SCALE=20 runs twenty times the examples of every hypothesis test.
_EXAMPLES_SCALE = int(os.environ.get("CNNEXT_HYPOTHESIS_SCALE", "1"))


def examples(n):
    """max_examples for a hypothesis test: n, times CNNEXT_HYPOTHESIS_SCALE."""
    return n * _EXAMPLES_SCALE

# contiguous; channels_last; "sliced": every other element of a wider tensor (stride 2
# in W, so neither layout is dense; NaN in between); "permuted": H and W swapped in memory;
# "offset": the middle channels of a larger tensor (plain strides but a storage offset and
# a batch stride larger than C * H * W).
LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted", "offset")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def single_thread():
    """Runs a test on one intra-op thread. For gradcheck: it calls the ops thousands of times
    on tiny tensors, and on a busy 2-core machine every parallel region can stall for a
    scheduler time slice. The multi-threaded paths are covered by the parity tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def to_layout(t, layout):
    """A copy of t (3-D or 4-D) with the same values in the given memory layout."""
    t = t.detach()
    if layout == "contiguous":
        out = t.contiguous()
    elif layout == "channels_last":
        # 3-D (C, H, W): channels innermost, as an unbatched channels_last image.
        out = (t.contiguous(memory_format=torch.channels_last) if t.dim() == 4
               else t.permute(1, 2, 0).contiguous().permute(2, 0, 1))
    elif layout == "sliced":
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
        wide[..., ::2] = t
        out = wide[..., ::2]
    elif layout == "permuted":
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "offset":
        cdim = t.dim() - 3
        shape = list(t.shape)
        shape[cdim] += 2
        big = torch.full(shape, float("nan"), dtype=t.dtype)
        out = big.narrow(cdim, 1, t.shape[cdim])
        out.copy_(t)
    else:
        raise ValueError(layout)
    assert torch.equal(out, t)
    return out


def layouts(t):
    """{layout name: t in that layout} for every name of LAYOUTS."""
    return {name: to_layout(t, name) for name in LAYOUTS}


def leaf(t, layout="contiguous"):
    """t in the given layout as a fresh leaf that requires grad."""
    return to_layout(t, layout).requires_grad_(True)


def is_channels_last(t):
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def assert_close_scaled(actual, expected, rtol, what=""):
    """Equal shape, dtype, and values within rtol of the largest magnitude of expected
    (a relative bound that does not blow up on entries that cancel to near zero)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if expected.numel() == 0:
        return
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} * max |expected| {scale:.3e}"
