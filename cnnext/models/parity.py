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
