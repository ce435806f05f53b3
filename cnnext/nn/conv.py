import torch

from .. import functional as F


class Conv2d(torch.nn.Conv2d):
    """Drop-in for :class:`torch.nn.Conv2d` computed by cnnext's conv2d kernels.

    Same constructor (``padding_mode`` 'zeros', 'reflect', 'replicate', 'circular';
    ``padding`` int, pair, 'same' or 'valid'; ``device``, ``dtype``), same parameters,
    initialisation and state_dict, so weights load both ways with torch.nn.Conv2d.
    Non-zero padding modes pad the input with torch.nn.functional.pad, as torch.nn.Conv2d does.
    """

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
