"""A fuzz of every cnnext op against stock torch (issue 13): random shapes (batched,
unbatched, empty batches), strides, paddings ('same', 'valid'), dilations, groups,
ceil_mode, count_include_pad, divisor_override, output sizes, memory layouts (contiguous,
channels_last, sliced, permuted, offset, for the input, the weight and grad_output) and
dtypes (float32, float64).

Each configuration compares cnnext's output, max-pooling indices and every first-order
gradient with stock torch computed on contiguous float64 copies of the same values (for
max_pool2d with a window entirely in the padding, where stock's backward aborts the
process, with the exact reference of tests/reference.py), and the memory format of the
output and input gradient with stock's in the same layout. A configuration stock refuses
must raise the same exception type in cnnext.

Budget: 10,500 configurations in all, derandomized (a fixed sequence, the same on every
run), in about a minute of CPU. Locally, CNNEXT_HYPOTHESIS_SCALE=k runs k times as many,
and CNNEXT_FUZZ_RANDOM=1 draws a fresh sequence each run.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import cnnext.functional as CF
from cnnext.testing import LAYOUTS, lay, to_layout
from conftest import examples
from reference import (assert_close, assert_same_format, float64_copy, max_pool_reference, transposed_conv_cut,
                       window_in_padding)

# Configurations per op (10,500 in all).
COUNTS = {"conv2d": 2500, "conv_transpose2d": 2000, "max_pool2d": 2000, "avg_pool2d": 2000,
          "adaptive_avg_pool2d": 1000, "max_unpool2d": 1000}
# No explain phase: on a failure it reruns the example hundreds of times for a report.
FUZZ = settings(derandomize=not os.environ.get("CNNEXT_FUZZ_RANDOM"),
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
DTYPES = (torch.float64, torch.float32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread keeps each call from waiting on a parallel region
    of a busy machine (the multi-threaded paths are covered by the parity tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _values(shape, dtype, seed, layout="contiguous"):
    """Standard normal values of dtype (exactly representable in float64) in a layout."""
    t = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if layout == "contiguous" or len(shape) not in (3, 4):
        return t
    return to_layout(t, layout)


def _leaf(t):
    return t.detach().requires_grad_()


def _check(ours_fn, stock_fn, inputs, dtype, g_layout, seed, exact_reference=None, grad_format=True):
    """ours_fn(*inputs) against stock_fn on contiguous float64 copies: output, integer
    outputs, the gradients of every floating input; memory formats of the output and of the
    first input's gradient as stock's on the same inputs (unless grad_format is False).
    exact_reference replaces stock_fn for the float64 comparison where stock misbehaves."""
    ours_in = [_leaf(t) if t.is_floating_point() else t for t in inputs]
    ref_in = [float64_copy(t) for t in ours_in]
    try:
        want = (exact_reference or stock_fn)(*ref_in)
    except Exception as e:  # noqa: BLE001  (stock refuses: cnnext must refuse alike)
        with pytest.raises(Exception) as ours:
            ours_fn(*ours_in)
        assert type(ours.value) is type(e), f"cnnext raised {type(ours.value).__name__}: {ours.value}; " \
                                            f"torch {type(e).__name__}: {e}"
        return
    got = ours_fn(*ours_in)
    got_out, got_extra = (got[0], got[1:]) if isinstance(got, tuple) else (got, ())
    want_out, want_extra = (want[0], want[1:]) if isinstance(want, tuple) else (want, ())
    assert_close(got_out, want_out, dtype, "output")
    for a, e in zip(got_extra, want_extra):
        assert_close(a, e, dtype, "indices")

    go = _values(tuple(got_out.shape), dtype, seed + 1, g_layout)
    diff = [t for t in ours_in if t.is_floating_point()]
    ref_diff = [t for t in ref_in if t.is_floating_point()]
    if got_out.numel() or any(t.numel() for t in diff):
        try:
            ref_grads = torch.autograd.grad(want_out, ref_diff, go.double(), allow_unused=True)
        except Exception as e:  # noqa: BLE001  (stock's backward refuses: cnnext's must refuse alike)
            with pytest.raises(Exception) as ours:
                torch.autograd.grad(got_out, diff, go, allow_unused=True)
            assert type(ours.value) is type(e), f"backward: cnnext raised {type(ours.value).__name__}: " \
                                                f"{ours.value}; torch {type(e).__name__}: {e}"
            return
        grads = torch.autograd.grad(got_out, diff, go, allow_unused=True, retain_graph=True)
        for i, (a, e) in enumerate(zip(grads, ref_grads)):
            if a is None or e is None:
                other = a if e is None else e
                assert other is None or not other.any(), f"gradient {i}"
                continue
            assert_close(a, e, dtype, f"gradient {i}")

    # Memory formats as stock's on the very inputs (stock's backward only where it is safe).
    s_in = [_leaf(t) if t.is_floating_point() else t for t in inputs]
    s_out = stock_fn(*s_in)
    s_out = s_out[0] if isinstance(s_out, tuple) else s_out
    assert_same_format(got_out, s_out, "output")
    if grad_format and exact_reference is None and s_out.numel() and ours_in[0].numel():
        gx, = torch.autograd.grad(got_out, ours_in[0], go, retain_graph=True)
        s_gx, = torch.autograd.grad(s_out, s_in[0], go)
        assert_same_format(gx, s_gx, "input gradient")


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

def _pair(draw, lo, hi):
    return draw(st.integers(lo, hi)), draw(st.integers(lo, hi))


def _arg(draw, pair):
    """A pair as torch takes it: an int when both are equal (sometimes), else a tuple."""
    if pair[0] == pair[1] and draw(st.booleans()):
        return pair[0]
    return tuple(pair)


def _batch(draw, c, h, w):
    """(N, C, H, W) with N in 0..3, or unbatched (C, H, W)."""
    if draw(st.integers(0, 4)) == 0:
        return (c, h, w)
    return (draw(st.integers(0, 3)), c, h, w)


def _size_at_least(draw, need, extra=5):
    """An input length with at least `need` (>= 1) positions."""
    return draw(st.integers(max(1, need), max(1, need) + extra))


common = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "layout": st.sampled_from(LAYOUTS),
    "g_layout": st.sampled_from(("contiguous", "channels_last", "sliced")),
    "seed": st.integers(0, 2 ** 20),
})


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------

@st.composite
def conv_configs(draw):
    g = draw(st.integers(1, 3))
    cin, cout = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
    k, d, s = _pair(draw, 1, 4), _pair(draw, 1, 3), _pair(draw, 1, 3)
    kind = draw(st.sampled_from(["int", "int", "int", "same", "valid"]))
    if kind == "same":
        s, padding, p = (1, 1), "same", (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    elif kind == "valid":
        padding, p = "valid", (0, 0)
    else:
        p = _pair(draw, 0, 3)
        padding = _arg(draw, p)
    h = _size_at_least(draw, d[0] * (k[0] - 1) + 1 - 2 * p[0])
    w = _size_at_least(draw, d[1] * (k[1] - 1) + 1 - 2 * p[1])
    return dict(xshape=_batch(draw, cin, h, w), wshape=(cout, cin // g, *k), bias=draw(st.booleans()),
                w_layout=draw(st.sampled_from(["contiguous", "channels_last"])),
                kw=dict(stride=_arg(draw, s), padding=padding, dilation=_arg(draw, d), groups=g))


@settings(FUZZ, max_examples=examples(COUNTS["conv2d"]))
@given(c=conv_configs(), m=common)
def test_fuzz_conv2d(c, m):
    dtype, seed = m["dtype"], m["seed"]
    x = _values(c["xshape"], dtype, seed, m["layout"])
    w = _values(c["wshape"], dtype, seed + 2, c["w_layout"])
    inputs = [x, w] + ([_values((c["wshape"][0],), dtype, seed + 3)] if c["bias"] else [])
    kw = c["kw"]
    _check(lambda *a: CF.conv2d(*a, **kw), lambda *a: F.conv2d(*a, **kw), inputs, dtype, m["g_layout"], seed)


@st.composite
def conv_transpose_configs(draw):
    g = draw(st.integers(1, 3))
    cin, cout = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
    k, d, s = _pair(draw, 1, 4), _pair(draw, 1, 3), _pair(draw, 1, 3)
    op = tuple(draw(st.integers(0, max(s[i], d[i]) - 1)) for i in range(2))
    h, w = _pair(draw, 1, 5)
    # padding keeps the output at least one long: (H-1)s - 2p + d(k-1) + op + 1 >= 1
    p = tuple(draw(st.integers(0, max(0, min(3, ((n - 1) * s[i] + d[i] * (k[i] - 1) + op[i]) // 2))))
              for i, n in enumerate((h, w)))
    return dict(xshape=_batch(draw, cin, h, w), wshape=(cin, cout // g, *k), bias=draw(st.booleans()),
                w_layout=draw(st.sampled_from(["contiguous", "channels_last"])),
                kw=dict(stride=_arg(draw, s), padding=_arg(draw, p), output_padding=_arg(draw, op), groups=g,
                        dilation=_arg(draw, d)))


@settings(FUZZ, max_examples=examples(COUNTS["conv_transpose2d"]))
@given(c=conv_transpose_configs(), m=common)
def test_fuzz_conv_transpose2d(c, m):
    dtype, seed = m["dtype"], m["seed"]
    x = _values(c["xshape"], dtype, seed, m["layout"])
    w = _values(c["wshape"], dtype, seed + 2, c["w_layout"])
    inputs = [x, w] + ([_values((c["wshape"][1] * c["kw"]["groups"],), dtype, seed + 3)] if c["bias"] else [])
    kw = c["kw"]
    _check(lambda *a: CF.conv_transpose2d(*a, **kw), lambda *a: F.conv_transpose2d(*a, **kw), inputs, dtype,
           m["g_layout"], seed, grad_format=not _unbatched_cut(c))


def _unbatched_cut(c):
    """An unbatched transposed convolution whose input gradient is cut from a larger one:
    its layout is the lead's open fix (reference.UNBATCHED_CUT_REASON)."""
    return len(c["xshape"]) == 3 and transposed_conv_cut(c["xshape"], c["wshape"], **c["kw"])
