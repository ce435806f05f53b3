"""Drop-in modules: the constructors, parameters, initialisation and state_dict of
their torch.nn namesakes, computing with cnnext's kernels."""
from .conv import Conv2d, ConvTranspose2d
from .fused import ConvBNReLU2d, FusedBatchNorm2d, FusedConv2d, FusedReLU
from .sync_bn import SyncBatchNorm
from .pooling_avg import AdaptiveAvgPool2d, AvgPool2d
from .pooling_max import MaxPool2d, MaxUnpool2d

__all__ = ["Conv2d", "ConvTranspose2d", "MaxPool2d", "MaxUnpool2d", "AvgPool2d", "AdaptiveAvgPool2d",
           "ConvBNReLU2d", "FusedConv2d", "FusedBatchNorm2d", "FusedReLU", "SyncBatchNorm"]
