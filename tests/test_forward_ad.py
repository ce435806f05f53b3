"""Forward-mode AD (issue 13, item 1): right or refused, never a silent zero tangent.

Every op is driven through torch.autograd.forward_ad and torch.func.jvp, and through
forward-over-reverse (a tangent reaching the backward ops). An op in FORWARD_AD has a
forward derivative and must match stock torch's tangent; every other op must raise
NotImplementedError naming forward-mode AD.
"""
import functools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import cnnext.functional as CF

# Ops (keys of CASES) whose forward derivative is implemented; the others must raise.
# Every op has one now (the fused ops as the chain of their parts); the refusal path is
# kept for forward-over-reverse through fused training, whose backward op has none.
FORWARD_AD = {"conv2d", "conv2d_groups", "conv_transpose2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
              "max_unpool2d", "conv_bn_relu2d_train", "conv_bn_relu2d_eval"}


@functools.lru_cache(maxsize=None)
def _unpool_indices():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return F.max_pool2d(x, 2, return_indices=True)[1]


def _bn_params(c):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(c, dtype=torch.float64, generator=g) + 0.5,
            torch.randn(c, dtype=torch.float64, generator=g),
            torch.randn(c, dtype=torch.float64, generator=g),
            torch.rand(c, dtype=torch.float64, generator=g) + 0.5)


def _stock_conv_bn_relu(training):
    def f(x, w, b, gamma, beta):
        _, _, rm, rv = _bn_params(w.shape[0])
        y = F.conv2d(x, w, b, padding=1)
        return F.relu(F.batch_norm(y, rm, rv, gamma, beta, training=training))
    return f


def _cnnext_conv_bn_relu(training):
    def f(x, w, b, gamma, beta):
        _, _, rm, rv = _bn_params(w.shape[0])
        return CF.conv_bn_relu2d(x, w, b, gamma, beta, rm, rv, training, padding=1)
    return f


# name -> (cnnext function, stock function, shapes of the differentiable arguments)
CASES = {
    "conv2d": (lambda x, w, b: CF.conv2d(x, w, b, stride=2, padding=1, dilation=(1, 2)),
               lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, dilation=(1, 2)),
               [(2, 4, 7, 8), (6, 4, 3, 2), (6,)]),
    "conv2d_groups": (lambda x, w, b: CF.conv2d(x, w, b, padding=1, groups=2),
                      lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=2),
                      [(2, 4, 5, 6), (6, 2, 3, 3), (6,)]),
    "conv_transpose2d": (
        lambda x, w, b: CF.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1, groups=2),
        lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1, groups=2),
        [(2, 4, 5, 4), (4, 3, 3, 3), (6,)]),
    "max_pool2d": (lambda x: CF.max_pool2d(x, 3, 2, 1, dilation=1, ceil_mode=True),
                   lambda x: F.max_pool2d(x, 3, 2, 1, dilation=1, ceil_mode=True),
                   [(2, 3, 7, 8)]),
    "avg_pool2d": (lambda x: CF.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
                   lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
                   [(2, 3, 7, 8)]),
    "adaptive_avg_pool2d": (lambda x: CF.adaptive_avg_pool2d(x, (3, 5)),
                            lambda x: F.adaptive_avg_pool2d(x, (3, 5)),
                            [(2, 3, 7, 8)]),
    "max_unpool2d": (lambda x: CF.max_unpool2d(x, _unpool_indices(), 2),
                     lambda x: F.max_unpool2d(x, _unpool_indices(), 2),
                     [(2, 3, 3, 3)]),
    "conv_bn_relu2d_train": (_cnnext_conv_bn_relu(True), _stock_conv_bn_relu(True),
                             [(3, 2, 5, 5), (4, 2, 3, 3), (4,), (4,), (4,)]),
    "conv_bn_relu2d_eval": (_cnnext_conv_bn_relu(False), _stock_conv_bn_relu(False),
                            [(3, 2, 5, 5), (4, 2, 3, 3), (4,), (4,), (4,)]),
}


def _inputs(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    primals = [torch.randn(s, dtype=torch.float64, generator=g) for s in shapes]
    tangents = [torch.randn(s, dtype=torch.float64, generator=g) for s in shapes]
    return primals, tangents


def _jvp_forward_ad(f, primals, tangents):
    with fwAD.dual_level():
        out = f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        primal, tangent = fwAD.unpack_dual(out)
        return primal, tangent


def _jvp_func(f, primals, tangents):
    return torch.func.jvp(f, tuple(primals), tuple(tangents))


def _right_or_refused(name, run):
    ours, stock, shapes = CASES[name]
    primals, tangents = _inputs(shapes, seed=len(name))
    want_out, want_t = run(stock, primals, tangents)
    assert want_t.abs().sum() > 0  # the case has a non-trivial tangent
    if name not in FORWARD_AD:
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            run(ours, primals, tangents)
        return
    out, t = run(ours, primals, tangents)
    torch.testing.assert_close(out, want_out)
    assert t is not None, f"{name}: no tangent"
    torch.testing.assert_close(t, want_t)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_ad_api(name):
    _right_or_refused(name, _jvp_forward_ad)


@pytest.mark.parametrize("name", sorted(CASES))
def test_func_jvp(name):
    _right_or_refused(name, _jvp_func)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tangent_on_one_argument_only(name):
    """A tangent on a single argument (here the last: bias, bn_bias or the input) is
    enough: it must not be dropped."""
    ours, stock, shapes = CASES[name]
    primals, tangents = _inputs(shapes, seed=3)
    tangents = [torch.zeros_like(t) for t in tangents[:-1]] + tangents[-1:]
    want = _jvp_forward_ad(stock, primals, tangents)[1]
    if name not in FORWARD_AD:
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            _jvp_forward_ad(ours, primals, tangents)
        return
    torch.testing.assert_close(_jvp_forward_ad(ours, primals, tangents)[1], want)


def _hvp(f, primals, tangents):
    """Forward-over-reverse: d/dt of the gradient of sum(f(x)**2) along t."""
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p.clone().requires_grad_(), t) for p, t in zip(primals, tangents)]
        out = f(*duals)
        grads = torch.autograd.grad((out * out).sum(), duals, create_graph=True)
        return [fwAD.unpack_dual(g).tangent for g in grads]


# Forward-over-reverse reaches each op's backward ops (whose forward derivatives come
# with their forward op's).
BACKWARD_OPS = {"conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
                "max_unpool2d", "conv_bn_relu2d_eval", "conv_bn_relu2d_train"}


# The backward of fused training (conv_bn_relu2d_train_backward) has no forward
# derivative (nor a double backward): a tangent reaching it raises.
NO_FORWARD_OVER_REVERSE = {"conv_bn_relu2d_train"}


@pytest.mark.parametrize("name", sorted(BACKWARD_OPS))
def test_forward_over_reverse(name):
    ours, stock, shapes = CASES[name]
    primals, tangents = _inputs(shapes, seed=5)
    if name in NO_FORWARD_OVER_REVERSE:
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            _hvp(ours, primals, tangents)
        return
    want = _hvp(stock, primals, tangents)
    got = _hvp(ours, primals, tangents)
    for g, w in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", sorted(FORWARD_AD))
def test_gradcheck_forward_ad(name):
    """torch.autograd.gradcheck with check_forward_ad: the tangents against finite
    differences, in float64, every argument at once."""
    ours, _, shapes = CASES[name]
    primals, _ = _inputs(shapes, seed=7)
    primals = [p.requires_grad_() for p in primals]
    assert torch.autograd.gradcheck(ours, primals, check_forward_ad=True, check_backward_ad=True,
                                    check_batched_grad=False, check_batched_forward_grad=False)


@pytest.mark.parametrize("name", sorted(FORWARD_AD - NO_FORWARD_OVER_REVERSE))
def test_gradgradcheck_forward_over_reverse(name):
    """Forward-over-reverse through the backward ops (Hessian-vector products)."""
    ours, _, shapes = CASES[name]
    primals, _ = _inputs(shapes, seed=11)
    primals = [p.requires_grad_() for p in primals]
    assert torch.autograd.gradgradcheck(ours, primals, check_fwd_over_rev=True, check_rev_over_rev=False, check_undefined_grad=False,
                                        check_batched_grad=False)


@pytest.mark.parametrize("name", ["conv2d", "max_pool2d", "avg_pool2d", "max_unpool2d"])
def test_jacfwd_matches_stock(name):
    """torch.func.jacfwd (jvp under vmap's fallback loop) against stock's Jacobian."""
    ours, stock, shapes = CASES[name]
    primals, _ = _inputs(shapes, seed=13)
    got = torch.func.jacfwd(ours)(*primals)
    want = torch.func.jacfwd(stock)(*primals)
    torch.testing.assert_close(got, want)


def test_jvp_through_a_module_with_parameters_requiring_grad():
    """A tangent on the input of a model whose weights require grad (the recorded-node path)."""
    import cnnext.nn
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.MaxPool2d(2),
                              torch.nn.AdaptiveAvgPool2d(1)).double()
    ours = torch.nn.Sequential(cnnext.nn.Conv2d(2, 4, 3, padding=1), cnnext.nn.MaxPool2d(2),
                               cnnext.nn.AdaptiveAvgPool2d(1)).double()
    ours.load_state_dict(ref.state_dict())
    x, t = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randn(3, 2, 6, 6, dtype=torch.float64)
    got = torch.func.jvp(ours, (x,), (t,))
    want = torch.func.jvp(ref, (x,), (t,))
    torch.testing.assert_close(got, want)
    assert got[1].abs().sum() > 0
