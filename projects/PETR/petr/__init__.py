"""PETR for Detectron2.

`petr.layers` (the deformable-attention op) imports without Detectron2. Everything else needs it
and is loaded on first use: `from petr import add_petr_config` also registers the PETR
meta-architecture, the Swin backbone and the datasets this project adds.
"""

__all__ = ["add_petr_config"]


def __getattr__(name):
    if name == "add_petr_config":
        from . import data as _data  # noqa: F401  (registers datasets)
        from . import modeling as _modeling  # noqa: F401  (registers PETR, Swin)
        from .config import add_petr_config

        return add_petr_config
    raise AttributeError(f"module 'petr' has no attribute {name!r}")
