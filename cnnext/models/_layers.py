"""The layers a network definition asks for, from the chosen backend.

Every network in cnnext.models is written once against a `Layers` object. With
backend="torch" it hands out stock torch.nn modules, with backend="cnnext" cnnext's
own (cnnext.nn), built with the same constructor arguments, so both backends have
the same modules at the same places and therefore the same state_dict keys.

Linear, Dropout, Flatten, ReLU and stand-alone BatchNorm2d (DenseNet's
pre-activation) stay stock in both backends.
"""
from torch import nn

BACKENDS = ("cnnext", "torch")


class ConvBN(nn.Sequential):
    """Stock Conv2d -> BatchNorm2d (-> ReLU) as children 0, 1 (2): the modules, and so the
    state_dict keys (0.weight, 1.running_mean, ...), of cnnext.nn.ConvBNReLU2d."""

    def __init__(self, conv, bn, relu=True):
        super().__init__(conv, bn, *([nn.ReLU()] if relu else []))


class Layers:
    def __init__(self, backend):
        if backend not in BACKENDS:
            raise ValueError(f"expected backend to be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        if backend == "cnnext":
            from .. import nn as cnn

            self._nn = cnn
        else:
            self._nn = nn

    def conv(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        return self._nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)

    def conv_relu(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        """A convolution followed by ReLU, as two modules (keys `<i>.weight`, `<i>.bias`)."""
        return [self.conv(in_channels, out_channels, kernel_size, stride, padding), nn.ReLU()]

    def conv_bn(self, in_channels, out_channels, kernel_size, stride=1, padding=0, relu=True):
        """Conv2d -> BatchNorm2d (-> ReLU): cnnext's fused op, or the stock modules in a
        ConvBN container with the same state_dict keys."""
        if self.backend == "cnnext":
            return self._nn.ConvBNReLU2d(in_channels, out_channels, kernel_size, stride=stride,
                                         padding=padding, relu=relu)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        return ConvBN(conv, nn.BatchNorm2d(out_channels), relu=relu)

    def max_pool(self, kernel_size, stride=None, padding=0):
        return self._nn.MaxPool2d(kernel_size, stride=stride, padding=padding)

    def avg_pool(self, kernel_size, stride=None, padding=0):
        return self._nn.AvgPool2d(kernel_size, stride=stride, padding=padding)

    def global_avg_pool(self):
        return self._nn.AdaptiveAvgPool2d((1, 1))

