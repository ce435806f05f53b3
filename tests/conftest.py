"""Fixtures of the cnnext test suite: seeding, hypothesis settings, thread and TF32
switches. Layouts, tolerances, comparisons, devices and the parity harness live in
cnnext.testing (shared with `python -m cnnext check`); hypothesis strategies in
tests/strategies.py."""
import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

import cnnext  # noqa: F401  (registers torch.ops.cnnext.*)
# Re-exported for the test modules that import them from here.
from cnnext.testing import (GRAD_NAMES, LAYOUTS, RTOL, Parity, assert_close_scaled,  # noqa: F401
                            assert_matches, is_channels_last, layouts, leaf, to_layout)

# No example database in the repository; deadlines are meaningless on a shared CI box.
# Under CI (the CI environment variable set, as .ci/run does) the examples are derandomized:
# the same draws every run, so a red CI is the code's doing, never the draw's; local runs
# keep drawing new examples.
settings.register_profile(
    "cnnext", database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("cnnext")

# CNNEXT_HYPOTHESIS_SCALE=20 runs twenty times the examples of every hypothesis test.
_EXAMPLES_SCALE = int(os.environ.get("CNNEXT_HYPOTHESIS_SCALE", "1"))


def rerun_under_avx2_cap(test_file, this_test):
    """Runs test_file again in a pytest subprocess with CNNEXT_CPU_ISA=avx2 (all but this_test,
    the test that calls it): an AVX-512 CPU's way to run a file's AVX2-only kernel paths. Fails
    unless every test there passed and none was skipped."""
    here = os.path.dirname(os.path.abspath(test_file))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(test_file),
                          "-k", f"not {this_test}"], cwd=here, capture_output=True, text=True,
                         env=dict(os.environ, CNNEXT_CPU_ISA="avx2"))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], out.stdout[-2000:]


def bf16_conv_case(shape, seed=0):
    """bfloat16 (input, weight, bias, conv keyword arguments) for shape = (N, C, H, W, O,
    (KH, KW), stride, padding, dilation, groups): unit-normal input and bias, the weight
    scaled by 1 / sqrt(fan-in)."""
    n, c, h, w, o, k, s, p, d, g = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).bfloat16()
    wt = (torch.randn(o, c // g, *k, generator=gen) / (c // g * k[0] * k[1]) ** 0.5).bfloat16()
    b = torch.randn(o, generator=gen).bfloat16()
    return x, wt, b, dict(stride=s, padding=p, dilation=d, groups=g)


def assert_same_bits(got, want):
    """got and want hold the same values bit for bit (NaN where want has NaN, payloads aside)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def examples(n):
    """max_examples for a hypothesis test: n, times CNNEXT_HYPOTHESIS_SCALE."""
    return n * _EXAMPLES_SCALE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def _cudnn_tf32_set(on):
    """cudnn's TF32 switch set to `on` inside the block, as torch's flags() context manager
    does it (torch.testing._internal, imported by the OpInfo suite, disables setting the
    flags directly); the other cudnn flags keep their values."""
    c = torch.backends.cudnn
    with c.flags(enabled=c.enabled, benchmark=c.benchmark, deterministic=c.deterministic, allow_tf32=on):
        yield


@pytest.fixture
def strict_fp32():
    """float32 on CUDA follows torch's TF32 flag, which is on by default for convolutions;
    tests that compare strict float32 with tight tolerances turn TF32 off while they run
    (pytest.mark.usefixtures("strict_fp32"))."""
    with _cudnn_tf32_set(False):
        yield


@pytest.fixture
def igemm(monkeypatch):
    """Every problem the CUDA implicit GEMM supports goes through it ($CNNEXT_CUDA_IGEMM=1,
    so small odd shapes with partial tiles reach it; =0 would pick the direct kernels);
    the TF32 switch is restored afterwards."""
    monkeypatch.setenv("CNNEXT_CUDA_IGEMM", "1")
    with contextlib.ExitStack() as stack:
        yield lambda math: stack.enter_context(_cudnn_tf32_set(math == "tf32"))


@pytest.fixture(params=[1, 2, 3], ids=lambda t: f"threads{t}")
def threads(request):
    """Runs a test at 1, 2 and 3 intra-op threads (work split, per-thread partial sums)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def single_thread():
    """Runs a test on one intra-op thread. For gradcheck: it calls the ops thousands of times
    on tiny tensors, and on a busy 2-core machine every parallel region can stall for a
    scheduler time slice. The multi-threaded paths are covered by the parity tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_state_dict_round_trip(src, dst, x):
    """dst loads src's (perturbed) parameters through torch.save/torch.load, strictly;
    returns both modules' outputs on x for the caller to compare."""
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()  # differ from dst's init
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    result = dst.load_state_dict(torch.load(buf), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (name, a), (_, b) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(a, b), name
    return dst(x), src(x)


def import_torchvision():
    """torchvision, or a pytest skip when it is not installed. The tests' one way to import it:
    cnnext.train.data.import_torchvision, which also lets a torchvision wheel whose compiled
    ops do not load against this torch (the CUDA wheels these machines install with
    `--no-deps`) import, by defining the ``torchvision::nms`` / ``qnms`` schemas first."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    from cnnext.train.data import import_torchvision as _import

    return _import("the model-level tests")
