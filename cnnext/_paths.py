"""Kernel-path counters, for tests that target one kernel path.

The extension counts, per named kernel path, how many kernel calls chose it
(csrc/paths.h; ``cnnext._C._path_counts()``). ``expect_path`` asserts that the named
paths ran inside a block, so a test whose input stops reaching its path (a size limit
moved) fails instead of passing silently::

    with expect_path("max_pool2d.fwd.avx512_rows"):
        cnnext.functional.max_pool2d(x, 3)

A path that only runs on a CPU with some instruction set (``CNNEXT_PATH_NEEDS`` in
csrc/paths.h: the float32 GEMM's paths need AVX-512F, the bfloat16 GEMM's AVX512_BF16)
cannot run on a CPU without it: ``expect_path`` then skips the test, naming the path and
what it needs, rather than fail it or let it pass without its path. ``runnable`` says
whether a path can run here (under the ``CNNEXT_CPU_ISA`` cap).
"""
import contextlib

from cnnext import _C


def counts():
    """Calls per kernel path since the extension was loaded (or the last reset)."""
    return dict(_C._path_counts())


def reset():
    _C._reset_path_counts()


def needs(name):
    """(instruction set the path needs or 'nothing', whether this CPU offers it)."""
    table = _C._path_needs()
    if name not in table:
        raise AssertionError(f"unknown kernel path {name!r}; known paths: {sorted(table)}")
    return table[name]


def runnable(name):
    """Whether kernel path `name` can run on this CPU (under the CNNEXT_CPU_ISA cap)."""
    return needs(name)[1]


def require(*names):
    """Skips the calling test unless every named path can run on this CPU."""
    for n in names:
        what, ok = needs(n)
        if not ok:
            import pytest

            pytest.skip(f"kernel path {n!r} needs {what}; this CPU (under CNNEXT_CPU_ISA) "
                        f"offers {_C._cpu_isa()}")


@contextlib.contextmanager
def expect_path(*names):
    """Fails (AssertionError) unless every named path ran at least once inside the block.

    The message names the path that did not run and lists the paths that did. A name the
    extension does not know fails at once; a path this CPU cannot run skips the test (see
    ``require``) before the block runs."""
    before = counts()
    unknown = [n for n in names if n not in before]
    if unknown:
        raise AssertionError(f"unknown kernel path(s) {unknown}; known paths: {sorted(before)}")
    require(*names)
    yield
    after = counts()
    ran = sorted(k for k, v in after.items() if v != before.get(k, 0))
    for n in names:
        if after[n] == before[n]:
            raise AssertionError(f"expected kernel path {n!r} to run; paths that ran: {ran}")
