"""PETR for Detectron2.

`petr.layers` (the deformable-attention op) imports without Detectron2. Everything else needs it
and is loaded on first use: `from petr import add_petr_config` (or `get_petr_cfg`) also
registers the PETR meta-architecture, the Swin backbone and the datasets this project adds.
"""

__all__ = ["add_petr_config", "get_petr_cfg"]


def __getattr__(name):
    if name in __all__:
        from . import config
        from . import data as _data  # noqa: F401  (registers datasets)
        from . import modeling as _modeling  # noqa: F401  (registers PETR, Swin)

        return getattr(config, name)
    raise AttributeError(f"module 'petr' has no attribute {name!r}")
