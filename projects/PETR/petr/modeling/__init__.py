from . import backbone as _backbone  # noqa: F401  (registers the Swin backbone)
from .meta_arch import PETR

__all__ = ["PETR"]
