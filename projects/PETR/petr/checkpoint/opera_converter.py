"""Convert official PETR checkpoints (hikvision-research/opera, mmdet 2.x) to this project's model.

Input: a file written by mmcv `save_checkpoint` (`{"state_dict", "meta", "optimizer"}`), or
`{"model": sd}`, or a raw state dict; a `module.` prefix (DataParallel) is stripped. Files are
read without running code from them (`petr.utils.compat.torch_load`: mmcv objects in `meta`
become inert placeholders), so an untrusted checkpoint is safe to convert. The
architecture is read off the tensors (`opera_layout.infer_layout`), every official tensor is
renamed by the rule table of `opera_rules` (the Swin backbone by `swin_keys`), checked against the
shape the layout implies, and every tensor of our model must be produced exactly once. BN
`num_batches_tracked` counters are the only tensors dropped.

Output: `{"model": sd, "__author__": "petr-opera-converter", "matching_heuristics": False}`, float
tensors as float32, loadable by Detectron2's `MODEL.WEIGHTS` with no missing or unexpected keys.
"""

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

import torch

from ..utils.compat import torch_load
from .opera_layout import (
    OperaCheckpointError,
    OperaLayout,
    infer_layout,
    matching_config,
)
from .opera_rules import DROPPED, expected_shapes, rule_table

__all__ = [
    "AUTHOR",
    "ConversionReport",
    "OperaCheckpointError",
    "convert_opera_checkpoint",
    "convert_opera_checkpoint_dict",
    "convert_state_dict",
    "infer_official_layout",
    "is_opera_checkpoint",
    "load_opera_state_dict",
    "opera_state_dict",
    "read_checkpoint",
]

AUTHOR = "petr-opera-converter"
# Names only our converted model has; an input with any of them was converted already.
_OUR_NAMES = re.compile(
    r"(backbone\.(stem|res\d)\.|encoder\.layers\.|pose_decoder\.|joint_decoder\.|heatmap_head\.)"
)


@dataclass
class ConversionReport:
    """What a conversion did, for printing. Counts are numbers of tensors."""

    layout: OperaLayout
    num_source: int
    groups: Counter = field(default_factory=Counter)  # our top-level module -> converted tensors
    dropped: List[str] = field(default_factory=list)
    num_elements: int = 0

    def summary(self) -> str:
        config = matching_config(self.layout)
        lines = [
            "Inferred layout:",
            *("  " + line for line in self.layout.describe().splitlines()),
            f"Matching config: {config}"
            if config
            else "Matching config: none of the shipped configs; start from configs/Base-PETR.yaml "
            "with the overrides below",
            "Config overrides for this layout:",
            *("  " + item for item in self.layout.config_overrides()),
        ]
        if self.groups:
            lines.append(
                f"Converted {sum(self.groups.values())} of {self.num_source} tensors "
                f"({self.num_elements:,} elements):"
            )
            lines += [f"  {g:<14} {n}" for g, n in self.groups.items()]
            lines.append(f"  dropped        {len(self.dropped)} (BN num_batches_tracked)")
        return "\n".join(lines)


def read_checkpoint(path: str):
    """The object in the checkpoint file `path`, loaded without running code from it
    (`petr.utils.compat.torch_load`; classes that are not plain data, e.g. mmcv objects in an
    official `meta`, become inert placeholders). Raises OperaCheckpointError naming the file if
    it is missing or is not a PyTorch checkpoint (garbage, truncated)."""
    if not os.path.isfile(path):
        raise OperaCheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch_load(path, placeholders=True)
    except Exception as e:  # torch raises many types for a bad file; all mean "not readable"
        raise OperaCheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from e


def is_opera_checkpoint(ckpt) -> bool:
    """Whether a loaded checkpoint holds an official (mmdet-named) PETR state dict."""
    if not isinstance(ckpt, Mapping) or ckpt.get("__author__") == AUTHOR:
        return False
    sd = ckpt.get("state_dict", ckpt.get("model", ckpt))
    return isinstance(sd, Mapping) and any(
        isinstance(k, str) and k.removeprefix("module.").startswith("bbox_head.") for k in sd
    )


def opera_state_dict(ckpt, path: str) -> Dict[str, torch.Tensor]:
    """The official state dict in a loaded checkpoint (official names, `module.` removed).

    Raises OperaCheckpointError naming `path` if it holds no state dict or was written by this
    converter.
    """
    if isinstance(ckpt, Mapping) and ckpt.get("__author__") == AUTHOR:
        raise OperaCheckpointError(
            f"{path}: already converted by {AUTHOR}; give it to MODEL.WEIGHTS as it is"
        )
    sd = ckpt
    if isinstance(ckpt, Mapping):
        sd = ckpt.get("state_dict", ckpt.get("model", ckpt))
    if not isinstance(sd, Mapping) or not sd:
        raise OperaCheckpointError(
            f"{path}: holds no state dict (expected {{'state_dict': ...}}, {{'model': ...}} or a "
            f"dict of tensors, got {type(sd).__name__})"
        )
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise OperaCheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_opera_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read the official state dict from `path` (`read_checkpoint` + `opera_state_dict`)."""
    return opera_state_dict(read_checkpoint(path), path)


def _rename(key: str, rules: List[Tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in rules:
        m = pattern.fullmatch(key)
        if m:
            return template.format(**m.groupdict())
    return None


def _names(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(f"'{k}'" for k in keys[:limit]) + more


def _refuse_converted(sd: Mapping[str, torch.Tensor]) -> None:
    # A clearer error for our own output than the missing official key it would otherwise hit.
    ours = [k for k in sd if _OUR_NAMES.match(k)]
    if ours:
        raise OperaCheckpointError(
            f"keys {_names(ours, 3)} are already in this project's layout: the checkpoint was "
            "converted before; give it to MODEL.WEIGHTS as it is"
        )


def _convert_swin(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor] | None:
    """Our-name Swin backbone (no prefix) of a Swin checkpoint, None for any other backbone."""
    if "backbone.patch_embed.projection.weight" not in sd:
        return None
    from .swin_keys import convert_opera_swin_backbone  # imports Detectron2: only when needed

    try:
        return convert_opera_swin_backbone(
            {k: v for k, v in sd.items() if k.startswith("backbone.")}
        )
    except ValueError as e:
        raise OperaCheckpointError(f"Swin backbone: {e}") from e


def infer_official_layout(sd: Mapping[str, torch.Tensor]) -> OperaLayout:
    """`infer_layout` of an official state dict, refusing one this converter wrote."""
    _refuse_converted(sd)
    return infer_layout(sd)


def convert_state_dict(
    sd: Mapping[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Official state dict (official names) -> (our state dict, report).

    Raises OperaCheckpointError naming the key for an unknown key, a key the inferred layout does
    not have, a shape that differs from the layout's (both shapes given), or a missing tensor.
    """
    _refuse_converted(sd)
    swin_backbone = _convert_swin(sd)  # swin_keys checks these names and shapes itself
    layout = infer_layout(sd, swin_backbone)
    report = ConversionReport(layout, num_source=len(sd))
    rules = [(re.compile(src), dst) for src, dst in rule_table(layout)]
    expected = expected_shapes(layout)
    dropped = re.compile(DROPPED)

    out: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    unknown = []
    for key, value in sd.items():
        if dropped.fullmatch(key):
            report.dropped.append(key)
            continue
        if swin_backbone is not None and key.startswith("backbone."):
            continue
        name = _rename(key, rules)
        if name is None:
            unknown.append(key)
            continue
        if name not in expected:
            raise OperaCheckpointError(
                f"'{key}' maps to '{name}', which a model of the inferred layout does not have "
                f"({layout.describe().splitlines()[-1]})"
            )
        if name in out:
            raise OperaCheckpointError(f"'{key}' and '{origin[name]}' both map to '{name}'")
        if tuple(value.shape) != expected[name]:
            raise OperaCheckpointError(
                f"'{key}' (-> '{name}') has shape {tuple(value.shape)}, expected {expected[name]} "
                "for the inferred layout"
            )
        out[name], origin[name] = value, key
    if unknown:
        raise OperaCheckpointError(f"unknown official key(s) {_names(unknown)}: no rule maps them")
    missing = expected.keys() - out.keys()
    if missing:
        raise OperaCheckpointError(
            f"the checkpoint lacks tensors for {_names(missing)} (official names unknown: a "
            "layout this converter was not written for)"
        )
    if swin_backbone is not None:
        out.update({f"backbone.{k}": v for k, v in swin_backbone.items()})

    out = {k: v.float() if v.is_floating_point() else v for k, v in sorted(out.items())}
    report.groups = Counter(k.split(".", 1)[0] for k in out)
    report.num_elements = sum(v.numel() for v in out.values())
    return out, report


def convert_opera_checkpoint_dict(ckpt, path: str) -> Tuple[Dict, ConversionReport]:
    """A loaded official checkpoint -> (the checkpoint dict this converter writes, report).
    Both `convert_opera_checkpoint` and `PETRCheckpointer` (MODEL.WEIGHTS) go through here."""
    sd = opera_state_dict(ckpt, path)
    try:
        out, report = convert_state_dict(sd)
    except OperaCheckpointError as e:
        raise OperaCheckpointError(f"{path}: {e}") from e
    return {"model": out, "__author__": AUTHOR, "matching_heuristics": False}, report


def convert_opera_checkpoint(src: str, dst: str | None) -> ConversionReport:
    """Convert the official checkpoint `src` and save it to `dst` (only infer when dst is None)."""
    if dst is None:
        sd = load_opera_state_dict(src)
        try:
            return ConversionReport(infer_official_layout(sd), num_source=len(sd))
        except OperaCheckpointError as e:
            raise OperaCheckpointError(f"{src}: {e}") from e
    converted, report = convert_opera_checkpoint_dict(read_checkpoint(src), src)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    torch.save(converted, dst)
    return report
