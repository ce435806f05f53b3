import os
import sys

# Benchmarks run against the cnnext that is installed (or built in place at the repo root).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _flush_caches():
    """Each benchmark starts from the same cache state: 64 MiB written and read back
    evicts what the previous benchmark left in L2 and L3 (32 MiB on the CI-like VM). Without it the
    second of a cnnext / torch pair inherited the first's cache and allocator state, and
    on memory-bound layers ran up to 1.6x faster whichever implementation it was."""
    buf = torch.empty(16 * 1024 * 1024, dtype=torch.float32)
    buf.fill_(1.0)
    assert float(buf.sum()) == buf.numel()
    del buf
    yield


def pytest_benchmark_update_machine_info(config, machine_info):
    """Records torch's version and how cnnext was built in the run's JSON (machine_info),
    for benchmarks/report.py's summary."""
    import cnnext

    machine_info["torch"] = torch.__version__
    machine_info["cnnext_build"] = cnnext.build_info()
    # The instruction-set level cnnext's kernels ran at (avx512, avx2, scalar): the float32
    # and bfloat16 GEMMs need AVX-512, so it decides which kernels a run measured.
    machine_info["cnnext_cpu_isa"] = cnnext._C._cpu_isa()
