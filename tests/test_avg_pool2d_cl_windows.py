"""channels_last average pooling through the streamed window loop of
csrc/cpu/avg_pool2d_kernels.h (windows of 1-4 pixels: one pixel per pass summed into the
output, the last one added while scaling; windows over 16 pixels: four per pass into a
buffer, the last one or two added at the store), with the
window sizes that select each of its branches (1, 2, 3, 4, 17-21 and 49 pixels, and the
edge windows ceil_mode / padding shrink), channel counts around the vector width, float32
and float64, against torch (avg_pool_testing.check_parity: output and gradient). Each case
names the window loops it reaches (csrc/cpu/avg_pool2d.cpp's path counters), which the test
asserts ran (one channel: the tensor is NCHW-contiguous too and takes the NCHW loops)."""
import pytest
import torch
import torch.nn.functional as F

from avg_pool_testing import check_parity
from cnnext._paths import expect_path
from cnnext.functional import avg_pool2d


CASES = [
    # kernel, stride, padding, ceil_mode, count_include_pad, H, W, window loops
    ((1, 2), (1, 2), 0, False, True, 5, 8, ("small",)),
    ((1, 3), (1, 2), 0, True, False, 5, 8, ("small",)),
    ((2, 2), 2, 0, False, True, 8, 8, ("small",)),
    ((2, 2), 2, 1, True, False, 7, 9, ("small",)),
    ((3, 6), (2, 3), (1, 0), True, False, 9, 20, ("large", "register_blocks")),
    ((1, 17), 1, 0, False, True, 3, 19, ("large",)),
    ((4, 5), 2, 2, True, False, 10, 11, ("large", "register_blocks")),
    ((3, 7), (1, 4), (1, 3), False, True, 6, 15, ("large", "register_blocks")),
    ((7, 7), 7, 0, False, True, 7, 7, ("large",)),
]
LOOP_PATH = {"small": "avg_pool2d.fwd.cl_small_windows", "large": "avg_pool2d.fwd.cl_large_windows",
             "register_blocks": "avg_pool2d.fwd.cl_register_blocks"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 7, 8, 17, 64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_channels_last_windows(dtype, channels, case):
    k, s, p, ceil_mode, cip, h, w, loops = CASES[case]
    kw = dict(kernel_size=k, stride=s, padding=p, ceil_mode=ceil_mode, count_include_pad=cip)
    paths = [LOOP_PATH[name] for name in loops] if channels > 1 else ["avg_pool2d.fwd.nchw"]
    with expect_path(*paths):
        check_parity(lambda t: avg_pool2d(t, **kw), lambda t: F.avg_pool2d(t, **kw), (2, channels, h, w),
                     dtype, "channels_last", "channels_last", seed=case * 100 + channels)
