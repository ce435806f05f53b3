"""`python -m cnnext check`: a float32 row is held to Winograd's documented bound (2e-5 of
the largest magnitude) only when a Winograd path actually ran in it; every other float32
row keeps the 1e-5 of TOLERANCES["check"]."""
import io

import pytest
import torch

import cnnext.backends.cpu as cpu_backend
from cnnext import _C, check
from cnnext.functional import conv2d


def _case(name, use_winograd):
    def run(dtype, device):
        x = torch.randn(2, 32, 16, 16, dtype=dtype)
        w = torch.randn(32, 32, 3, 3, dtype=dtype) * 0.08
        with cpu_backend.flags(winograd=use_winograd):
            y = conv2d(x, w, None, 1, 1)
        # An error of 1.5e-5 of the largest magnitude: within Winograd's bound, not the GEMM's.
        ref = y.double()
        bad = ref.clone()
        bad.view(-1)[0] += 1.5e-5 * ref.abs().max()
        return [("output", bad, ref)]

    return check.Case(name, "synthetic", run, dtypes=(torch.float32,))


@pytest.mark.skipif(not _C._winograd_available(), reason="Winograd runs on CPUs with AVX-512F or AVX2 + FMA only")
def test_winograd_rows_take_winograd_bound(monkeypatch):
    monkeypatch.setattr(check, "CASES", [_case("with winograd", True), _case("gemm only", False)])
    monkeypatch.setattr(check, "devices", lambda: ["cpu"])
    out = io.StringIO()
    failed = check.run_checks(out)
    rows = {line.split()[0] + " " + line.split()[1]: line for line in out.getvalue().splitlines()
            if line.startswith(("with", "gemm"))}
    assert "PASS" in rows["with winograd"] and "(Winograd)" in rows["with winograd"] and "2e-05" in rows["with winograd"]
    assert "FAIL" in rows["gemm only"] and "(Winograd)" not in rows["gemm only"] and "1e-05" in rows["gemm only"]
    assert failed == 1
