"""Switches of the CPU kernels.

``winograd`` (bool, default True): float32 3x3 convolutions with stride 1, dilation 1 and
one group (forward, the input gradient, and the stride-1 transposed convolution) run as
Winograd F(m x m, 3 x 3) convolutions where the shape pays (see docs/DESIGN.md, "CPU
Winograd"). Its error stays within 2e-5 * max|y| of the exact result on the classic
networks' layers (the direct GEMM path: about 1e-6); in a whole float32 network a ReLU or
max-pool input that is a near tie may take the other branch than with the GEMM path, as
stock torch's own algorithms do among themselves (docs/DESIGN.md, "Whole networks").
Set it to False for the GEMM path::

    import cnnext.backends.cpu
    cnnext.backends.cpu.winograd = False      # process-wide

    with cnnext.backends.cpu.flags(winograd=False):   # in a block, restored after
        y = cnnext.functional.conv2d(x, w, padding=1)

Either way the results are bitwise reproducible run to run and do not depend on the
thread count.

``huge_pages`` (bool, default True): output tensors (outputs, indices, input gradients) of
4 MiB or more are advised for transparent huge pages (Linux ``madvise(MADV_HUGEPAGE)``) before
anything is written to them. A fresh tensor of many megabytes otherwise faults its memory in
4 KiB at a time: allocating and filling 103 MB took 69 ms on a 2-core Zen 3 VM, 13 ms with
the advice. It changes no value; where the system has transparent huge pages set to
``never`` it does nothing. Set it to False to leave every page size to the system.

The weight cache: tensors derived from parameters (the Winograd weight transform, the
batch norm folded into the fused op's inference weight) are kept between calls and reused
only while their sources are provably unchanged: the same tensors, the same version
counter (``weight._version``, bumped by optimizer steps and ``copy_`` under ``no_grad``)
and the same bytes as a snapshot (writes through ``weight.data`` do not bump the
version; the comparison sees them). The snapshot is taken on the second call at the same
versions, so training never copies a weight and evaluation hits from its third call. Entries go when their
weight is freed, least recently used first past 512 MiB, or with ``clear_weight_cache()``.
"""
import contextlib
import sys
import types

from cnnext import _C

__all__ = ["winograd", "huge_pages", "flags", "clear_weight_cache", "weight_cache_info",
           "clear_winograd_cache", "winograd_cache_info"]


def clear_weight_cache():
    """Drops every cached derived weight (Winograd transforms, folded batch norms)."""
    _C._clear_weight_cache()


def weight_cache_info():
    """(entries, bytes) held by the weight cache, snapshots of the sources included."""
    return tuple(_C._weight_cache_info())


# The names of the cache when it held Winograd transforms only.
clear_winograd_cache = clear_weight_cache
winograd_cache_info = weight_cache_info


# Each switch: (getter, setter) in the extension.
_SWITCHES = {
    "winograd": (_C._get_winograd, _C._set_winograd),
    "huge_pages": (_C._get_huge_pages, _C._set_huge_pages),
}


@contextlib.contextmanager
def flags(winograd=None, huge_pages=None):
    """Sets the given switches inside the block and restores them after it."""
    wanted = {"winograd": winograd, "huge_pages": huge_pages}
    old = {name: get() for name, (get, _) in _SWITCHES.items()}
    try:
        for name, value in wanted.items():
            if value is not None:
                _SWITCHES[name][1](bool(value))
        yield
    finally:
        for name, value in old.items():
            _SWITCHES[name][1](value)


def _switch(name):
    get, set_ = _SWITCHES[name]

    def setter(self, value):
        if not isinstance(value, bool):
            raise TypeError(f"cnnext.backends.cpu.{name} must be a bool, got {type(value).__name__}")
        set_(value)

    return property(lambda self: get(), setter)


class _Module(types.ModuleType):
    winograd = _switch("winograd")
    huge_pages = _switch("huge_pages")


sys.modules[__name__].__class__ = _Module
