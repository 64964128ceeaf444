"""PETR's deformable transformer encoder (post-norm, as mmdet's DetrTransformerEncoder with
MultiScaleDeformableAttention), following hikvision-research/opera's PETRTransformer."""

from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn as nn

from .attention import PETRMSDeformAttn
from .common import PostNormLayer, xavier_init_


@dataclass
class EncoderMemory:
    """The flattened multi-level features every later stage reads.

    memory (B, S, C) encoder output; padding_mask (B, S) True on padding; pos (B, S, C) position
    + level embedding; spatial_shapes L (H_l, W_l) pairs and level_start_index L ints, taken
    from the feature maps' shapes and never read back from a tensor (no host sync): Python ints
    in eager mode, symbolic sizes derived from the input's H and W under torch.compile(dynamic)
    and torch.export, so one graph serves every input size; valid_ratios (B, L, 2) as
    (valid W / W_l, valid H / H_l);
    reference_points (B, S, L, 2) normalised (x, y) token centres, already multiplied by the
    valid ratios.
    """

    memory: torch.Tensor
    padding_mask: torch.Tensor
    pos: torch.Tensor
    spatial_shapes: Tuple[Tuple[int, int], ...]
    level_start_index: Tuple[int, ...]
    valid_ratios: torch.Tensor
    reference_points: torch.Tensor


class PETREncoderLayer(PostNormLayer):
    """x = norm1(x + deform_attn(x + pos)); x = norm2(ffn(x))."""

    def __init__(self, dim, num_heads, ffn_dim, dropout, num_levels, num_points):
        super().__init__(dim, ffn_dim, dropout)
        self.self_attn = PETRMSDeformAttn(dim, num_heads, num_levels, num_points, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self, x, pos, reference_points, spatial_shapes, level_start_index, padding_mask, value=None
    ):  # fmt: skip
        """value (B, S, C), default x: the tokens attended to, when the queries x are only some
        of them (each output token depends only on its own query, reference point and value)."""
        x = self.self_attn(
            x, pos, reference_points, x if value is None else value, spatial_shapes,
            level_start_index, padding_mask,
        )  # fmt: skip
        return self.norm2(self.ffn(self.norm1(x)))


def pixel_centres(n, device) -> torch.Tensor:
    """(n,) float32 0.5, 1.5, ..., n - 0.5: the official linspace(0.5, n - 0.5, n), bit for bit
    (its step is exactly 1), written with arange so that a symbolic n stays symbolic."""
    return torch.arange(n, dtype=torch.float32, device=device) + 0.5


def encoder_reference_points(spatial_shapes, valid_ratios):
    """Token centres of every level, normalised by the valid size: (B, S, L, 2) (x, y).
    spatial_shapes: L (H_l, W_l) int (or symbolic int) pairs."""
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        dev = valid_ratios.device
        ref_y, ref_x = torch.meshgrid(pixel_centres(h, dev), pixel_centres(w, dev), indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((ref_x, ref_y), -1))
    ref = torch.cat(refs, 1)
    return ref[:, :, None] * valid_ratios[:, None]


def valid_ratios_of(mask: torch.Tensor) -> torch.Tensor:
    """mask (B, H, W) True on padding -> (B, 2) (valid W / W, valid H / H)."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / H
    valid_w = (~mask[:, 0, :]).sum(1).float() / W
    return torch.stack([valid_w, valid_h], -1)


class PETRTransformerEncoder(nn.Module):
    """Level embedding + flattening + `num_layers` deformable encoder layers."""

    def __init__(
        self, *, dim, num_heads, ffn_dim, dropout, num_layers, num_levels, num_points
    ):  # fmt: skip
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        self.layers = nn.ModuleList(
            PETREncoderLayer(dim, num_heads, ffn_dim, dropout, num_levels, num_points)
            for _ in range(num_layers)
        )
        self._reset_parameters()

    def _reset_parameters(self):
        xavier_init_(self)
        for m in self.modules():
            if isinstance(m, PETRMSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        features: List[torch.Tensor],
        masks: List[torch.Tensor],
        pos: List[torch.Tensor],
    ) -> EncoderMemory:
        """features: L maps (B, C, H_l, W_l); masks: L (B, H_l, W_l) True on padding; pos: L maps
        (B, C, H_l, W_l). Returns the encoded, flattened memory."""
        src, mask_flat, pos_flat, shapes = [], [], [], []
        for lvl, (f, m, p) in enumerate(zip(features, masks, pos)):
            shapes.append((f.shape[-2], f.shape[-1]))  # no int(): it would pin a symbolic size
            src.append(f.flatten(2).transpose(1, 2))  # (B, H*W, C)
            mask_flat.append(m.flatten(1))
            pos_flat.append(p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src, mask_flat, pos_flat = (
            torch.cat(src, 1),
            torch.cat(mask_flat, 1),
            torch.cat(pos_flat, 1),
        )
        spatial_shapes = tuple(shapes)
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        level_start_index = tuple(starts)
        valid_ratios = torch.stack([valid_ratios_of(m) for m in masks], 1)
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        x = src
        for layer in self.layers:
            x = layer(x, pos_flat, reference_points, spatial_shapes, level_start_index, mask_flat)
        return EncoderMemory(
            x, mask_flat, pos_flat, spatial_shapes, level_start_index, valid_ratios,
            reference_points,
        )  # fmt: skip
