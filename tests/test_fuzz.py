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
from reference import (assert_close, assert_same_format, float64_copy, max_pool_reference, window_in_padding)

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
        try:
            s_gx, = torch.autograd.grad(s_out, s_in[0], go)
        except RuntimeError as e:
            # stock's max_unpool2d backward raises on non-contiguous ("permuted") indices: "view
            # size is not compatible with input tensor's size and stride"; the values were
            # compared above on contiguous copies, where stock works.
            assert "view size is not compatible" in str(e), e
            return
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
           m["g_layout"], seed)


@st.composite
def max_pool_configs(draw):
    k, d = _pair(draw, 1, 4), _pair(draw, 1, 3)
    p = tuple(draw(st.integers(0, k[i] // 2)) for i in range(2))
    s = None if draw(st.integers(0, 3)) == 0 else _pair(draw, 1, 4)
    h = _size_at_least(draw, d[0] * (k[0] - 1) + 1 - 2 * p[0])
    w = _size_at_least(draw, d[1] * (k[1] - 1) + 1 - 2 * p[1])
    return dict(shape=_batch(draw, draw(st.integers(1, 4)), h, w),
                kw=dict(kernel_size=_arg(draw, k), stride=None if s is None else _arg(draw, s), padding=_arg(draw, p),
                        dilation=_arg(draw, d), ceil_mode=draw(st.booleans()), return_indices=True))


@settings(FUZZ, max_examples=examples(COUNTS["max_pool2d"]))
@given(c=max_pool_configs(), m=common, ties=st.booleans())
def test_fuzz_max_pool2d(c, m, ties):
    dtype, seed = m["dtype"], m["seed"]
    x = _values(c["shape"], dtype, seed, m["layout"])
    if ties:  # few distinct values: ties go to the first maximum, as torch's
        x = to_layout(x.contiguous().round().clamp(-1, 1), m["layout"])
    kw = c["kw"]
    # stock's backward aborts the process on a window entirely in the padding: exact reference there
    exact = (lambda a: max_pool_reference(a, **kw)) if window_in_padding(x, **kw) else None
    _check(lambda a: CF.max_pool2d(a, **kw), lambda a: F.max_pool2d(a, **kw), [x], dtype, m["g_layout"], seed,
           exact_reference=exact)


@st.composite
def avg_pool_configs(draw):
    k = _pair(draw, 1, 4)
    p = tuple(draw(st.integers(0, k[i] // 2)) for i in range(2))
    s = None if draw(st.integers(0, 3)) == 0 else _pair(draw, 1, 4)
    h = _size_at_least(draw, k[0] - 2 * p[0])
    w = _size_at_least(draw, k[1] - 2 * p[1])
    divisor = draw(st.one_of(st.none(), st.sampled_from([-3, -2, -1, 1, 2, 3, 4, 5, 6])))
    return dict(shape=_batch(draw, draw(st.integers(1, 4)), h, w),
                kw=dict(kernel_size=_arg(draw, k), stride=None if s is None else _arg(draw, s), padding=_arg(draw, p),
                        ceil_mode=draw(st.booleans()), count_include_pad=draw(st.booleans()),
                        divisor_override=divisor))


@settings(FUZZ, max_examples=examples(COUNTS["avg_pool2d"]))
@given(c=avg_pool_configs(), m=common)
def test_fuzz_avg_pool2d(c, m):
    dtype, seed = m["dtype"], m["seed"]
    kw = c["kw"]
    _check(lambda a: CF.avg_pool2d(a, **kw), lambda a: F.avg_pool2d(a, **kw),
           [_values(c["shape"], dtype, seed, m["layout"])], dtype, m["g_layout"], seed)


@st.composite
def adaptive_configs(draw):
    h, w = _pair(draw, 1, 9)
    out = [draw(st.one_of(st.none(), st.integers(1, 2 * n + 1))) for n in (h, w)]
    if out[0] == out[1] and out[0] is not None and draw(st.booleans()):
        size = out[0]
    else:
        size = tuple(out)
    return dict(shape=_batch(draw, draw(st.integers(1, 4)), h, w), output_size=size)


@settings(FUZZ, max_examples=examples(COUNTS["adaptive_avg_pool2d"]))
@given(c=adaptive_configs(), m=common)
def test_fuzz_adaptive_avg_pool2d(c, m):
    dtype, seed = m["dtype"], m["seed"]
    size = c["output_size"]
    _check(lambda a: CF.adaptive_avg_pool2d(a, size), lambda a: F.adaptive_avg_pool2d(a, size),
           [_values(c["shape"], dtype, seed, m["layout"])], dtype, m["g_layout"], seed)


@st.composite
def unpool_configs(draw):
    k = _pair(draw, 1, 4)
    p = tuple(draw(st.integers(0, k[i] // 2)) for i in range(2))
    s = _pair(draw, 1, 4)
    h = _size_at_least(draw, k[0] - 2 * p[0])
    w = _size_at_least(draw, k[1] - 2 * p[1])
    shape = _batch(draw, draw(st.integers(1, 4)), h, w)
    explicit = draw(st.sampled_from([None, "input", "offset"]))
    return dict(shape=shape, k=k, s=s, p=p, explicit=explicit,
                delta=(draw(st.integers(-3, 3)), draw(st.integers(-3, 3))))


@settings(FUZZ, max_examples=examples(COUNTS["max_unpool2d"]))
@given(c=unpool_configs(), m=common)
def test_fuzz_max_unpool2d(c, m):
    dtype, seed = m["dtype"], m["seed"]
    k, s, p = c["k"], c["s"], c["p"]
    pooled, idx = F.max_pool2d(_values(c["shape"], torch.float64, seed + 5), k, s, p, return_indices=True)
    x = _values(tuple(pooled.shape), dtype, seed, m["layout"])
    idx = lay(idx, m["layout"])
    default = [(pooled.shape[-2 + i] - 1) * s[i] + k[i] - 2 * p[i] for i in range(2)]
    if c["explicit"] == "input":
        size = c["shape"][-2:]  # the pooled input's size, as a user passes it
    elif c["explicit"] == "offset":  # anywhere within the stride of the default (torch's rule), or outside
        size = tuple(default[i] + c["delta"][i] for i in range(2))
    else:
        size = None
    kw = dict(kernel_size=k, stride=s, padding=p, output_size=size)
    _check(lambda a, i: CF.max_unpool2d(a, i, **kw), lambda a, i: F.max_unpool2d(a, i, **kw), [x, idx], dtype,
           m["g_layout"], seed)
