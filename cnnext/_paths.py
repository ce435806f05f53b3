"""Kernel-path counters, for tests that target one kernel path.

The extension counts, per named kernel path, how many kernel calls chose it
(csrc/paths.h; ``cnnext._C._path_counts()``). ``expect_path`` asserts that the named
paths ran inside a block, so a test whose input stops reaching its path (a size limit
moved, an instruction set missing) fails instead of passing silently::

    with expect_path("max_pool2d.fwd.avx512_rows"):
        cnnext.functional.max_pool2d(x, 3)
"""
import contextlib

from cnnext import _C


def counts():
    """Calls per kernel path since the extension was loaded (or the last reset)."""
    return dict(_C._path_counts())


def reset():
    _C._reset_path_counts()


@contextlib.contextmanager
def expect_path(*names):
    """Fails (AssertionError) unless every named path ran at least once inside the block.

    The message names the path that did not run and lists the paths that did. A name the
    extension does not know fails at once."""
    before = counts()
    unknown = [n for n in names if n not in before]
    if unknown:
        raise AssertionError(f"unknown kernel path(s) {unknown}; known paths: {sorted(before)}")
    yield
    after = counts()
    ran = sorted(k for k, v in after.items() if v != before.get(k, 0))
    for n in names:
        if after[n] == before[n]:
            raise AssertionError(f"expected kernel path {n!r} to run; paths that ran: {ran}")
