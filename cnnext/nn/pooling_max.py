import torch

from .. import functional as F


class MaxPool2d(torch.nn.MaxPool2d):
    """Drop-in for :class:`torch.nn.MaxPool2d` computed by cnnext's max_pool2d kernels
    (same constructor, attributes and repr; no parameters or buffers)."""

    def forward(self, input):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class MaxUnpool2d(torch.nn.MaxUnpool2d):
    """Drop-in for :class:`torch.nn.MaxUnpool2d` computed by cnnext's max_unpool2d kernels;
    ``forward(input, indices, output_size=None)`` as torch's."""

    def forward(self, input, indices, output_size=None):
        return F.max_unpool2d(input, indices, self.kernel_size, self.stride, self.padding, output_size)
