"""Shared helpers of the cnnext test suite: seeding, memory layouts, comparisons."""
import io
import os

import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st

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
def strict_fp32():
    """float32 on CUDA follows torch's TF32 flag, which is on by default for convolutions;
    tests that compare strict float32 with tight tolerances turn TF32 off while they run
    (pytest.mark.usefixtures("strict_fp32"))."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


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


RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
GRAD_NAMES = ["output", "grad_input", "grad_weight", "grad_bias"]


def assert_matches(ours, ref, mag, rtol, what=""):
    """Each result within rtol of the largest magnitude of the terms it sums."""
    for a, e, m, name in zip(ours, ref, mag, GRAD_NAMES):
        assert a.shape == e.shape, f"{name} {what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if e.numel() == 0:
            continue
        bound = rtol * max(m.max().item(), 1e-300)
        err = (a.double() - e).abs().max().item()
        assert err <= bound, f"{name} {what}: max abs error {err:.3e} > {bound:.3e}"


class Parity:
    """Parity of a cnnext convolution (`ours`) with its torch.nn.functional namesake
    (`ref`) on one configuration `c` (xshape, wshape, bias, layouts, seed, kwargs()).
    `bias_size(c)` is the length of the bias."""

    def __init__(self, ours, ref, bias_size):
        self.ours, self.ref, self.bias_size = ours, ref, bias_size

    def torch_float64(self, x, w, b, go, kwargs):
        """Output and gradients of the torch function in float64 on contiguous copies.

        Contiguous on purpose: torch's own CPU convolutions have layout bugs (2.13 returns
        a wrong grad_weight for an unbatched channels-last-like input with a channels_last
        weight and groups=2) that must not turn into false alarms here."""
        leaves = [t.detach().double().contiguous().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
        y = self.ref(leaves[0], leaves[1], leaves[2] if b is not None else None, **kwargs)
        return (y.detach(), *torch.autograd.grad(y, leaves, go.double()))

    def run_both(self, c, dtype):
        """cnnext's output and (input, weight[, bias]) gradients for one configuration, with
        torch's in float64 from the same values (the reference) and from their absolute
        values (the magnitude: per element, the sum of the absolute values of the terms)."""
        gen = torch.Generator().manual_seed(c.seed)
        x = torch.randn(c.xshape, dtype=dtype, generator=gen)
        w = torch.randn(c.wshape, dtype=dtype, generator=gen)
        b = torch.randn(self.bias_size(c), dtype=dtype, generator=gen) if c.bias else None
        inputs = (leaf(x, c.x_layout), leaf(w, c.w_layout)) + ((leaf(b),) if c.bias else ())
        out = self.ours(inputs[0], inputs[1], inputs[2] if c.bias else None, **c.kwargs())
        if c.g_layout == "expanded":  # what y.sum().backward() sends: one value, stride 0 everywhere
            go = torch.randn((), dtype=dtype, generator=gen).expand(out.shape)
        else:
            go = to_layout(torch.randn(out.shape, dtype=dtype, generator=gen), c.g_layout)
        ours = (out, *torch.autograd.grad(out, inputs, go))
        ref = self.torch_float64(x, w, b, go, c.kwargs())
        mag = self.torch_float64(x.abs(), w.abs(), b.abs() if c.bias else None, go.abs(), c.kwargs())
        return ours, ref, mag

    def check(self, c, dtype):
        """Values within tolerance; for an empty batch, empty output and zero gradients;
        the output in the layout torch gives it, where the layout rule is unambiguous
        (dense operands without size-1 dims, whose strides torch's and cnnext's
        heuristics read apart)."""
        ours, ref, mag = self.run_both(c, dtype)
        assert all(t.dtype == dtype for t in ours)
        assert_matches(ours, ref, mag, RTOL[dtype], str(c))
        out = ours[0]
        assert ours[1].shape == torch.Size(c.xshape)
        if len(c.xshape) == 4 and c.xshape[0] == 0:
            assert out.numel() == 0
            for g in ours[2:]:
                assert torch.count_nonzero(g) == 0
        if out.dim() == 4 and c.x_layout in ("contiguous", "channels_last") and c.w_layout != "sliced" \
                and min(c.xshape) > 1 and min(c.wshape) > 1 and min(out.shape) > 1:
            with torch.no_grad():
                ref_out = self.ref(to_layout(ref[0].new_zeros(c.xshape), c.x_layout),
                                   to_layout(ref[0].new_zeros(c.wshape), c.w_layout), **c.kwargs())
            assert out.is_contiguous() == ref_out.is_contiguous()
            assert is_channels_last(out) == is_channels_last(ref_out)


def assert_state_dict_round_trip(src, dst, x):
    """dst loads src's (perturbed) parameters through torch.save/torch.load, strictly;
    returns both modules' outputs on x for the caller to compare."""
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()  # differ from dst's init
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    result = dst.load_state_dict(torch.load(buf), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (name, a), (_, b) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(a, b), name
    return dst(x), src(x)


def pair_arg(draw, values):
    """(hypothesis) A pair as torch takes it: an int when both are equal (sometimes), a
    tuple or a list."""
    if values[0] == values[1] and draw(st.booleans()):
        return values[0]
    return draw(st.sampled_from([tuple, list]))(values)


def import_torchvision():
    """torchvision, or a pytest skip when it is not installed. The tests' one way to import it:
    cnnext.train.data.import_torchvision, which also lets a torchvision wheel whose compiled
    ops do not load against this torch (the CUDA wheels these machines install with
    `--no-deps`) import, by defining the ``torchvision::nms`` / ``qnms`` schemas first."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    from cnnext.train.data import import_torchvision as _import

    return _import("the model-level tests")
