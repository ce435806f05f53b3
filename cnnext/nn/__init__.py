"""Drop-in modules: the constructors, parameters, initialisation and state_dict of
their torch.nn namesakes, computing with cnnext's kernels."""
from .conv import Conv2d, ConvTranspose2d
from .fused import ConvBNReLU2d

__all__ = ["Conv2d", "ConvTranspose2d", "ConvBNReLU2d"]
