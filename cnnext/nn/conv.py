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


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    """Drop-in for :class:`torch.nn.ConvTranspose2d` computed by cnnext's kernels.

    Same constructor, parameters (weight: (in_channels, out_channels / groups, kH, kW)),
    initialisation and state_dict as torch.nn.ConvTranspose2d; ``forward(input,
    output_size=None)`` picks the output_padding for ``output_size`` as torch does.
    Only ``padding_mode='zeros'`` exists (torch's constructor rejects the others).
    """

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return F.conv_transpose2d(
            input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )
