"""Swin state-dict conversion into `PETRSwinTransformer` names (modeling/backbone/swin.py): those of
Detectron2's `SwinTransformer`, which are the official Microsoft release's.

Two sources:
* the backbone of an official PETR Swin checkpoint (hikvision-research/opera, mmdet naming, keys
  `backbone.*`): renamed, and mmdet's PatchMerging channel order converted back to Microsoft's;
* the official Microsoft ImageNet release (`{'model': {...}}`): classifier `head.*`, final
  `norm.*` and the precomputed `attn_mask` buffers dropped.

Every source key must match a known pattern (else ValueError naming it), and the result must be
exactly the state dict of a `PETRSwinTransformer` whose architecture is read off the tensors
(embed dim, depths, heads, window, MLP ratio): each shape is checked against that module, built on
the meta device. Returned keys have no model prefix; the caller adds `backbone.`.
"""

import math
import re
from typing import Dict, List, Mapping, Tuple

import torch

from ..modeling.backbone.swin import PETRSwinTransformer, relative_position_index

__all__ = ["convert_opera_swin_backbone", "convert_microsoft_swin", "swin_arch_from_state_dict"]

_BLOCK = r"stages\.(\d+)\.blocks\.(\d+)\."
# mmdet (without "backbone.") -> ours, matched with re.fullmatch.
_OPERA_RULES = [
    (r"patch_embed\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"patch_embed\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
    (_BLOCK + r"(norm1|norm2)\.(weight|bias)", r"layers.\1.blocks.\2.\3.\4"),
    (_BLOCK + r"attn\.w_msa\.(qkv|proj)\.(weight|bias)", r"layers.\1.blocks.\2.attn.\3.\4"),
    (
        _BLOCK + r"attn\.w_msa\.(relative_position_bias_table|relative_position_index)",
        r"layers.\1.blocks.\2.attn.\3",
    ),
    (_BLOCK + r"ffn\.layers\.0\.0\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc1.\3"),
    (_BLOCK + r"ffn\.layers\.1\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc2.\3"),
    (r"stages\.(\d+)\.downsample\.norm\.(weight|bias)", r"layers.\1.downsample.norm.\2"),
    (r"stages\.(\d+)\.downsample\.reduction\.weight", r"layers.\1.downsample.reduction.weight"),
    (r"norm(\d+)\.(weight|bias)", r"norm\1.\2"),
]
# Microsoft names that are already ours, and the ones an ImageNet checkpoint has but we drop.
_MS_KEEP = [
    r"patch_embed\.(proj|norm)\.(weight|bias)",
    r"layers\.\d+\.blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
    r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_(bias_table|index)",
    r"layers\.\d+\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)",
]
_MS_DROP = [r"head\.(weight|bias)", r"norm\.(weight|bias)", r"layers\.\d+\.blocks\.\d+\.attn_mask"]
_OUT_NORM = re.compile(r"norm(\d+)\.(weight|bias)")
# mmdet's PatchMerging unfolds 2x2 neighbours as (dy, dx) = (0,0), (0,1), (1,0), (1,1), interleaved
# per channel (index c*4 + p); Microsoft concatenates (0,0), (1,0), (0,1), (1,1) blocks (q*C + c).
# This permutation maps Microsoft's q to mmdet's p and is its own inverse.
_MERGE_PERM = [0, 2, 1, 3]


def _require_tensor(key: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{key}: expected a tensor, got {type(value).__name__}")


def _unfold_to_concat(key: str, t: torch.Tensor) -> torch.Tensor:
    """Reorder the 4C input channels of a PatchMerging norm (4C,) or reduction (out, 4C)."""
    if t.dim() not in (1, 2) or t.shape[-1] % 4 != 0:
        raise ValueError(f"{key}: expected (4C,) or (out, 4C), got {tuple(t.shape)}")
    c = t.shape[-1] // 4
    if t.dim() == 1:
        return t.reshape(c, 4).T[_MERGE_PERM].reshape(4 * c)
    return t.reshape(t.shape[0], c, 4).transpose(1, 2)[:, _MERGE_PERM, :].reshape(t.shape[0], -1)


def convert_opera_swin_backbone(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Backbone part of an official PETR Swin checkpoint (keys `backbone.*`) -> our names.

    Raises ValueError naming the key for a key outside `backbone.`, an unknown key, a shape that
    does not fit the architecture the tensors describe, or a missing tensor.
    """
    out, origin = {}, {}
    for key, value in state_dict.items():
        if not key.startswith("backbone."):
            raise ValueError(f"{key}: not a backbone key (pass only the `backbone.*` entries)")
        name = key[len("backbone.") :]
        for pattern, repl in _OPERA_RULES:
            if re.fullmatch(pattern, name):
                new = re.sub(f"^{pattern}$", repl, name)
                break
        else:
            raise ValueError(f"{key}: unknown key for an mmdet Swin backbone")
        _require_tensor(key, value)
        if ".downsample." in new:
            value = _unfold_to_concat(key, value)
        out[new], origin[new] = value, key
    out_stages = sorted({int(m.group(1)) for k in out if (m := _OUT_NORM.fullmatch(k))})
    if not out_stages:
        raise ValueError("mmdet Swin backbone has no output norms `backbone.norm{i}.*`")
    _check_against_module(out, origin, out_stages, with_out_norms=True)
    return out


def convert_microsoft_swin(checkpoint: Mapping) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Official Microsoft Swin release (`{'model': sd}` or `sd`) -> (our state dict, dropped keys).

    The result has no per-output norms `norm{s}.*`: ImageNet training has none (they keep their
    initialisation when loaded). Raises ValueError naming the key for unknown keys or bad shapes.
    """
    sd = checkpoint["model"] if "model" in checkpoint else checkpoint
    out, origin, dropped = {}, {}, []
    for key, value in sd.items():
        if any(re.fullmatch(p, key) for p in _MS_DROP):
            dropped.append(key)
        elif any(re.fullmatch(p, key) for p in _MS_KEEP):
            _require_tensor(key, value)
            out[key], origin[key] = value, key
        else:
            raise ValueError(f"{key}: unknown key for a Microsoft Swin (V1) checkpoint")
    _check_against_module(out, origin, out_stages=None, with_out_norms=False)
    return out, dropped


def swin_arch_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
    """`PETRSwinTransformer` constructor arguments implied by a state dict in our names."""

    def get(key):
        if key not in sd:
            raise ValueError(f"Swin state dict lacks {key}")
        return sd[key]

    embed_dim, in_chans, ph, pw = get("patch_embed.proj.weight").shape
    if ph != pw:
        raise ValueError(f"patch_embed.proj.weight: non-square patch {ph}x{pw}")
    blocks = sorted({tuple(map(int, k.split(".")[1:4:2])) for k in sd if ".blocks." in k})
    num_stages = 1 + max((s for s, _ in blocks), default=-1)
    depths = [1 + max((b for s2, b in blocks if s2 == s), default=-1) for s in range(num_stages)]
    if num_stages == 0 or 0 in depths:
        raise ValueError(f"Swin state dict has stages/blocks {blocks}: a stage is missing")
    table = [
        get(f"layers.{s}.blocks.0.attn.relative_position_bias_table") for s in range(num_stages)
    ]
    side = math.isqrt(table[0].shape[0])
    if side * side != table[0].shape[0] or side % 2 == 0:
        raise ValueError(f"relative_position_bias_table has {table[0].shape[0]} rows, not (2w-1)^2")
    return dict(
        patch_size=ph,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=[t.shape[1] for t in table],
        window_size=(side + 1) // 2,
        mlp_ratio=get("layers.0.blocks.0.mlp.fc1.weight").shape[0] / embed_dim,
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in sd,
        patch_norm="patch_embed.norm.weight" in sd,
    )


def _check_against_module(sd, origin, out_stages, with_out_norms: bool) -> None:
    """Check `sd` (in place: fills a missing relative_position_index) against the module."""
    arch = swin_arch_from_state_dict(sd)
    if out_stages is None:
        out_stages = [len(arch["depths"]) - 1]
    with torch.device("meta"):
        ref = PETRSwinTransformer(**arch, out_features=[f"res{s + 2}" for s in out_stages])
    expected = {
        k: v for k, v in ref.state_dict().items() if with_out_norms or not _OUT_NORM.fullmatch(k)
    }
    index = relative_position_index(arch["window_size"])
    for key, value in sd.items():
        src = origin[key]
        if key not in expected:
            raise ValueError(f"{src}: no counterpart `{key}` in a Swin with {arch}")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{src}: shape {tuple(value.shape)}, expected {tuple(expected[key].shape)} "
                f"for a Swin with {arch}"
            )
        if key.endswith("relative_position_index") and not torch.equal(value.long(), index):
            raise ValueError(f"{src}: differs from the standard relative position index")
    missing = sorted(expected.keys() - sd.keys())
    lacking = [k for k in missing if not k.endswith("relative_position_index")]
    if lacking:
        raise ValueError(f"Swin state dict lacks {lacking[:5]} ({len(lacking)} in all; {arch})")
    for key in missing:
        sd[key] = index.clone()  # a deterministic buffer: some releases omit it
