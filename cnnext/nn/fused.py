"""ConvBNReLU2d: Conv2d -> BatchNorm2d (-> ReLU) computed by one cnnext op."""
import torch
from torch import nn

from .. import functional as F
from .conv import Conv2d
from .sync_bn import SyncBatchNorm, bn_call_arguments, sync_batch_norm, sync_group


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
    cnnext.functional.conv_bn_relu2d on their parameters (:func:`conv_bn_forward`; when the
    batch norm part is a synchronised one, cnnext.nn.SyncBatchNorm or nn.SyncBatchNorm, its
    statistics in training are those of the whole process group). Train/eval mode is the batch
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
        return conv_bn_forward(self[0], self[1], self.relu, input)


def is_synchronised(bn):
    """Whether a batch norm module synchronises its batch statistics across a process group
    (torch.nn.SyncBatchNorm, cnnext.nn.SyncBatchNorm, or a FusedBatchNorm2d that was one)."""
    kind = bn.__dict__.get("_unfused_class", type(bn)) if isinstance(bn, FusedBatchNorm2d) else type(bn)
    return issubclass(kind, (nn.SyncBatchNorm, SyncBatchNorm))


def conv_bn_forward(conv, bn, relu, input):
    """relu(bn(conv(input))) (without relu when relu is False) on the modules' parameters and
    buffers, with the batch norm's bookkeeping (num_batches_tracked, momentum=None) done as
    BatchNorm2d.forward does it. One cnnext op, or, when the batch norm is synchronised and
    a process group of more than one rank is there in training, cnnext's conv2d followed by
    the synchronised batch norm (statistics all_reduced across the group)."""
    if conv.padding_mode != "zeros":
        input = torch.nn.functional.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    training, factor, running_mean, running_var = bn_call_arguments(bn)
    if bn.training and is_synchronised(bn):
        group = sync_group(getattr(bn, "process_group", None))
        if group is not None:
            y = F.conv2d(input, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)
            y = sync_batch_norm(y, running_mean, running_var, bn.weight, bn.bias, True, factor, bn.eps, group)
            return torch.relu(y) if relu else y
    return F.conv_bn_relu2d(
        input, conv.weight, conv.bias, bn.weight, bn.bias, running_mean, running_var,
        training, factor, bn.eps, conv.stride, padding, conv.dilation, conv.groups, relu)


class FusedConv2d(Conv2d):
    """A Conv2d fused by :func:`cnnext.fuse` with the batch norm (and ReLU) its output
    feeds: it computes relu(bn(conv(x))) as one cnnext op (:func:`conv_bn_forward`).

    It keeps the Conv2d's place, parameters and state_dict keys; the batch norm keeps its
    own place and keys as a :class:`FusedBatchNorm2d` (whose forward passes its input
    through), so ``model.train()``/``eval()``, ``.to()``, optimizers and checkpoints see
    the model as before. The batch norm is held as ``fused_bn`` (not registered here);
    ``fused_relu`` says whether the ReLU is applied. :func:`cnnext.revert` restores the
    original classes.
    """

    @property
    def fused_bn(self):
        return self.__dict__["_fused_bn"]

    @property
    def fused_relu(self):
        return self.__dict__["_fused_relu"]

    def extra_repr(self):
        return super().extra_repr() + f", fused with batch norm{' + ReLU' if self.fused_relu else ''}"

    def forward(self, input):
        return conv_bn_forward(self, self.fused_bn, self.fused_relu, input)


class FusedBatchNorm2d(nn.BatchNorm2d):
    """The batch norm of a :class:`FusedConv2d`, in its own place: same parameters, buffers,
    state_dict keys and train/eval mode; the FusedConv2d before it computes it, so its
    forward returns its input."""

    def forward(self, input):
        return input


class FusedReLU(nn.ReLU):
    """A ReLU that a :class:`FusedConv2d` applies: its forward returns its input."""

    def forward(self, input):
        return input
