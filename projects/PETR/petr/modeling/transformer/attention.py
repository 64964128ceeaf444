"""Deformable attention modules of PETR.

`PETRMSDeformAttn` is Deformable DETR's multi-scale deformable attention (mmcv
MultiScaleDeformableAttention) and `PETRPoseDeformAttn` is the official PETR pose attention
(opera MultiScaleDeformablePoseAttention): one sampling point per keypoint, anchored at that
keypoint, offsets scaled by the extent of the pose. Both follow hikvision-research/opera.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from petr.layers import ms_deform_attn

from .common import level_sizes_wh


def _deform_attn_fp32(value, spatial_shapes, level_start_index, locations, weights):
    """The op in float32 whatever autocast did to its inputs: under autocast the projections give
    fp16/bf16 values while the locations stay fp32, and low-precision sampling locations would
    cost up to a pixel on large maps (as Mask2Former does)."""
    with torch.autocast(value.device.type, enabled=False):
        return ms_deform_attn(
            value.float(),
            spatial_shapes,
            level_start_index,
            locations.float(),
            weights.float(),
        )


class _DeformAttnBase(nn.Module):
    """Shared projections: value/output projections, offsets and attention-weight predictors."""

    def __init__(self, embed_dim, num_heads, num_levels, num_points, dropout):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.constant_(proj.bias, 0.0)

    def project_value(self, value: torch.Tensor, padding_mask: torch.Tensor | None):
        """value (B, S, C) -> (B, S, M, C / M), padded tokens zeroed."""
        v = self.value_proj(value)
        if padding_mask is not None:
            # in place: a fresh Linear output; the mask expanded for onnxruntime's Where, which
            # is slow on a broadcast of 1 element (see sampling_locations)
            v = v.masked_fill_(padding_mask[..., None].expand_as(v), 0.0)
        return v.view(v.shape[0], v.shape[1], self.num_heads, -1)

    def offsets_and_weights(self, query: torch.Tensor):
        """query (B, Q, C) -> offsets (B, Q, M, L, P, 2), weights (B, Q, M, L, P) (softmaxed)."""
        B, Q, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, M, L * P)
        return offsets, F.softmax(weights, -1).view(B, Q, M, L, P)

    def _locations_and_weights(self, query, query_pos, reference_points, spatial_shapes):
        """Sampling locations (B, Q, M, L, P, 2) and softmaxed weights (B, Q, M, L, P) for the
        queries (plus position, when given) around their reference points."""
        q = query if query_pos is None else query + query_pos
        offsets, weights = self.offsets_and_weights(q)
        return self.sampling_locations(offsets, reference_points, spatial_shapes), weights

    def attend(self, value, spatial_shapes, level_start_index, locations, weights):
        out = _deform_attn_fp32(value, spatial_shapes, level_start_index, locations, weights)
        return self.dropout(self.output_proj(out))

    def forward(
        self,
        query,
        query_pos,
        reference_points,
        value,
        spatial_shapes,
        level_start_index,
        padding_mask=None,
    ):
        """query (B, Q, C); query_pos (B, Q, C) or None; reference_points (B, Q, L, 2)
        for PETRMSDeformAttn, (B, Q, L, 2K) for PETRPoseDeformAttn, normalised;
        value (B, S, C) not yet projected; padding_mask (B, S) True on padding.
        Returns query + dropout(attention) (B, Q, C)."""
        locations, weights = self._locations_and_weights(
            query, query_pos, reference_points, spatial_shapes
        )
        v = self.project_value(value, padding_mask)
        # the residual add writes into the fresh attention output
        return self.attend(v, spatial_shapes, level_start_index, locations, weights).add_(query)

    def forward_grouped(
        self,
        query,
        query_pos,
        reference_points,
        value,
        spatial_shapes,
        level_start_index,
        counts,
    ):
        """Deformable attention for many small query sets that share their image's value.

        query, query_pos (N, K, C): N instances of K queries each, ordered by image;
        reference_points (N, K, L, 2) normalised; value (B, S, M, C / M) already projected by
        `project_value`; counts: list of B ints, the instances of each image (sum N), or None
        when every image has N / B instances (inference: one op call for the whole batch, and
        no list whose length is the batch size, so the batch may be symbolic).
        Equivalent to running forward() with value repeated per instance, as the official joint
        decoder does, without materialising an (N, S, C) copy of the memory.
        """
        N, K, C = query.shape
        locations, weights = self._locations_and_weights(
            query, query_pos, reference_points, spatial_shapes
        )
        if counts is None:
            B = value.shape[0]
            # (N, K, M, L, P, 2) -> (B, N / B * K, M, L, P, 2): each image's instances become
            # its queries; queries are independent, so this equals the per-image calls
            out = _deform_attn_fp32(
                value,
                spatial_shapes,
                level_start_index,
                locations.reshape(B, -1, *locations.shape[2:]),
                weights.reshape(B, -1, *weights.shape[2:]),
            )
            out = out.view(N, K, C)
        else:
            outs = []
            for b, (locs, w) in enumerate(zip(locations.split(counts), weights.split(counts))):
                if locs.shape[0] == 0:
                    continue
                # (n_b, K, M, L, P, 2) -> (1, n_b * K, M, L, P, 2): instances become queries
                out = _deform_attn_fp32(
                    value[b : b + 1],
                    spatial_shapes,
                    level_start_index,
                    locs.flatten(0, 1)[None],
                    w.flatten(0, 1)[None],
                )
                outs.append(out.view(-1, K, C))
            out = torch.cat(outs, 0) if outs else query.new_zeros(0, K, C)
        return query + self.dropout(self.output_proj(out))


class PETRMSDeformAttn(_DeformAttnBase):
    """Multi-scale deformable attention with one 2-D reference point per query."""

    def __init__(self, embed_dim=256, num_heads=8, num_levels=4, num_points=4, dropout=0.1):
        super().__init__(embed_dim, num_heads, num_levels, num_points, dropout)

    def _reset_parameters(self):
        super()._reset_parameters()
        num_heads, num_levels, num_points = self.num_heads, self.num_levels, self.num_points
        # Deformable DETR's init: head h looks along angle 2*pi*h/M, point p at distance p + 1.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(num_heads, 1, 1, 2)
        grid = grid.repeat(1, num_levels, num_points, 1)
        grid = grid * torch.arange(1, num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))

    def sampling_locations(self, offsets, reference_points, spatial_shapes):
        """reference_points (B, Q, L, 2) normalised (x, y) -> locations (B, Q, M, L, P, 2);
        spatial_shapes: L (H_l, W_l) int (or symbolic int) pairs."""
        B, Q, _, L, P, _ = offsets.shape
        # offsets are in pixels of each level: divide by (W_l, H_l). Both operands are expanded
        # over the points first: a view here, but in an exported graph it makes the broadcast's
        # innermost run L * P * 2 elements, not 2, which onnxruntime's Div and Add walk element
        # pair by element pair (8-10 ms each on the toy model's encoder, 1 thread; now 0.5-2).
        normalizer = level_sizes_wh(spatial_shapes, offsets)[:, None].expand(L, P, 2)
        ref = reference_points[:, :, None, :, None, :].expand(B, Q, 1, L, P, 2)
        # ref + offsets / normalizer, in place in the fresh offsets (no temporaries)
        return offsets.div_(normalizer).add_(ref)


class PETRPoseDeformAttn(_DeformAttnBase):
    """Pose deformable attention: point k of every head and level is anchored at keypoint k.

    sampling location[h, l, k] = ref[l, k] + offset[h, l, k] * (w_l, h_l) / 2, where (w_l, h_l)
    is the extent (clamped at 1e-4) of the K reference keypoints. Offsets start at zero.
    """

    def __init__(self, embed_dim=256, num_heads=8, num_levels=4, num_keypoints=17, dropout=0.1):
        super().__init__(embed_dim, num_heads, num_levels, num_keypoints, dropout)

    def _reset_parameters(self):
        super()._reset_parameters()
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        nn.init.constant_(self.sampling_offsets.bias, 0.0)

    def sampling_locations(self, offsets, reference_points, spatial_shapes):
        """reference_points (B, Q, L, 2K) normalised interleaved (x0, y0, x1, ...) per level."""
        B, Q, L, _ = reference_points.shape
        xs, ys = reference_points[..., 0::2], reference_points[..., 1::2]  # (B, Q, L, K)
        w = (xs.max(-1, keepdim=True)[0] - xs.min(-1, keepdim=True)[0]).clamp(min=1e-4)
        h = (ys.max(-1, keepdim=True)[0] - ys.min(-1, keepdim=True)[0]).clamp(min=1e-4)
        ref = reference_points.view(B, Q, 1, L, -1, 2)  # (B, Q, 1, L, K, 2)
        # expanded over the keypoints for onnxruntime's broadcast (see PETRMSDeformAttn)
        wh = torch.cat([w, h], -1)[:, :, None, :, None, :].expand(ref.shape)
        return ref + offsets * wh * 0.5
