"""The proof that a cnnext network equals its stock torch.nn twin.

compare() builds both backends of one network from one seed, loads the torch one's
state_dict into the cnnext one (strictly: the keys must be identical), runs a forward
and backward pass on the same input and output gradient, takes one SGD step with
momentum on both, and runs a second forward. It reports the largest error of the
outputs, the parameter gradients, the parameters and buffers after the step (BN
running statistics and num_batches_tracked included), and the second output, each
relative to the largest magnitude of the stock result.

Nets with BatchNorm run in train mode (batch statistics, running-stat updates); nets
with Dropout run in eval mode, where Dropout is the identity.

compare() is exact parity for float64. In float32 a ReLU or max-pool input within rounding
of a tie may take either branch, in stock torch as in cnnext, and one such flip can move a
gradient by percents: compare_float64() holds both float32 runs to float64 on their own
branches and checks that every branch they took unlike float64 was a near tie.
"""
from dataclasses import dataclass, field

import torch

from . import MODELS

# Largest error allowed, relative to the largest magnitude of the stock value.
TOL = {torch.float64: 1e-9, torch.float32: 2e-3}
# The fraction of the network's largest gradient below which a gradient counts as zero
# (see compare()).
GRAD_FLOOR = {torch.float64: 1e-3, torch.float32: 1e-1}


@dataclass
class Report:
    name: str
    dtype: torch.dtype
    batch: int
    errors: dict = field(default_factory=dict)  # what -> (max relative error, worst tensor name)

    @property
    def output_error(self):
        return max(self.errors[k][0] for k in ("output", "output after step"))

    @property
    def grad_error(self):
        return self.errors["gradients"][0]

    @property
    def max_error(self):
        return max(e for e, _ in self.errors.values())

    def ok(self, tol=None):
        return self.max_error <= (TOL[self.dtype] if tol is None else tol)


def _rel(a, b, floor=0.0):
    """max |a - b| relative to max |b|, or to `floor` where that is larger."""
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return 0.0 if torch.equal(a, b) else float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(max(floor, 1e-30))).item()


def _worst(pairs, floor=0.0):
    """(largest relative error, name of the tensor it is in) over (name, ours, stock) triples."""
    return max(((_rel(a, b, floor), n) for n, a, b in pairs), key=lambda t: t[0], default=(0.0, "-"))


def compare(name, dtype=torch.float64, batch=2, seed=0, in_channels=1, num_classes=10, lr=0.05, momentum=0.9,
            build_kwargs=None):
    """Parity of network `name` (a key of MODELS) between backends; returns a Report."""
    spec = MODELS[name]
    kw = dict(in_channels=in_channels, num_classes=num_classes, **(build_kwargs or {}))
    torch.manual_seed(seed)
    ref = spec.build(backend="torch", **kw).to(dtype)
    net = spec.build(backend="cnnext", **kw).to(dtype)
    result = net.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    train = spec.has_batchnorm
    ref.train(train)
    net.train(train)

    gen = torch.Generator().manual_seed(seed + 1)
    size = spec.input_size
    x = torch.randn((batch, in_channels, size, size), generator=gen, dtype=torch.float64).to(dtype)
    gy = torch.randn((batch, num_classes), generator=gen, dtype=torch.float64).to(dtype)

    report = Report(name, dtype, batch)
    outs = []
    for model in (net, ref):
        y = model(x)
        y.backward(gy)
        outs.append(y.detach())
    report.errors["output"] = _worst([("output", outs[0], outs[1])])
    params = list(zip(net.named_parameters(), ref.named_parameters()))
    # A conv bias right before train-mode BatchNorm has a true gradient of zero (the
    # normalisation removes it): both sides hold rounding noise of ~1e-16 there. Each
    # gradient's error is therefore relative to its own largest magnitude, but at least
    # to a fraction of the largest gradient of the whole network: 1e-3 in float64; 1e-1
    # in float32, whose noise on such sums of thousands of cancelling terms is ~1e-5.
    floor = GRAD_FLOOR[dtype] * max(q.grad.abs().max().item() for _, q in ref.named_parameters())
    report.errors["gradients"] = _worst([(n, p.grad, q.grad) for (n, p), (_, q) in params], floor)

    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in (net, ref)]
    for opt in opts:
        opt.step()
    report.errors["parameters after step"] = _worst([(n, p, q) for (n, p), (_, q) in params])
    buffers = list(zip(net.named_buffers(), ref.named_buffers()))
    assert [n for (n, _), _ in buffers] == [n for _, (n, _) in buffers]
    report.errors["buffers after step"] = _worst([(n, a, b) for (n, a), (_, b) in buffers]) if buffers else (0.0, "-")
    with torch.no_grad():
        report.errors["output after step"] = _worst([("output", net(x), ref(x))])
    return report


# --------------------------------------------------------------------------------------
# float32 against a float64 reference, branch decisions accounted for
#
# A float32 network differs from its float64 value by rounding (about 1e-6 of each layer's
# largest magnitude on the direct GEMM path, up to 2e-5 on Winograd's). Where a ReLU input
# or two max-pool candidates lie within that rounding of each other, float32 may take the
# other branch; one flipped ReLU on a small map with train-mode BatchNorm then moves a
# weight gradient by percents (ResNet-18 at 96x96, batch 2, seed 1, Winograd on: two ReLU
# inputs of -1.1e-5 and -8.8e-7 against layer maxima of ~8 turn positive and
# layer3.0.conv2.weight's gradient moves by 4e-2; see docs/DESIGN.md). Such a flip is not an
# error of the kernels, and the stock twin compared directly would call it one. So
# compare_float64() holds each float32 run (cnnext's and stock's alike) to a float64 run of
# the stock network that takes the same branches, and checks separately that every branch
# float32 took differently from float64 was a near tie there.

# Largest error of a float32 run against the float64 run with its branches, relative to the
# largest magnitude (gradients: at least GRAD_FLOOR of the network's largest), per quantity.
# The classic nets' worst at batch 2 (seeds 1-8 on ResNet-18): output 7.6e-6, gradients
# 2.5e-5, BN buffers 4.9e-6 with Winograd on; about 1e-5 on the GEMM path and in stock torch.
# "zero gradients" are those whose float64 value is below 1e-6 of the network's largest
# gradient (a conv bias feeding train-mode BatchNorm: zero in exact arithmetic); float32 holds
# the rounding noise of a cancelling sum of thousands of terms there: 4.3e-4 in stock torch's
# own DenseNet stem bias at seed 1 (cnnext's there: 8e-6).
F64_REF_TOL = {"output": 2e-4, "gradients": 2e-4, "zero gradients": 2e-3, "buffers": 2e-4}
ZERO_GRAD = 1e-6
# A branch float32 may take differently from float64: a ReLU input, or the gap between the
# float64 maximum of a pooling window and the element float32 chose, at most this fraction of
# the largest magnitude of that layer's input (float32 rounding there: ~1e-5 of it at worst).
TIE_TOL = 1e-4


@dataclass
class Float64Report:
    name: str
    dtype: torch.dtype
    batch: int
    # "cnnext" / "stock" -> {"output" | "gradients" | "zero gradients" | "buffers": (error, where)}
    errors: dict = field(default_factory=dict)
    # "cnnext" / "stock" -> [(layer, count of branches taken differently, largest tie gap / layer max)]
    flips: dict = field(default_factory=dict)

    def worst(self, who):
        """The largest error of `who` as a fraction of its tolerance (F64_REF_TOL)."""
        return max(e / F64_REF_TOL[what] for what, (e, _) in self.errors[who].items())

    def ok(self, who):
        return self.worst(who) <= 1 and self.worst_tie(who) <= TIE_TOL

    def worst_tie(self, who):
        return max((g for _, _, g in self.flips[who]), default=0.0)

    def flip_count(self, who):
        return sum(c for _, c, _ in self.flips[who])


def _decision_modules(model):
    """(key, module, kind) of every ReLU and max pool that runs; keys are the stock
    network's module names (cnnext's fused conv+BN+ReLU "X" is stock's ReLU "X.2")."""
    from torch import nn
    fused = {n for n, m in model.named_modules() if type(m).__name__ == "ConvBNReLU2d"}
    out = []
    for n, m in model.named_modules():
        if n in fused and m.relu:
            out.append((f"{n}.2", m, "relu"))
        elif isinstance(m, nn.ReLU) and n.rpartition(".")[0] not in fused:
            out.append((n, m, "relu"))
        elif isinstance(m, nn.MaxPool2d):
            out.append((n, m, "pool"))
    return out


def _pool_indices(m, inp):
    return torch.nn.functional.max_pool2d(inp, m.kernel_size, m.stride, m.padding, m.dilation,
                                          ceil_mode=m.ceil_mode, return_indices=True)[1]


def _run(model, x, gy, force=None):
    """Forward and backward; returns (output, {param: grad}, {buffer: value}, decisions) where
    decisions maps (key, call number) to (kind, input, ReLU mask or pool indices). With
    `force` (another run's decisions), every ReLU and max pool takes those branches."""
    decisions, calls, handles = {}, {}, []
    for key, mod, kind in _decision_modules(model):
        def hook(m, inp, out, key=key, kind=kind):
            i = calls[key] = calls.get(key, -1) + 1
            x_in = inp[0]
            if kind == "relu":
                if force is not None:
                    out = x_in * force[(key, i)][2].to(x_in.dtype)
                d = out.detach() > 0
            else:
                d = force[(key, i)][2] if force is not None else _pool_indices(m, x_in.detach())
                if force is not None:
                    out = x_in.flatten(2).gather(2, d.flatten(2)).view(d.shape)
            decisions[(key, i)] = (kind, x_in.detach(), d)
            return out
        handles.append(mod.register_forward_hook(hook))
    try:
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.backward(gy)
    finally:
        for h in handles:
            h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}
    return y.detach(), grads, bufs, decisions


def _flips(dec, dec64):
    """[(layer, branches taken differently, largest float64 tie gap relative to the layer's
    largest input magnitude)] over the layers where some branch differs."""
    out = []
    for k, (kind, _, d) in dec.items():
        _, x64, d64 = dec64[k]
        diff = d != d64
        if not diff.any():
            continue
        scale = x64.abs().max().clamp_min(1e-300)
        if kind == "relu":
            gap = x64[diff].abs().max()
        else:  # the float64 value of the window's maximum minus that of the element float32 chose
            flat = x64.flatten(2)
            gap = (flat.gather(2, d64.flatten(2)) - flat.gather(2, d.flatten(2))).abs().max()
        out.append((f"{k[0]}#{k[1]}" if k[1] else k[0], int(diff.sum()), (gap / scale).item()))
    return out


def compare_float64(name, dtype=torch.float32, batch=2, seed=0, in_channels=1, num_classes=10, build_kwargs=None):
    """cnnext's and stock's network `name` in `dtype` against a float64 run of the stock
    network on the same (rounded) weights and input, in the mode compare() uses. Each run is
    held to a float64 run that takes its ReLU and max-pool branches (errors: output,
    parameter gradients, BN running statistics after the forward; tolerances F64_REF_TOL),
    and its branches that differ from float64's are listed with their float64 tie gaps
    (flips; each within TIE_TOL when the run is right)."""
    import copy

    spec = MODELS[name]
    kw = dict(in_channels=in_channels, num_classes=num_classes, **(build_kwargs or {}))
    torch.manual_seed(seed)
    ref = spec.build(backend="torch", **kw).to(dtype)
    net = spec.build(backend="cnnext", **kw).to(dtype)
    net.load_state_dict(ref.state_dict(), strict=True)
    ref64 = copy.deepcopy(ref).double()
    state64 = copy.deepcopy(ref64.state_dict())
    for m in (ref, net, ref64):
        m.train(spec.has_batchnorm)

    gen = torch.Generator().manual_seed(seed + 1)
    size = spec.input_size
    x = torch.randn((batch, in_channels, size, size), generator=gen, dtype=torch.float64).to(dtype)
    gy = torch.randn((batch, num_classes), generator=gen, dtype=torch.float64).to(dtype)

    _, g64, _, dec64 = _run(ref64, x.double(), gy.double())
    floor = GRAD_FLOOR[dtype] * max(g.abs().max().item() for g in g64.values())
    report = Float64Report(name, dtype, batch)
    for who, model in (("cnnext", net), ("stock", ref)):
        y, g, b, dec = _run(model, x, gy)
        ref64.load_state_dict(state64)  # running statistics as before the first float64 run
        y64, gf, bf, _ = _run(ref64, x.double(), gy.double(), force=dec)
        zero = {n for n in gf if gf[n].abs().max().item() <= ZERO_GRAD * floor / GRAD_FLOOR[dtype]}
        report.errors[who] = {
            "output": _worst([("output", y, y64)]),
            "gradients": _worst([(n, g[n], gf[n]) for n in gf if n not in zero], floor),
            "zero gradients": _worst([(n, g[n], gf[n]) for n in gf if n in zero], floor),
            "buffers": _worst([(n, b[n], bf[n]) for n in bf]),
        }
        report.flips[who] = _flips(dec, dec64)
    return report
