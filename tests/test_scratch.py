"""The kernels' per-thread scratch (csrc/cpu/scratch.{h,cpp}): kept between calls, grown
when a larger layer needs more (old bytes kept, new ones zero), and held in huge-page-advised
mappings of their own from 1 MiB up, so that a layer's buffers do not depend on what the
process allocated and freed before. `_C._scratch_held()` reports the calling thread's
(bytes, bytes in such mappings); these tests run at one thread so that the kernels' work
runs on the calling thread."""
import pytest
import torch
import torch.nn.functional as F

import cnnext.backends.cpu as cpu_backend
from cnnext import _C
from cnnext._paths import counts
from cnnext.functional import conv2d

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _ran(fn):
    before = counts()
    out = fn()
    after = counts()
    return out, {k for k, v in after.items() if v != before.get(k, 0)}


def _case(n, c, h, o, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, h, generator=g), torch.randn(o, c, 3, 3, generator=g) / (3 * c**0.5)


def test_large_layer_scratch_is_huge_page_mapped_and_kept():
    x, w = _case(2, 64, 56, 64)
    with torch.no_grad():
        y, paths = _ran(lambda: conv2d(x, w, padding=1))
    assert paths, "no kernel path ran"
    held, huge = _C._scratch_held()
    # Padded input planes alone: 2 * 64 * 58 * 58 floats (1.7 MB) -> one mapping of 2 MiB or more.
    assert huge >= 2 * MiB and huge % (2 * MiB) == 0, (held, huge)
    assert held >= huge
    with torch.no_grad():
        y2 = conv2d(x, w, padding=1)
    assert _C._scratch_held() == (held, huge), "a repeated call must reuse the scratch, not grow it"
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)
    assert torch.equal(y, y2)


@pytest.mark.parametrize("winograd", [True, False])
def test_growth_keeps_results(winograd):
    """Small, larger, small again, in both the Winograd and the GEMM pools: the buffers
    grow between calls and every result still matches float64."""
    with cpu_backend.flags(winograd=winograd), torch.no_grad():
        for n, c, h, o in [(1, 8, 9, 8), (2, 64, 40, 64), (1, 8, 9, 8), (3, 32, 61, 48)]:
            x, w = _case(n, c, h, o, seed=h)
            y = conv2d(x, w, padding=1)
            ref = F.conv2d(x.double(), w.double(), padding=1)
            torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    held, huge = _C._scratch_held()
    assert held > 0 and huge >= 2 * MiB


def test_scratch_is_per_thread():
    """Work spread over two threads gives the same bits as one thread: each thread has
    its own buffers."""
    x, w = _case(4, 64, 48, 64)
    with torch.no_grad():
        one = conv2d(x, w, padding=1)
        torch.set_num_threads(2)
        two = conv2d(x, w, padding=1)
    torch.testing.assert_close(one, two, rtol=0, atol=0)
