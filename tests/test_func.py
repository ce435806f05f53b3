"""torch.func over cnnext (issue 13, item 2): grad, vjp, jacrev, jacfwd, hessian and vmap,
alone and composed (per-sample gradients as torch's tutorial computes them, ensembles of
models with per-member weights), against the same transforms over stock torch, in float64.

The ops' autograd nodes are plain torch::autograd::Node subclasses (csrc/ops/autograd_node.h),
which functorch's grad levels accept as they accept torch's own; the batching rules are in
cnnext/_vmap.py. Every vmap here also asserts that functorch's slow fallback (a Python loop
that warns "There is a performance drop") was not taken.
"""
import copy
import functools
import warnings

import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vjp, vmap

import cnnext
import cnnext.functional as CF
import cnnext.nn as cnn
from test_forward_ad import CASES

DT = torch.float64


def _no_fallback(fn):
    """fn run with warnings recorded; fails if functorch's per-op fallback ran."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn(*args, **kwargs)
        slow = [str(w.message) for w in caught if "performance drop" in str(w.message)]
        assert not slow, slow
        return out
    return run


# name -> (cnnext f, stock f, shapes of the arguments; the first is per sample): the
# forward-AD suite's cases of the unfused ops.
OPS = {k: v for k, v in CASES.items() if not k.startswith("conv_bn_relu2d")}


def _args(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=DT, generator=g) for s in shapes]


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(OPS))
def test_grad(name):
    ours, stock, shapes = OPS[name]
    args = _args(shapes)
    argnums = tuple(range(len(args)))
    got = grad(lambda *a: (ours(*a) ** 2).sum(), argnums=argnums)(*args)
    want = grad(lambda *a: (stock(*a) ** 2).sum(), argnums=argnums)(*args)
    _close(got, want)


@pytest.mark.parametrize("name", sorted(OPS))
def test_vjp(name):
    ours, stock, shapes = OPS[name]
    args = _args(shapes, seed=1)
    out, pull = vjp(ours, *args)
    want_out, want_pull = vjp(stock, *args)
    _close(out, want_out)
    cot = torch.randn_like(out)
    _close(pull(cot), want_pull(cot))


@pytest.mark.parametrize("name", sorted(OPS))
def test_jacrev_jacfwd(name):
    """jacrev is vjp under vmap (batching rules of the backward ops), jacfwd is jvp under vmap."""
    ours, stock, shapes = OPS[name]
    args = _args(shapes, seed=2)
    want = jacrev(stock)(*args)
    _close(_no_fallback(jacrev(ours))(*args), want)
    _close(_no_fallback(jacfwd(ours))(*args), want)


@pytest.mark.parametrize("name", ["conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d"])
def test_hessian(name):
    """Second order: jacfwd(jacrev) of a scalar function of the first argument."""
    ours, stock, shapes = OPS[name]
    args = _args([(1,) + s[1:] if i == 0 else s for i, s in enumerate(shapes)], seed=3)
    rest = args[1:]
    got = _no_fallback(hessian(lambda x: (ours(x, *rest) ** 3).sum()))(args[0])
    want = hessian(lambda x: (stock(x, *rest) ** 3).sum())(args[0])
    _close(got, want)


@pytest.mark.parametrize("per_sample_dim", [3, 4])
@pytest.mark.parametrize("name", sorted(OPS))
def test_vmap_forward(name, per_sample_dim):
    """vmap over the first argument, per-sample inputs (C, H, W) or (N, C, H, W), the vmap
    dimension not first; the others shared."""
    if name == "max_unpool2d":
        pytest.skip("indices are per sample: test_vmap_unpool")
    ours, stock, shapes = OPS[name]
    args = _args(shapes, seed=4)
    x = args[0] if per_sample_dim == 4 else args[0][0]
    xs = torch.stack([x, x * 2 + 1, -x], dim=1)  # vmap dim 1
    got = _no_fallback(vmap(lambda x: ours(x, *args[1:]), in_dims=1))(xs)
    want = torch.stack([stock(xs.select(1, i), *args[1:]) for i in range(3)])
    _close(got, want)


def test_vmap_unpool():
    x = _args([(4, 2, 3, 3, 3)], seed=5)[0]
    pooled = torch.randn(4, 2, 3, 6, 6, dtype=DT)
    idx = torch.stack([F.max_pool2d(pooled[i], 2, return_indices=True)[1] for i in range(4)])
    got = _no_fallback(vmap(lambda x, i: CF.max_unpool2d(x, i, 2)))(x, idx)
    want = torch.stack([F.max_unpool2d(x[i], idx[i], 2) for i in range(4)])
    _close(got, want)


def test_vmap_max_pool_indices():
    xs = _args([(5, 3, 7, 8)], seed=6)[0]
    out, idx = _no_fallback(vmap(lambda x: CF.max_pool2d(x, 3, 2, 1, return_indices=True)))(xs)
    want, want_idx = F.max_pool2d(xs, 3, 2, 1, return_indices=True)  # 3-D samples = a batch
    _close(out, want)
    assert torch.equal(idx, want_idx)


@pytest.mark.parametrize("name", ["conv2d", "conv2d_groups", "conv_transpose2d"])
def test_vmap_per_sample_weights(name):
    """Weights batched too (an ensemble): conv2d takes the grouped path, conv_transpose2d
    loops; bias batched or shared."""
    ours, stock, shapes = OPS[name]
    g = torch.Generator().manual_seed(7)
    xs = torch.randn((3,) + shapes[0], dtype=DT, generator=g)
    ws = torch.randn((3,) + shapes[1], dtype=DT, generator=g)
    b = torch.randn(shapes[2], dtype=DT, generator=g)
    got = _no_fallback(vmap(ours, in_dims=(0, 0, None)))(xs, ws, b)
    want = torch.stack([stock(xs[i], ws[i], b) for i in range(3)])
    _close(got, want)
    # one shared input, per-member weights and biases
    bs = torch.randn((3,) + shapes[2], dtype=DT, generator=g)
    got = _no_fallback(vmap(ours, in_dims=(None, 0, 0)))(xs[0], ws, bs)
    want = torch.stack([stock(xs[0], ws[i], bs[i]) for i in range(3)])
    _close(got, want)


class _Net(tnn.Module):
    """A small CNN of every op kind, built from a module namespace (torch.nn or cnnext.nn)."""

    def __init__(self, nn):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, groups=2)
        self.pool2 = nn.AvgPool2d(2, ceil_mode=True)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = tnn.Linear(4, 5)

    def forward(self, x):
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.tanh(self.conv2(x)))
        x = self.gap(torch.relu(self.up(x)))
        return self.fc(x.flatten(1))


def _pair_of_nets():
    torch.manual_seed(0)
    stock = _Net(tnn).to(DT)
    ours = _Net(cnn).to(DT)
    ours.load_state_dict(stock.state_dict())
    return ours, stock


def _per_sample_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def test_per_sample_gradients():
    """vmap(grad(functional_call(model, ...))) as torch's per-sample-gradients tutorial."""
    ours, stock = _pair_of_nets()
    x = torch.randn(6, 3, 10, 10, dtype=DT)
    y = torch.randint(0, 5, (6,))
    got = _no_fallback(_per_sample_grads)(ours, x, y)
    want = _per_sample_grads(stock, x, y)
    assert got.keys() == want.keys()
    for k in want:
        _close(got[k], want[k])
    # and each per-sample gradient is the gradient of that sample alone
    ours.zero_grad()
    F.cross_entropy(ours(x[2:3]), y[2:3]).backward()
    for k, p in ours.named_parameters():
        _close(got[k][2], p.grad)


def test_ensemble_vmap_over_parameters():
    """vmap over stacked parameters of several models (torch.func.stack_module_state)."""
    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        nets.append(_Net(cnn).to(DT))
    stock_nets = []
    for n in nets:
        s = _Net(tnn).to(DT)
        s.load_state_dict(n.state_dict())
        stock_nets.append(s)
    params, buffers = torch.func.stack_module_state(nets)
    base = copy.deepcopy(nets[0]).to("meta")
    x = torch.randn(2, 3, 10, 10, dtype=DT)
    got = _no_fallback(vmap(lambda p, b: functional_call(base, (p, b), (x,)), in_dims=(0, 0)))(params, buffers)
    want = torch.stack([s(x) for s in stock_nets])
    _close(got, want)


def test_fused_eval_per_sample_gradients():
    """A fused (conv + BN + ReLU, eval) model under vmap(grad)."""
    torch.manual_seed(1)
    stock = tnn.Sequential(tnn.Conv2d(3, 4, 3, padding=1), tnn.BatchNorm2d(4), tnn.ReLU(), tnn.Flatten(),
                           tnn.Linear(4 * 6 * 6, 3)).to(DT)
    with torch.no_grad():
        stock[1].running_mean.uniform_(-1, 1)
        stock[1].running_var.uniform_(0.5, 2)
    stock.eval()
    ours = cnnext.fuse(copy.deepcopy(stock))
    assert any("Fused" in type(m).__name__ for m in ours.modules())
    x = torch.randn(4, 3, 6, 6, dtype=DT)
    y = torch.randint(0, 3, (4,))
    got = _no_fallback(_per_sample_grads)(ours, x, y)
    want = _per_sample_grads(stock, x, y)
    for k in want:
        _close(got[k], want[k])


def test_fused_train_vmap_loops_per_sample():
    """Training mode under vmap: batch statistics stay per vmap index (a loop), as stock
    computes them sample by sample."""
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(3, 4, 2, 5, 5, dtype=DT, generator=g)
    w = torch.randn(4, 2, 3, 3, dtype=DT, generator=g)
    gamma, beta = torch.rand(4, dtype=DT, generator=g) + 0.5, torch.randn(4, dtype=DT, generator=g)

    def ours(x):
        return CF.conv_bn_relu2d(x, w, None, gamma, beta, None, None, True, padding=1)

    def stock(x):
        return F.relu(F.batch_norm(F.conv2d(x, w, padding=1), None, None, gamma, beta, training=True))

    _close(vmap(ours)(xs), torch.stack([stock(x) for x in xs]))
    # and its per-sample input gradients
    got = vmap(grad(lambda x: (ours(x) ** 2).sum()))(xs)
    want = torch.stack([torch.func.grad(lambda x: (stock(x) ** 2).sum())(x) for x in xs])
    _close(got, want)


def test_nested_grad():
    """grad of grad (two grad levels) through conv2d: the second derivative along x."""
    x, w = _args([(1, 2, 5, 5), (3, 2, 3, 3)], seed=9)

    def f(conv):
        return lambda x: (torch.sin(conv(x, w)) * conv(x, w)).sum()

    def g2(f1):
        return grad(lambda x: (grad(f1)(x) ** 2).sum())(x)

    _close(g2(f(lambda x, w: CF.conv2d(x, w, padding=1))), g2(f(lambda x, w: F.conv2d(x, w, padding=1))))


def test_recorded_nodes_keep_their_names():
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    y = CF.conv2d(x, w)
    assert y.grad_fn.name() == "cnnext_conv2d"
    assert CF.max_pool2d(y, 2).grad_fn.name() == "cnnext_max_pool2d_with_indices"
