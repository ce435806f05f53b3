"""Backend switches of cnnext's kernels (``cnnext.backends.cpu``)."""
from . import cpu  # noqa: F401

__all__ = ["cpu"]
