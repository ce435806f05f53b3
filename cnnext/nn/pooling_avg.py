import torch

from .. import functional as F


class AvgPool2d(torch.nn.AvgPool2d):
    """Drop-in for :class:`torch.nn.AvgPool2d` computed by cnnext's avg_pool2d kernels:
    same constructor (kernel_size, stride=None, padding=0, ceil_mode=False,
    count_include_pad=True, divisor_override=None), repr and (empty) state_dict."""

    def forward(self, input):
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)


class AdaptiveAvgPool2d(torch.nn.AdaptiveAvgPool2d):
    """Drop-in for :class:`torch.nn.AdaptiveAvgPool2d` computed by cnnext's kernels:
    same constructor (output_size: int, pair, None entries keep the input's size),
    repr and (empty) state_dict."""

    def forward(self, input):
        return F.adaptive_avg_pool2d(input, self.output_size)
