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
from .common import xavier_init_
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
        n = h * w
        x = enc.memory[:, :n]
        mask = enc.padding_mask[:, :n]
        ref = enc.reference_points[:, :n, :1]  # (B, H0*W0, 1, 2)
        shapes = enc.spatial_shapes[:1]
        start = enc.level_start_index[:1]
        for layer in self.layers:
            x = layer(x, None, ref, shapes, start, mask)
        B = x.shape[0]
        logits = self.predictor(x).view(B, h, w, -1).permute(0, 3, 1, 2)
        return logits, mask.view(B, h, w)

    def joint_scores(self, enc: EncoderMemory, keypoints: torch.Tensor) -> torch.Tensor:
        """keypoints (B, N, K, 2) normalised (x, y) of each unpadded image -> (B, N, K) in
        [0, 1]: the sigmoid of joint k's heatmap logit, bilinearly sampled at joint k (clamped
        to the image, as the back door clamps it). Static shapes, no host read."""
        logits, _ = self(enc)  # (B, K, H0, W0)
        B, K, h, w = logits.shape
        N = keypoints.shape[1]
        # Normalised by the padded map through the valid ratios, as the decoders sample
        # features; grid_sample's align_corners=False puts cell i's centre at (i + 0.5) / W0.
        xy = keypoints.clamp(0.0, 1.0) * enc.valid_ratios[:, None, None, 0]  # (B, N, K, 2)
        grid = (2 * xy - 1).transpose(1, 2).reshape(B * K, N, 1, 2).to(logits.dtype)
        sampled = F.grid_sample(
            logits.reshape(B * K, 1, h, w), grid, align_corners=False, padding_mode="border"
        )  # (B*K, 1, N, 1): channel k of image b at the N joints k
        return sampled.view(B, K, N).transpose(1, 2).sigmoid()
