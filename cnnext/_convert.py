"""cnnext.convert(model) / cnnext.revert(model): a model's stock layers to their cnnext
twins and back, the same Parameter and buffer objects, hooks, mode and state_dict keys."""
import warnings

import torch
from torch import nn

from . import nn as cnn

__all__ = ["convert", "revert", "ConvertWarning", "STOCK_TO_CNNEXT"]

# Exact stock type -> cnnext twin (a subclass with the same constructor and state_dict).
STOCK_TO_CNNEXT = {
    nn.Conv2d: cnn.Conv2d,
    nn.ConvTranspose2d: cnn.ConvTranspose2d,
    nn.MaxPool2d: cnn.MaxPool2d,
    nn.AvgPool2d: cnn.AvgPool2d,
    nn.AdaptiveAvgPool2d: cnn.AdaptiveAvgPool2d,
    nn.MaxUnpool2d: cnn.MaxUnpool2d,
    nn.SyncBatchNorm: cnn.SyncBatchNorm,
}

# cnnext type -> stock type, for revert (fused parts go back to what they were).
_CNNEXT_TO_STOCK = {v: k for k, v in STOCK_TO_CNNEXT.items()}

_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CUDA_DTYPES = _CPU_DTYPES


class ConvertWarning(UserWarning):
    """cnnext.convert left layers stock because cnnext cannot run them."""


def _why_not(module):
    """None if cnnext can run ``module`` as its parameters are now, else the reason."""
    tensors = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False)
                                                         if b.is_floating_point()]
    for t in tensors:
        if nn.parameter.is_lazy(t):
            return "its parameters are not initialised yet (lazy)"
        if t.device.type == "cpu":
            if t.dtype not in _CPU_DTYPES:
                return f"dtype {t.dtype} on CPU (cnnext runs float16, bfloat16, float32 and float64 there)"
        elif t.device.type == "cuda":
            from . import build_info

            if not build_info()["cuda"]:
                return "CUDA parameters, but this build of cnnext has no CUDA kernels"
            if t.dtype not in _CUDA_DTYPES:
                return f"dtype {t.dtype} on CUDA (cnnext runs float16, bfloat16, float32 and float64 there)"
        else:
            return f"device {t.device} (cnnext runs on cpu and cuda)"
    return None


def _twin(module, cls, inplace):
    """``module`` as an instance of ``cls``: the same object with its class changed
    (inplace), or a new object sharing its attributes (the same Parameter, buffer and
    hook objects; its own dicts of them)."""
    if inplace:
        module.__class__ = cls
        return module
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for key, value in module.__dict__.items():
        if isinstance(value, dict):
            new.__dict__[key] = type(value)(value) if type(value) is not dict else dict(value)
    return new


def _rebuild(model, mapping, inplace, skip, memo, path=""):
    """Walks the module tree once per module object (shared modules stay shared): each
    module whose exact type is in ``mapping`` becomes its twin, unless ``skip(module)``
    gives a reason, recorded in memo['_skipped']."""
    if id(model) in memo:
        return memo[id(model)]
    cls = mapping.get(type(model))
    reason = skip(model) if cls is not None and skip is not None else None
    if reason is not None:
        memo["_skipped"].append((path or "(model)", type(model).__name__, reason))
        cls = None
    out = _twin(model, cls if cls is not None else type(model), inplace) if (cls is not None or not inplace) \
        else model
    memo[id(model)] = out
    for name, child in list(model._modules.items()):
        if child is None:
            continue
        new = _rebuild(child, mapping, inplace, skip, memo, f"{path}.{name}" if path else name)
        if new is not child or not inplace:
            out._modules[name] = new
    return out


def convert(model, *, inplace=False, strict=False, types=None):
    """Every stock ``Conv2d``, ``ConvTranspose2d``, ``MaxPool2d``, ``AvgPool2d``,
    ``AdaptiveAvgPool2d``, ``MaxUnpool2d`` (exact types) of ``model`` becomes its
    cnnext.nn twin, and ``nn.SyncBatchNorm`` becomes :class:`cnnext.nn.SyncBatchNorm`.

    The twin holds the same Parameter and buffer objects, hooks and train/eval mode, so
    state_dict keys are unchanged and an optimizer built on ``model`` keeps working.
    ``inplace=True`` changes the classes of the modules themselves (every reference to
    them sees the change); ``inplace=False`` (default) returns a new module tree sharing
    the parameters and leaves ``model`` as it was. A module registered at two places
    stays one module. Subclasses of the stock types are left alone unless ``types`` maps
    them: ``types={MyConv: cnnext.nn.Conv2d}`` (added to :data:`STOCK_TO_CNNEXT`).

    Layers cnnext cannot run as they are (a dtype it lacks on their device, a device other
    than cpu and cuda, CUDA parameters with a CPU-only build, uninitialised lazy
    parameters) stay stock and are reported: a :class:`ConvertWarning` listing them and
    why, or, with ``strict=True``, a ``TypeError``. Functional calls in a forward
    (``F.adaptive_avg_pool2d(...)``) are not layers: run the model under
    :func:`cnnext.enable` for those.
    """
    mapping = dict(STOCK_TO_CNNEXT)
    if types:
        for k, v in dict(types).items():
            if not (isinstance(k, type) and issubclass(k, nn.Module) and isinstance(v, type)
                    and issubclass(v, nn.Module)):
                raise TypeError(f"convert: expected types to map module classes to module classes, got {k!r}: {v!r}")
            mapping[k] = v
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected model to be an nn.Module, got {type(model).__name__}")
    memo = {"_skipped": []}
    out = _rebuild(model, mapping, inplace, _why_not, memo)
    _relink(memo)
    skipped = memo["_skipped"]
    if skipped:
        lines = "; ".join(f"{name} ({kind}): {why}" for name, kind, why in skipped)
        msg = f"convert: {len(skipped)} layer(s) left stock, cnnext cannot run them: {lines}"
        if strict:
            raise TypeError(msg)
        warnings.warn(msg, ConvertWarning, stacklevel=2)
    return out


def _stock_class(module):
    kind = type(module)
    if kind in (cnn.FusedConv2d, cnn.FusedBatchNorm2d):
        original = module.__dict__.get("_unfused_class", nn.BatchNorm2d if kind is cnn.FusedBatchNorm2d
                                       else nn.Conv2d)
        return _CNNEXT_TO_STOCK.get(original, original)
    if kind is cnn.FusedReLU:
        return nn.ReLU
    return _CNNEXT_TO_STOCK.get(kind)


def revert(model, *, inplace=False):
    """The inverse of :func:`convert` and :func:`cnnext.fuse`: every cnnext.nn layer back to
    its stock torch.nn namesake (fused convolutions, batch norms and ReLUs to the stock
    Conv2d, BatchNorm2d / SyncBatchNorm and ReLU they were; a ConvBNReLU2d to a plain
    ``nn.Sequential`` of stock Conv2d, BatchNorm2d[, ReLU], the same state_dict keys),
    holding the same Parameter and buffer objects. ``inplace`` as for convert."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert: expected model to be an nn.Module, got {type(model).__name__}")
    memo = {}

    def walk(module):
        if id(module) in memo:
            return memo[id(module)]
        if isinstance(module, cnn.ConvBNReLU2d) and type(module) is cnn.ConvBNReLU2d:
            cls = nn.Sequential
        else:
            cls = _stock_class(module)
        out = _twin(module, cls, inplace) if cls is not None else (module if inplace else _twin(module, type(module),
                                                                                               False))
        for key in ("_fused_bn", "_fused_relu", "_unfused_class", "relu"):
            if cls is not None and key in out.__dict__ and (key != "relu" or cls is nn.Sequential):
                del out.__dict__[key]
        memo[id(module)] = out
        for name, child in list(module._modules.items()):
            if child is not None:
                new = walk(child)
                if new is not child or not inplace:
                    out._modules[name] = new
        return out

    out = walk(model)
    _relink(memo)
    return out


def _relink(memo):
    """A FusedConv2d's (unregistered) batch norm is the new tree's module, not the old one's."""
    for new in list(memo.values()):
        bn = getattr(new, "__dict__", {}).get("_fused_bn") if isinstance(new, nn.Module) else None
        if bn is not None and id(bn) in memo:
            new.__dict__["_fused_bn"] = memo[id(bn)]
