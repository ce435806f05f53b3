"""ConvBNReLU2d: Conv2d -> BatchNorm2d (-> ReLU) computed by one cnnext op."""
import torch
from torch import nn

from .. import functional as F
from .conv import Conv2d


class ConvBNReLU2d(nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU (``relu=False``: Conv2d -> BatchNorm2d) as one fused op,
    in training (batch statistics, running statistics updated as BatchNorm2d does) and in
    inference (batch norm folded into the convolution, ReLU applied as the output is written).

    It is an ``nn.Sequential`` of its parts, ``0``: the Conv2d (``.conv``), ``1``: the
    BatchNorm2d (``.bn``) and ``2``: an ``nn.ReLU`` when ``relu``, so its parameters,
    buffers and state_dict keys are exactly those of ``nn.Sequential(nn.Conv2d(...),
    nn.BatchNorm2d(...), nn.ReLU())`` (``0.weight``, ``0.bias``, ``1.weight``, ``1.bias``,
    ``1.running_mean``, ``1.running_var``, ``1.num_batches_tracked``): checkpoints load
    both ways. Only the forward pass differs: it does not call the parts, it runs
    cnnext.functional.conv_bn_relu2d on their parameters. Train/eval mode is the batch
    norm's (``.train()`` / ``.eval()`` set it, as for any Sequential).

    Constructor: Conv2d's arguments (``padding_mode`` 'zeros', 'reflect', 'replicate',
    'circular'; ``padding`` int, pair, 'same' or 'valid'), then BatchNorm2d's (``eps``,
    ``momentum`` (None: cumulative average), ``affine``, ``track_running_stats``), then
    ``relu``; ``device`` and ``dtype``. The parts are initialised as those modules are.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 relu=True, device=None, dtype=None):
        kw = dict(device=device, dtype=dtype)
        conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                      **kw)
        bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, **kw)
        super().__init__(conv, bn, *([nn.ReLU()] if relu else []))
        self.relu = bool(relu)

    @classmethod
    def from_modules(cls, conv, bn, relu=True):
        """A ConvBNReLU2d holding ``conv`` (an nn.Conv2d, stock or cnnext) and ``bn`` (an
        nn.BatchNorm2d) themselves: the same Parameter and buffer objects, so optimizers
        built on them keep working, and the modules' later changes are seen by both."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"ConvBNReLU2d.from_modules: expected conv to be an nn.Conv2d, got {type(conv).__name__}")
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"ConvBNReLU2d.from_modules: expected bn to be an nn.BatchNorm2d, got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"ConvBNReLU2d.from_modules: expected bn.num_features to equal conv.out_channels = "
                             f"{conv.out_channels}, got {bn.num_features}")
        self = cls.__new__(cls)
        nn.Sequential.__init__(self, conv, bn, *([nn.ReLU()] if relu else []))
        self.relu = bool(relu)
        self.training = bn.training
        return self

    @property
    def conv(self):
        return self[0]

    @property
    def bn(self):
        return self[1]

    def forward(self, input):
        conv, bn = self[0], self[1]
        if conv.padding_mode != "zeros":
            input = torch.nn.functional.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        else:
            padding = conv.padding
        # BatchNorm2d.forward's bookkeeping, as torch.nn.modules.batchnorm._BatchNorm does it.
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        training = bn.training or (bn.running_mean is None and bn.running_var is None)
        use_running = not bn.training or bn.track_running_stats
        return F.conv_bn_relu2d(
            input, conv.weight, conv.bias, bn.weight, bn.bias,
            bn.running_mean if use_running else None, bn.running_var if use_running else None,
            training, factor, bn.eps, conv.stride, padding, conv.dilation, conv.groups, self.relu)
