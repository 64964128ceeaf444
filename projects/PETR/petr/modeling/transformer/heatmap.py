"""PETR's auxiliary heatmap branch (hikvision-research/opera): one deformable encoder layer
over the stride-8 level of the encoder memory, then a per-pixel linear keypoint classifier.
Officially training-only; here inference also reads it at each predicted joint, as a per-joint
confidence (MODEL.PETR.JOINT_SCORES, `joint_scores`).

As in the official code, the layer runs without position or level embedding (the official call
passes them under a misspelt keyword that is silently ignored); the released checkpoints were
trained that way, so we keep it.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import PETRMSDeformAttn
from .common import level_sizes_wh, xavier_init_
from .encoder import EncoderMemory, PETREncoderLayer


class PETRHeatmapHead(nn.Module):
    def __init__(self, *, dim, num_heads, ffn_dim, dropout, num_layers, num_points, num_keypoints):
        super().__init__()
        self.layers = nn.ModuleList(
            PETREncoderLayer(dim, num_heads, ffn_dim, dropout, 1, num_points)
            for _ in range(num_layers)
        )
        self.predictor = nn.Linear(dim, num_keypoints)
        xavier_init_(self.layers)
        for m in self.modules():
            if isinstance(m, PETRMSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.constant_(self.predictor.bias, -math.log((1 - 0.1) / 0.1))

    def forward(self, enc: EncoderMemory):
        """Returns logits (B, K, H0, W0) at the first (stride-8) level and its padding mask
        (B, H0, W0), True on padding."""
        h, w = enc.spatial_shapes[0]
        x, mask = self._stride8_tokens(enc, self.layers)
        B = x.shape[0]
        logits = self.predictor(x).view(B, h, w, -1).permute(0, 3, 1, 2)
        return logits, mask.view(B, h, w)

    def _stride8_tokens(self, enc: EncoderMemory, layers):
        """The stride-8 tokens (B, H0*W0, C) after `layers`, and their padding mask."""
        h, w = enc.spatial_shapes[0]
        n = h * w
        x = enc.memory[:, :n]
        mask = enc.padding_mask[:, :n]
        ref = enc.reference_points[:, :n, :1]  # (B, H0*W0, 1, 2)
        shapes = enc.spatial_shapes[:1]
        start = enc.level_start_index[:1]
        for layer in layers:
            x = layer(x, None, ref, shapes, start, mask)
        return x, mask

    def joint_scores(
        self, enc: EncoderMemory, keypoints: torch.Tensor, full_map: bool | None = None
    ) -> torch.Tensor:
        """keypoints (B, N, K, 2) normalised (x, y) of each unpadded image -> (B, N, K) in
        [0, 1]: the sigmoid of joint k's heatmap logit, bilinearly sampled at joint k (clamped
        to the image, as the back door clamps it). Static shapes, no host read.

        full_map None picks the cheaper of two equal computations: the whole stride-8 map
        (`forward`) when it has no more tokens than the 4 * N * K cells around the joints (small
        images, e.g. the toy), else the last layer's query side only at those cells. Symbolic
        sizes (compile(dynamic), export) take the cells, so one graph serves every size."""
        B, N, K, _ = keypoints.shape
        h, w = enc.spatial_shapes[0]
        if full_map is None:
            full_map = isinstance(h * w, int) and h * w <= 4 * N * K
        # Normalised by the padded map through the valid ratios, as the decoders sample
        # features; grid_sample's align_corners=False puts cell i's centre at (i + 0.5) / W0.
        xy = keypoints.clamp(0.0, 1.0) * enc.valid_ratios[:, None, None, 0]  # (B, N, K, 2)
        if not full_map:
            return self._joint_scores_at_cells(enc, xy)
        logits, _ = self(enc)  # (B, K, H0, W0)
        grid = (2 * xy - 1).transpose(1, 2).reshape(B * K, N, 1, 2).to(logits.dtype)
        sampled = F.grid_sample(
            logits.reshape(B * K, 1, h, w), grid, align_corners=False, padding_mode="border"
        )  # (B*K, 1, N, 1): channel k of image b at the N joints k
        return sampled.view(B, K, N).transpose(1, 2).sigmoid()

    def _joint_scores_at_cells(self, enc: EncoderMemory, xy: torch.Tensor) -> torch.Tensor:
        """`joint_scores` from the 4 cells around each joint (xy (B, N, K, 2) normalised by
        the padded map): the last layer's value projection still covers every token, its query
        side (offsets, weights, sampling, FFN) and the classifier run at the cells only; then
        grid_sample's bilinear weights, with its border clamp, combine their 4 logits."""
        B, N, K, _ = xy.shape
        h, w = enc.spatial_shapes[0]
        # earlier layers feed the last one's values everywhere
        x, mask = self._stride8_tokens(enc, self.layers[:-1])
        n = x.shape[1]
        ref = enc.reference_points[:, :n, :1]  # (B, H0*W0, 1, 2)
        shapes = enc.spatial_shapes[:1]
        start = enc.level_start_index[:1]
        last = level_sizes_wh(shapes, xy)[0] - 1  # (W0 - 1, H0 - 1)
        # grid_sample(align_corners=False, border): cell coordinate xy * size - 0.5, clamped
        p = torch.minimum((xy * (last + 1) - 0.5).clamp(min=0.0), last)
        p0 = p.floor()
        frac = p - p0  # (B, N, K, 2)
        i0 = p0.long()
        i1 = torch.minimum(i0 + 1, last.long())  # weight 0 when clamped
        cx = torch.stack((i0[..., 0], i1[..., 0], i0[..., 0], i1[..., 0]), -1)
        cy = torch.stack((i0[..., 1], i0[..., 1], i1[..., 1], i1[..., 1]), -1)
        idx = (cy * w + cx).view(B, N * K * 4, 1)  # (B, Q) token of each cell
        fx, fy = frac[..., :1], frac[..., 1:]
        weights = torch.cat(((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy), -1)
        C = x.shape[-1]
        query = torch.gather(x, 1, idx.expand(-1, -1, C))
        query_ref = torch.gather(ref.flatten(2), 1, idx.expand(-1, -1, 2)).view(B, -1, 1, 2)
        out = self.layers[-1](query, None, query_ref, shapes, start, mask, value=x)
        # joint k's channel only: row k of the classifier
        out = out.view(B, N, K, 4, C)
        logits = torch.einsum("bnkjc,kc->bnkj", out, self.predictor.weight.to(out.dtype))
        logits = logits + self.predictor.bias.to(out.dtype)[:, None]
        return (logits * weights.to(logits.dtype)).sum(-1).sigmoid()
