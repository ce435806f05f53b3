"""cnnext.fuse(model): every Conv2d -> BatchNorm2d (-> ReLU) chain that the model's data
flow proves (torch.fx trace) runs as one cnnext op; state_dict keys unchanged."""
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.modules import module as _module_globals

from .nn.fused import ConvBNReLU2d, FusedBatchNorm2d, FusedConv2d, FusedReLU
from .nn.sync_bn import SyncBatchNorm

__all__ = ["fuse", "FuseReport", "FuseWarning"]

_CONVS = None  # filled lazily: (nn.Conv2d, cnnext.nn.Conv2d)
_BNS = (nn.BatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm)
_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu, torch.relu_, torch.nn.functional.relu_)


def _convs():
    global _CONVS
    if _CONVS is None:
        from .nn import Conv2d

        _CONVS = (nn.Conv2d, Conv2d)
    return _CONVS


class FuseWarning(UserWarning):
    """cnnext.fuse left a Conv2d -> BatchNorm2d pair unfused, or could not trace a module."""


@dataclass
class FuseReport:
    """What :func:`fuse` did: ``fused`` lists (conv, batch norm, ReLU or None) module
    names; ``unfused`` lists (module name, reason) for every batch norm left as it was
    and every module that could not be traced; ``warned`` the subset worth a warning (a
    Conv2d output reaching a batch norm that could not be fused, a failed trace)."""

    fused: list = field(default_factory=list)
    unfused: list = field(default_factory=list)
    warned: list = field(default_factory=list)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with cnnext.nn modules and every conv / batch norm / ReLU kept as
    leaves (call_module nodes)."""

    def is_leaf_module(self, m, qualname):
        return (isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.ReLU))
                or type(m).__module__.startswith("cnnext.nn") or super().is_leaf_module(m, qualname))


def _hooks(m):
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(len(getattr(m, n, None) or ()) for n in names)


def _global_hooks():
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")
    return any(len(getattr(_module_globals, n, None) or ()) for n in names)


def _pair_problem(conv, bn):
    """None if conv and bn can run as one op, else why not."""
    from ._convert import _why_not

    if nn.parameter.is_lazy(conv.weight):
        return "the Conv2d's parameters are not initialised yet (lazy)"
    if bn.num_features != conv.out_channels:
        return f"the batch norm has {bn.num_features} features, the Conv2d {conv.out_channels} output channels"
    for t in list(bn.parameters(recurse=False)) + [b for b in bn.buffers(recurse=False) if b.is_floating_point()]:
        if t.dtype != conv.weight.dtype or t.device != conv.weight.device:
            return (f"the batch norm holds {t.dtype} on {t.device}, the Conv2d {conv.weight.dtype} on "
                    f"{conv.weight.device}")
    why = _why_not(conv)
    if why is not None:
        return f"cnnext cannot run the Conv2d: {why}"
    return None


def _module_problem(m, what, counts):
    if _hooks(m):
        return f"the {what} has hooks"
    if counts.get(id(m), 0) != 1:
        return f"the {what} is registered at {counts.get(id(m), 0)} places in the model"
    return None


def _chains_in_graph(graph, root, prefix, counts, report):
    """{conv name: (bn name, relu name or None)} proven by one traced graph, with notes."""
    modules = dict(root.named_modules())
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    full = (lambda t: f"{prefix}.{t}" if prefix else t)
    chains, notes = {}, {}
    for node in graph.nodes:
        if node.op != "call_module" or type(modules.get(node.target)) not in _BNS:
            continue
        bn_name, bn = node.target, modules[node.target]
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if conv is None or type(conv) not in _convs():
            notes[full(bn_name)] = ("its input is not the output of a Conv2d", False)
            continue
        conv_name = src.target
        users = list(src.users)
        why = None
        if len(users) != 1:
            why = f"the output of {full(conv_name)} is also used elsewhere ({len(users)} uses)"
        elif calls[conv_name] != 1 or calls[bn_name] != 1:
            why = f"{full(conv_name) if calls[conv_name] != 1 else full(bn_name)} is called more than once"
        else:
            why = (_module_problem(conv, "Conv2d", counts) or _module_problem(bn, "batch norm", counts)
                   or _pair_problem(conv, bn))
        if why is not None:
            notes[full(bn_name)] = (f"not fused with {full(conv_name)}: {why}", True)
            continue
        relu_name = None
        bn_users = list(node.users)
        if len(bn_users) == 1:
            u = bn_users[0]
            if u.op == "call_module" and type(modules.get(u.target)) is nn.ReLU and len(u.args) == 1 \
                    and u.args[0] is node and not u.kwargs and calls[u.target] == 1 \
                    and _module_problem(modules[u.target], "ReLU", counts) is None:
                relu_name = u.target
            elif (u.op == "call_function" and u.target in _RELU_FUNCTIONS) or \
                    (u.op == "call_method" and u.target in ("relu", "relu_")) or \
                    (u.op == "call_module" and type(modules.get(u.target)) is nn.ReLU):
                notes[full(bn_name)] = ("fused without its ReLU (a functional relu, or a ReLU module called "
                                        "more than once, registered twice or hooked, runs as before)", False)
        chains[full(conv_name)] = (full(bn_name), full(relu_name) if relu_name else None)
    return chains, notes


def _trace(module):
    """Traced graphs of module in train and in eval mode (its mode restored)."""
    modes = [(m, m.training) for m in module.modules()]
    graphs = []
    try:
        for mode in (True, False):
            module.train(mode)
            graphs.append(_Tracer().trace(module))
    finally:
        for m, was in modes:
            m.training = was
    return graphs


def _sequential_chains(seq, prefix, counts):
    """Conv2d, BatchNorm2d[, ReLU] runs of a plain nn.Sequential: its forward feeds each
    child's output to the next, so these chains hold whatever the model around it does."""
    names = [n for n, m in seq._modules.items() if m is not None]
    if len(names) != len(seq._modules):
        return {}, {}
    full = (lambda t: f"{prefix}.{t}" if prefix else t)
    chains, notes = {}, {}
    i = 0
    while i + 1 < len(names):
        conv, bn = seq._modules[names[i]], seq._modules[names[i + 1]]
        if type(conv) in _convs() and type(bn) in _BNS:
            why = (_module_problem(conv, "Conv2d", counts) or _module_problem(bn, "batch norm", counts)
                   or _pair_problem(conv, bn))
            if why is not None:
                notes[full(names[i + 1])] = (f"not fused with {full(names[i])}: {why}", True)
                i += 1
                continue
            relu = seq._modules[names[i + 2]] if i + 2 < len(names) else None
            relu_ok = type(relu) is nn.ReLU and _module_problem(relu, "ReLU", counts) is None
            chains[full(names[i])] = (full(names[i + 1]), full(names[i + 2]) if relu_ok else None)
            i += 3 if relu_ok else 2
            continue
        i += 1
    return chains, notes


def _plan(module, prefix, counts, report, chains, notes):
    if isinstance(module, ConvBNReLU2d) or not module._modules:
        return
    try:
        graphs = _trace(module)
    except Exception as e:  # noqa: BLE001 (any failure to trace means: prove less)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if type(module) is nn.Sequential:
            how = "fused its Conv2d, BatchNorm2d[, ReLU] runs and, inside its other children, what traces"
            c, n = _sequential_chains(module, prefix, counts)
            chains.update(c)
            notes.update(n)
        else:
            how = "fused only what traces inside its children and their plain nn.Sequential runs"
        name = prefix or "(model)"
        report.unfused.append((name, f"could not be traced ({type(e).__name__}: {msg[:200]}); {how}"))
        report.warned.append(report.unfused[-1])
        for child_name, child in module._modules.items():
            if child is not None:
                _plan(child, f"{prefix}.{child_name}" if prefix else child_name, counts, report, chains, notes)
        return
    found = [_chains_in_graph(g, module, prefix, counts, report) for g in graphs]
    (c_train, n_train), (c_eval, n_eval) = found
    for conv, (bn, relu) in c_train.items():
        other = c_eval.get(conv)
        if other is None or other[0] != bn:
            notes[bn] = (f"not fused with {conv}: train and eval mode trace different data flows", True)
            continue
        chains[conv] = (bn, relu if other[1] == relu else None)
    for n in (n_train, n_eval):
        for k, v in n.items():
            notes.setdefault(k, v)


def fuse(model, *, warn=True, report=False):
    """Fuses, in place, every Conv2d -> BatchNorm2d [-> ReLU] chain of ``model`` that its
    data flow proves, and returns the model (with ``report=True``, ``(model, FuseReport)``).

    The model is traced with torch.fx (in train and in eval mode, with its convs, batch
    norms, ReLUs and cnnext layers as leaves). A Conv2d (stock or cnnext) and a batch norm
    (BatchNorm2d, nn.SyncBatchNorm, cnnext.nn.SyncBatchNorm) are fused when the batch
    norm's only input is the conv's output, that output has no other use, each is called
    once in the graph, registered once in the model and has no hooks, and their shapes,
    dtypes and devices agree. A ReLU module (exact nn.ReLU, inplace or not) that is the
    batch norm's only user, called once, is fused too; a functional relu (F.relu,
    torch.relu, .relu()) is left to run after the fused op. A model that cannot be traced
    is fused only where that is proven anyway: inside its children that trace, and along
    the runs of plain ``nn.Sequential`` containers.

    In place, keeping every key: the Conv2d becomes a :class:`cnnext.nn.FusedConv2d`
    (which computes conv, batch norm and ReLU in one cnnext op), the batch norm a
    :class:`cnnext.nn.FusedBatchNorm2d` and the ReLU a :class:`cnnext.nn.FusedReLU`,
    whose forwards pass their input through. The Parameter and buffer objects are
    unchanged, so the state_dict has the original keys (checkpoints load both ways,
    strictly), optimizers keep working, and ``train()``/``eval()``, ``.to()`` and
    ``copy.deepcopy`` act as before. :func:`cnnext.revert` undoes it. A synchronised batch
    norm stays synchronised (see :class:`cnnext.nn.SyncBatchNorm`).

    What was left unfused and why is in the report; with ``warn=True`` a
    :class:`FuseWarning` lists the near misses (a Conv2d output reaching a batch norm that
    could not be fused) and the modules that could not be traced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: expected model to be an nn.Module, got {type(model).__name__}")
    rep = FuseReport()
    if _global_hooks():
        rep.unfused.append(("(model)", "global module hooks are registered: nothing fused"))
        rep.warned.append(rep.unfused[-1])
        chains = {}
    else:
        counts = {}
        for _, m in model.named_modules(remove_duplicate=False):
            counts[id(m)] = counts.get(id(m), 0) + 1
        chains, notes = {}, {}
        _plan(model, "", counts, rep, chains, notes)
        fused_bns = {b for b, _ in chains.values()}
        for name, (why, near) in sorted(notes.items()):
            if name in fused_bns and not why.startswith("fused without"):
                continue
            rep.unfused.append((name, why))
            if near:
                rep.warned.append((name, why))
    for conv_name, (bn_name, relu_name) in chains.items():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        conv.__dict__["_unfused_class"] = type(conv)
        conv.__class__ = FusedConv2d
        conv.__dict__["_fused_bn"] = bn
        conv.__dict__["_fused_relu"] = relu_name is not None
        bn.__dict__["_unfused_class"] = type(bn)
        bn.__class__ = FusedBatchNorm2d
        if relu_name is not None:
            model.get_submodule(relu_name).__class__ = FusedReLU
        rep.fused.append((conv_name, bn_name, relu_name))
    if warn and rep.warned:
        lines = "; ".join(f"{n}: {w}" for n, w in rep.warned)
        warnings.warn(f"fuse: {len(rep.warned)} note(s): {lines}", FuseWarning, stacklevel=2)
    return (model, rep) if report else model

