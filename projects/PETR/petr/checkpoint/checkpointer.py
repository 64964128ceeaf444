"""`PETRCheckpointer`: Detectron2's DetectionCheckpointer for every file MODEL.WEIGHTS may name.

On top of DetectionCheckpointer:
- files load without running code from them (`petr.utils.compat.torch_load`, weights_only on
  every torch), so an untrusted checkpoint cannot execute anything;
- a raw official checkpoint (hikvision-research/opera) is recognised by its names, converted in
  memory exactly as tools/convert_opera_checkpoint.py converts it, and the layout is logged;
- a missing, truncated or garbage file raises `CheckpointError` naming it;
- a checkpoint that fills less than half of the model's parameter elements raises, naming the
  file and the model configuration and listing what is missing, unless partial loading was asked
  for (MODEL.PETR.ALLOW_PARTIAL_WEIGHTS). ImageNet backbone files fill the backbone (R50: 54% of
  PETR-R50, Swin-L: 91% of PETR-Swin-L) and pass.
"""

import logging
import os
import re
from collections import Counter

from detectron2.checkpoint import DetectionCheckpointer

from .opera_converter import (
    OperaCheckpointError,
    convert_opera_checkpoint_dict,
    is_opera_checkpoint,
    read_checkpoint,
)

__all__ = ["CheckpointError", "PETRCheckpointer", "describe_model_config"]

_MIN_FILLED = 0.5  # share of the model's parameter elements a checkpoint must fill


class CheckpointError(ValueError):
    """MODEL.WEIGHTS names a file that cannot be (fully enough) loaded; the message says why."""


def describe_model_config(cfg, config_file=None) -> str:
    """A one-line description of the model a config builds, for error messages."""
    parts = [f"config {config_file}"] if config_file else []
    parts.append(f"MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME}")
    if "resnet" in cfg.MODEL.BACKBONE.NAME:
        parts.append(f"MODEL.RESNETS.DEPTH {cfg.MODEL.RESNETS.DEPTH}")
    p = cfg.MODEL.PETR
    parts.append(f"MODEL.PETR.HIDDEN_DIM {p.HIDDEN_DIM}")
    return ", ".join(parts)


def _summarise(keys, limit=12) -> str:
    """Missing keys grouped by pattern (indices as '*'), the largest groups first."""
    counts = Counter(re.sub(r"\.\d+(?=\.)", ".*", k) for k in keys)
    # Ties by name, so the message does not depend on the order of `keys` (often a set).
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    items = [f"{k} ({n})" if n > 1 else k for k, n in top]
    more = f", and {len(counts) - limit} more patterns" if len(counts) > limit else ""
    return ", ".join(items) + more


class PETRCheckpointer(DetectionCheckpointer):
    def __init__(self, model, save_dir="", *, allow_partial=False, model_description="", **kw):
        """`allow_partial`: load a checkpoint that fills less than half of the model without
        error. `model_description`: names the config in errors (`describe_model_config`)."""
        super().__init__(model, save_dir, **kw)
        self.allow_partial = allow_partial
        self.model_description = model_description
        self._path = None

    @classmethod
    def from_config(cls, cfg, model, save_dir="", config_file=None, **checkpointables):
        return cls(
            model,
            save_dir,
            allow_partial=cfg.MODEL.PETR.ALLOW_PARTIAL_WEIGHTS,
            model_description=describe_model_config(cfg, config_file),
            **checkpointables,
        )

    def load(self, path, *args, **kwargs):
        if path:
            local = path if os.path.isfile(path) else self.path_manager.get_local_path(path)
            if not os.path.isfile(local):
                raise CheckpointError(f"Checkpoint {path}: no such file")
        self._path = path
        return super().load(path, *args, **kwargs)

    def _torch_load(self, f):
        try:
            loaded = read_checkpoint(f)
        except OperaCheckpointError as e:
            raise CheckpointError(f"{e}; it is not a checkpoint this project can load") from e
        if not is_opera_checkpoint(loaded):
            return loaded
        try:
            converted, report = convert_opera_checkpoint_dict(loaded, f)
        except OperaCheckpointError as e:
            raise CheckpointError(str(e)) from e
        layout = report.layout.describe().replace("\n", "; ")
        self.logger.info(
            f"{f} is an official opera PETR checkpoint ({layout}); converted it in memory "
            f"({sum(report.groups.values())} tensors), as tools/convert_opera_checkpoint.py does"
        )
        return converted

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        self._check_filled(incompatible)
        return incompatible

    def _check_filled(self, incompatible):
        model_sd = self.model.state_dict()
        unfilled = set(incompatible.missing_keys) | {k for k, *_ in incompatible.incorrect_shapes}
        unfilled &= model_sd.keys()
        total = sum(v.numel() for v in model_sd.values())
        missing = sum(model_sd[k].numel() for k in unfilled)
        if total == 0 or (total - missing) / total >= _MIN_FILLED:
            return
        message = (
            f"Checkpoint {self._path} fills only {total - missing:,} of the {total:,} parameter "
            f"elements of the model ({self.model_description or 'this config'}); "
            f"{len(unfilled)} of {len(model_sd)} tensors are not in it or have another shape: "
            f"{_summarise(unfilled)}"
        )
        if not self.allow_partial:
            raise CheckpointError(
                message + ". It was probably written for another model; set "
                "MODEL.PETR.ALLOW_PARTIAL_WEIGHTS True to load it anyway"
            )
        logging.getLogger(__name__).warning(message + " (MODEL.PETR.ALLOW_PARTIAL_WEIGHTS True)")
