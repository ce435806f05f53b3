"""The classic CNNs on cnnext's layers, each provably equal to its stock torch.nn twin.

    net = cnnext.models.resnet18(in_channels=1, num_classes=10, backend="cnnext")
    ref = cnnext.models.resnet18(backend="torch")   # same state_dict keys
    net.load_state_dict(ref.state_dict())

MODELS maps each name to its builder and the input size (H = W) it is meant for.
"""
from dataclasses import dataclass
from typing import Callable

from ._layers import BACKENDS, ConvBN, Layers
from .nets import (DenseBlock, Inception, Residual, alexnet, densenet, googlenet, lenet, nin, resnet18, vgg,
                   vgg11)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable
    input_size: int  # height = width of the input the architecture is laid out for
    has_batchnorm: bool
    has_dropout: bool

    def input_shape(self, batch=1, in_channels=1):
        return (batch, in_channels, self.input_size, self.input_size)


MODELS = {
    spec.name: spec
    for spec in (
        ModelSpec("lenet", lenet, 32, False, False),
        ModelSpec("alexnet", alexnet, 224, False, True),
        ModelSpec("vgg11", vgg11, 224, False, True),
        ModelSpec("nin", nin, 224, False, True),
        ModelSpec("googlenet", googlenet, 96, False, False),
        ModelSpec("resnet18", resnet18, 96, True, False),
        ModelSpec("densenet", densenet, 96, True, False),
    )
}

__all__ = ["MODELS", "ModelSpec", "BACKENDS", "Layers", "ConvBN", "Inception", "Residual", "DenseBlock",
           "lenet", "alexnet", "vgg", "vgg11", "nin", "googlenet", "resnet18", "densenet"]
