"""The C++ autograd kernels (csrc/ops/autograd_conv2d.cpp, autograd_pool2d.cpp) and the
CPU running-statistics loop (csrc/ops/conv_bn_relu2d.cpp).

- The path that records no node (grad mode off, inference mode, no input requiring
  grad) gives bitwise the values of the recording path, without a grad_fn.
- Optional tensor arguments (bias, bn_weight, bn_bias) shift a node's edge indices: every
  combination of given / absent and requiring grad or not returns each gradient to its
  own argument, checked against torch in float64 (and gradcheck / gradgradcheck).
- batch_norm_update_stats_ on the CPU is the double-precision formula, bitwise, for
  float32 / float64 buffers, strided buffers, count 0.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from cnnext import functional as CF

ops = torch.ops.cnnext
DT = torch.float64


def _r(*shape, grad=False):
    return torch.randn(*shape, dtype=DT).requires_grad_(grad)


# --------------------------------------------------------------------------------------------
# no-node path == recording path
# --------------------------------------------------------------------------------------------

def _calls():
    x = _r(2, 3, 7, 6)
    w = _r(4, 3, 3, 3)
    b = _r(4)
    g, be, rm, rv = _r(4), _r(4), _r(4), torch.rand(4, dtype=DT) + 0.5
    return {
        "conv2d": (lambda x, w, b: ops.conv2d(x, w, b, [2, 1], [1, 1], [1, 1], 1), (x, w, b)),
        "conv2d_input_backward": (
            lambda g_, w: ops.conv2d_input_backward(g_, w, [2, 3, 7, 6], [1, 1], [1, 1], [1, 1], 1),
            (_r(2, 4, 7, 6), w)),
        "conv2d_weight_backward": (
            lambda g_, x: ops.conv2d_weight_backward(g_, x, [4, 3, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            (_r(2, 4, 7, 6), x)),
        "channel_sum": (lambda x: ops.channel_sum(x), (x,)),
        "conv_transpose2d": (lambda x, w, b: ops.conv_transpose2d(x, w, b, [2, 2], [1, 1], [1, 1], 1, [1, 1]),
                             (_r(2, 4, 3, 3), w, _r(3))),
        "conv_bn_relu2d_train": (
            lambda x, w, b, g, be: ops.conv_bn_relu2d_train(x, w, b, g, be, 1e-5, [1, 1], [1, 1], [1, 1], 1, True),
            (x, w, b, g, be)),
        "conv_bn_relu2d_eval": (
            lambda x, w, b, g, be: ops.conv_bn_relu2d_eval(x, w, b, g, be, rm, rv, 1e-5, [1, 1], [1, 1], [1, 1], 1,
                                                           True),
            (x, w, b, g, be)),
        "avg_pool2d": (lambda x: ops.avg_pool2d(x, [3, 3], [2, 2], [1, 1], True, False, None), (x,)),
        "adaptive_avg_pool2d": (lambda x: ops.adaptive_avg_pool2d(x, [1, 1]), (x,)),
        "max_pool2d_with_indices": (lambda x: ops.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1], [1, 1], False),
                                    (x,)),
    }


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", list(_calls()))
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_input_requires_grad"])
def test_no_node_path_matches_recording_path(name, mode):
    fn, args = _calls()[name]
    recorded = _as_tuple(fn(*(a.detach().requires_grad_() for a in args)))
    assert recorded[0].grad_fn is not None and f"cnnext_{name}" in recorded[0].grad_fn.name()
    if mode == "no_grad":
        with torch.no_grad():
            plain = _as_tuple(fn(*(a.detach().requires_grad_() for a in args)))
    elif mode == "inference_mode":
        with torch.inference_mode():
            plain = _as_tuple(fn(*(a.detach() for a in args)))
    else:
        plain = _as_tuple(fn(*(a.detach() for a in args)))
    for p, r in zip(plain, recorded):
        assert p.grad_fn is None and not p.requires_grad
        assert torch.equal(p, r.detach())


# --------------------------------------------------------------------------------------------
# optional arguments: gradients land on their own arguments
# --------------------------------------------------------------------------------------------

def _bn_reference(x, w, b, gamma, beta, rm, rv, training, relu, stride, padding):
    y = F.batch_norm(F.conv2d(x, w, b, stride, padding), rm, rv, gamma, beta, training, 0.0, 1e-5)
    return F.relu(y) if relu else y


# (bias, bn_weight, bn_bias) given or not, and which of (x, w, bias, bn_weight, bn_bias) require grad
OPTIONAL = list(itertools.product([True, False], repeat=3))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("present", OPTIONAL)
def test_fused_optional_arguments_gradients(training, present):
    torch.manual_seed(sum(present) + 10 * training)
    has_b, has_g, has_be = present
    base = [_r(2, 3, 6, 5), _r(4, 3, 3, 3), _r(4) if has_b else None, _r(4).abs() + 0.5 if has_g else None,
            _r(4) if has_be else None]
    rm, rv = _r(4), torch.rand(4, dtype=DT) + 0.5
    tensor_pos = [i for i, t in enumerate(base) if t is not None]
    # every non-empty subset of the given tensors requiring grad (x always among the first)
    for k in range(1, len(tensor_pos) + 1):
        for wanted in itertools.combinations(tensor_pos, k):
            results = []
            for impl in ("cnnext", "torch"):
                args = [t.detach().clone().requires_grad_(i in wanted) if t is not None else None
                        for i, t in enumerate(base)]
                if impl == "cnnext":
                    out = CF.conv_bn_relu2d(*args, None if training else rm, None if training else rv, training,
                                            stride=(2, 1), padding=1)
                else:
                    out = _bn_reference(*args, None if training else rm, None if training else rv, training, True,
                                        (2, 1), 1)
                grads = torch.autograd.grad((out * out.detach().cos()).sum(), [args[i] for i in wanted])
                results.append((out, grads))
            (o1, g1), (o2, g2) = results
            torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
            for i, a, b in zip(wanted, g1, g2):
                assert a.shape == base[i].shape, (wanted, i)
                # a conv bias before train-mode BN has a zero gradient in theory: rounding noise
                atol = 1e-9 if (training and i == 2) else 1e-10
                torch.testing.assert_close(a, b, rtol=1e-9, atol=atol, msg=f"arg {i} of {wanted}")


@pytest.mark.parametrize("has_bias", [True, False])
def test_eval_gradients_of_running_stats_and_double_backward(has_bias):
    """Eval mode differentiates through the fold, running statistics included, to second order."""
    x, w = _r(2, 3, 5, 5, grad=True), _r(4, 3, 3, 3, grad=True)
    b = _r(4, grad=True) if has_bias else None
    gamma, beta = (_r(4).abs() + 0.5).requires_grad_(), _r(4, grad=True)
    rm, rv = _r(4, grad=True), (torch.rand(4, dtype=DT) + 0.5).requires_grad_()
    fn = lambda *t: CF.conv_bn_relu2d(t[0], t[1], t[6] if has_bias else None, t[2], t[3], t[4], t[5],  # noqa: E731
                                      False, padding=1)
    tensors = (x, w, gamma, beta, rm, rv) + ((b,) if has_bias else ())
    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("wanted", [(0,), (1,), (0, 1), (2,), (0, 2), (1, 2)])
def test_conv_optional_bias_gradients(has_bias, wanted):
    if not has_bias and 2 in wanted:
        pytest.skip("no bias")
    x, w, b = _r(2, 3, 6, 6), _r(4, 3, 3, 3), _r(4) if has_bias else None
    for conv, ref, xs, ws in ((CF.conv2d, F.conv2d, x, w),
                              (CF.conv_transpose2d, F.conv_transpose2d, _r(2, 4, 4, 4), _r(4, 3, 3, 3))):
        bb = (_r(3) if conv is CF.conv_transpose2d else b) if has_bias else None
        got = []
        for f in (conv, ref):
            args = [t.detach().clone().requires_grad_(i in wanted) if t is not None else None
                    for i, t in enumerate((xs, ws, bb))]
            y = f(*args, stride=2, padding=1)
            got.append(torch.autograd.grad(y.square().sum(), [args[i] for i in wanted]))
        for a, b_ in zip(*got):
            torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)


def test_conv_transpose_output_padding_past_stride_second_order():
    """output_padding >= stride (allowed below the dilation): the backward crops grad_input
    and pads the input for the weight gradient, also under double backward."""
    x, w, b = _r(1, 2, 3, 4, grad=True), _r(2, 3, 2, 2, grad=True), _r(3, grad=True)
    fn = lambda x, w, b: CF.conv_transpose2d(x, w, b, stride=1, output_padding=(1, 1), dilation=2)  # noqa: E731
    torch.testing.assert_close(fn(x, w, b), F.conv_transpose2d(x, w, b, stride=1, output_padding=(1, 1), dilation=2))
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_channel_sum_unbatched_second_order():
    x = _r(3, 4, 5, grad=True)
    assert torch.autograd.gradcheck(ops.channel_sum, (x,))
    assert torch.autograd.gradgradcheck(ops.channel_sum, (x,))


# --------------------------------------------------------------------------------------------
# running statistics
# --------------------------------------------------------------------------------------------

def _stats_reference(running, stat, momentum, unbias=1.0):
    r = running.double() * (1.0 - momentum) + (stat.double() * unbias) * momentum
    return r.to(running.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strided", [False, True])
def test_update_stats_cpu_loop_is_the_double_formula(dtype, strided):
    c, count, momentum = 37, 50, 0.3
    mean, var = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype)
    if strided:
        rm_store, rv_store = torch.randn(c, 2, dtype=dtype), torch.rand(c, 3, dtype=dtype)
        rm, rv = rm_store[:, 1], rv_store[:, 2]
    else:
        rm, rv = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype)
    want_m, want_v = _stats_reference(rm, mean, momentum), _stats_reference(rv, var, momentum, count / (count - 1))
    before = (rm_store.clone(), rv_store.clone()) if strided else None
    ops.batch_norm_update_stats_(rm, rv, mean, var, momentum, count)
    assert torch.equal(rm, want_m) and torch.equal(rv, want_v)
    if strided:  # the other columns are untouched
        assert torch.equal(rm_store[:, 0], before[0][:, 0])
        assert torch.equal(rv_store[:, :2], before[1][:, :2])
    # count 0 leaves them as they are
    m0, v0 = rm.clone(), rv.clone()
    ops.batch_norm_update_stats_(rm, rv, mean, var, momentum, 0)
    assert torch.equal(rm, m0) and torch.equal(rv, v0)


def test_update_stats_mixed_dtypes():
    """float64 running buffers fed float32 statistics (a module converted to double after
    the statistics were taken): the formula runs in double either way."""
    mean, var = torch.randn(5), torch.rand(5)
    rm, rv = torch.randn(5, dtype=DT), torch.rand(5, dtype=DT)
    want_m, want_v = _stats_reference(rm, mean, 0.1), _stats_reference(rv, var, 0.1, 8 / 7)
    ops.batch_norm_update_stats_(rm, rv, mean, var, 0.1, 8)
    assert torch.equal(rm, want_m) and torch.equal(rv, want_v)


# --------------------------------------------------------------------------------------------
# the inference fold (one CPU loop in csrc/ops/conv_bn_relu2d.cpp)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups, has_bias, affine, channels_last", [
    (1, True, True, False), (2, False, True, True), (2, True, False, False), (1, False, False, True)])
def test_eval_fold_matches_torch(dtype, groups, has_bias, affine, channels_last):
    torch.manual_seed(groups + 2 * has_bias + 4 * affine)
    x = torch.randn(3, 4, 7, 6, dtype=dtype)
    w = torch.randn(6, 4 // groups, 3, 2, dtype=dtype)
    if channels_last:
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    b = torch.randn(6, dtype=dtype) if has_bias else None
    gamma, beta = (torch.rand(6, dtype=dtype) + 0.5, torch.randn(6, dtype=dtype)) if affine else (None, None)
    rm, rv = torch.randn(6, dtype=dtype), torch.rand(6, dtype=dtype) + 0.1
    got = CF.conv_bn_relu2d(x, w, b, gamma, beta, rm, rv, False, eps=1e-3, padding=1, groups=groups)
    want = F.relu(F.batch_norm(F.conv2d(x, w, b, 1, 1, 1, groups), rm, rv, gamma, beta, False, 0.0, 1e-3))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# --------------------------------------------------------------------------------------------
# the fused op's parallel loops (grain: ~32K elements per task) on a tensor big enough to
# split: bitwise the same on 1 and 2 threads, and torch's values
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_train_parallel_split_is_deterministic(layout):
    torch.manual_seed(7)
    x = torch.randn(4, 3, 66, 66, dtype=DT)
    w, gamma, beta = torch.randn(8, 3, 3, 3, dtype=DT), torch.rand(8, dtype=DT) + 0.5, torch.randn(8, dtype=DT)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn(4, 8, 64, 64, dtype=DT)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            args = [t.clone().requires_grad_() for t in (x, w, gamma, beta)]
            out, conv_out, mean, var = ops.conv_bn_relu2d_train(args[0], args[1], None, args[2], args[3], 1e-5,
                                                                [1, 1], [0, 0], [1, 1], 1, True)
            grads = torch.autograd.grad(out, args, g)
            results.append((out, conv_out, mean, var, *grads))
    finally:
        torch.set_num_threads(threads)
    names = ("out", "conv_out", "mean", "var", "grad_x", "grad_w", "grad_gamma", "grad_beta")
    for name, a, b in zip(names, *results):
        # the conv weight gradient sums one partial per thread (conv2d.cpp): fixed for a
        # thread count, not across thread counts; everything of the fused op's own is
        assert name == "grad_w" or torch.equal(a, b), name
    xx, ww, gg, bb = (t.clone().requires_grad_() for t in (x, w, gamma, beta))
    want = F.relu(F.batch_norm(F.conv2d(xx, ww), None, None, gg, bb, True, 0.0, 1e-5))
    torch.testing.assert_close(results[0][0], want, rtol=1e-12, atol=1e-12)
    for a, b in zip(results[0][4:], torch.autograd.grad(want, (xx, ww, gg, bb), g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


class _CreatedTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op, dtype) of every tensor an op returns while the mode is active."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.made.append((str(func), t.dtype))
        return out


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_max_pool_backward_makes_no_index_gradient(layout):
    # The indices output never gets a gradient; the backward must not build a zero
    # int64 tensor for it (the engine does unless the node opts out), only grad_input.
    x = _r(2, 3, 9, 9).contiguous(memory_format=layout).requires_grad_(True)
    out, idx = CF.max_pool2d(x, 3, 2, return_indices=True)
    g = torch.randn_like(out)
    with _CreatedTensors() as rec:
        (gx,) = torch.autograd.grad(out, x, g)
    ops = [op for op, _ in rec.made]
    assert "cnnext.max_pool2d_with_indices_backward.default" in ops
    assert [dt for _, dt in rec.made if dt == torch.int64] == []
    torch.testing.assert_close(gx, torch.autograd.grad(F.max_pool2d(x, 3, 2), x, g)[0], rtol=0, atol=0)
