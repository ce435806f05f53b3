"""Kept for tests/test_avg_pool2d_cl_windows.py, which imports check_parity from here:
the pooling parity harness is cnnext.testing.check_parity."""
from cnnext.testing import check_parity  # noqa: F401
