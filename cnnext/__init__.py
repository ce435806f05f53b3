"""cnnext: hand-written CNN kernels for PyTorch.

Importing the package loads the compiled extension, which registers the ops under
``torch.ops.cnnext`` with their autograd formulas (C++, Autograd key), then the fake
(meta) kernels.
"""
import torch

from . import _C  # noqa: F401  (registers torch.ops.cnnext.*)
from . import _meta, _autograd  # noqa: F401  (fake kernels; _autograd documents the algebra)
from . import _avg_pool  # noqa: F401  (avg_pool2d, adaptive_avg_pool2d: fake kernels)
from . import _max_pool  # noqa: F401  (max pooling: fake kernels)
from . import _conv_bn_relu  # noqa: F401  (conv_bn_relu2d: fake kernels)
from . import _vmap  # noqa: F401  (batching rules for torch.vmap and torch.func)
from . import functional, nn
from . import backends  # noqa: F401  (cnnext.backends.cpu: the Winograd switch)
from . import models  # noqa: E402  (after nn: the networks are built from it)
from ._convert import ConvertWarning, convert, revert
from .fuse import FuseReport, FuseWarning, fuse
from ._enable import enable
from .summary import summary

__version__ = "0.1.0"
__all__ = ["build_info", "convert", "enable", "functional", "fuse", "models", "nn", "revert", "summary",
           "ConvertWarning", "FuseReport", "FuseWarning", "__version__"]


def build_info():
    """What this build of cnnext was compiled with.

    Returns a dict: ``cuda`` (whether CUDA kernels were compiled), ``cuda_version``,
    ``torch_version`` (the torch it was compiled against), ``compiler``, ``cxx11_abi``,
    and ``torch_runtime`` (the torch imported now).
    """
    info = dict(_C.build_info())
    info["torch_runtime"] = torch.__version__
    return info
