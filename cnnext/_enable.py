"""cnnext.enable(): torch.nn.functional's conv / pooling calls, from any code, on cnnext."""
import functools
import inspect
import threading

import torch
from torch.nn import functional as TF
from torch.overrides import TorchFunctionMode

from . import functional as CF

__all__ = ["enable"]


def _unpool_nn(input, indices, output_size):
    """torch._C._nn.max_unpool2d(input, indices, output_size): the output size given."""
    return CF._ops.max_unpool2d(input, indices, [int(s) for s in output_size])


def _routes():
    """{torch function object: cnnext function} (identity of the function objects that
    __torch_function__ receives for each spelling)."""
    routes = {
        torch.conv2d: CF.conv2d,                       # is torch.nn.functional.conv2d
        torch.conv_transpose2d: CF.conv_transpose2d,   # is torch.nn.functional.conv_transpose2d
        torch.max_pool2d: CF.max_pool2d,
        TF.max_pool2d: CF.max_pool2d,
        TF.max_pool2d_with_indices: CF.max_pool2d_with_indices,
        torch._C._nn.max_pool2d_with_indices: CF.max_pool2d_with_indices,
        TF.avg_pool2d: CF.avg_pool2d,                  # is torch._C._nn.avg_pool2d
        TF.adaptive_avg_pool2d: CF.adaptive_avg_pool2d,
        torch._C._nn.adaptive_avg_pool2d: CF.adaptive_avg_pool2d,
        TF.max_unpool2d: CF.max_unpool2d,
        torch._C._nn.max_unpool2d: _unpool_nn,
    }
    private = getattr(TF, "_max_pool2d", None)  # what F.max_pool2d's boolean dispatch calls
    if private is not None:
        routes[private] = CF.max_pool2d
    return routes


_ROUTES = None
_SIGNATURES = {}


def _signature(fn):
    sig = _SIGNATURES.get(fn)
    if sig is None:
        sig = _SIGNATURES[fn] = inspect.signature(fn)
    return sig


def _unsupported(args, kwargs):
    """None if cnnext runs this call's tensors, else why not."""
    from ._convert import _CPU_DTYPES, _CUDA_DTYPES

    for t in list(args) + list(kwargs.values()):
        if not isinstance(t, torch.Tensor):
            continue
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            return f"a tensor subclass ({type(t).__name__})"
        if t.dtype in (torch.int64,):  # max_unpool2d's indices
            continue
        if t.device.type == "cpu":
            if t.dtype not in _CPU_DTYPES:
                return f"dtype {t.dtype} on CPU"
        elif t.device.type == "cuda":
            from . import build_info

            if not build_info()["cuda"]:
                return "a CUDA tensor with a CPU-only build of cnnext"
            if t.dtype not in _CUDA_DTYPES:
                return f"dtype {t.dtype} on CUDA"
        else:
            return f"device {t.device}"
    return None


class _Mode(TorchFunctionMode):
    def __init__(self, strict):
        super().__init__()
        self.strict = strict

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = _ROUTES.get(func) if _ROUTES is not None else None
        if target is None:
            return func(*args, **kwargs)
        why = _unsupported(args, kwargs)
        if why is None:
            try:
                _signature(target).bind(*args, **kwargs)
            except TypeError as e:
                why = f"arguments cnnext's {target.__name__} does not take ({e})"
        if why is not None:
            if self.strict:
                name = getattr(func, "__name__", str(func))
                raise TypeError(f"cnnext.enable(strict=True): cnnext cannot run {name} on {why}")
            return func(*args, **kwargs)
        return target(*args, **kwargs)


class enable:
    """Context manager and decorator: while it is active (in this thread),
    ``torch.nn.functional.conv2d``, ``conv_transpose2d``, ``max_pool2d`` (and
    ``max_pool2d_with_indices``, ``return_indices=True``), ``avg_pool2d``,
    ``adaptive_avg_pool2d``, ``max_unpool2d`` and their ``torch.*`` spellings
    (``torch.conv2d``, ``torch.max_pool2d``, ``torch._C._nn.*``), called from any code,
    stock modules' forwards included, run on cnnext.functional::

        with cnnext.enable():
            y = torchvision_model(x)

        @cnnext.enable()
        def step(x): ...

    Calls cnnext cannot run (a dtype or device it lacks, a tensor subclass) fall back to
    stock torch; ``strict=True`` raises a ``TypeError`` instead. Built on
    ``torch.overrides.TorchFunctionMode``: nests, is per thread, and leaves other
    functions alone. (Not tried under ``torch.compile``.)
    """

    def __init__(self, strict=False):
        self.strict = bool(strict)
        self._local = threading.local()

    def __enter__(self):
        global _ROUTES
        if _ROUTES is None:
            _ROUTES = _routes()
        mode = _Mode(self.strict)
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(mode)
        mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._local.stack.pop().__exit__(*exc)

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with enable(self.strict):
                return fn(*args, **kwargs)

        return wrapper
