"""PETR's training-only heatmap branch (hikvision-research/opera): one deformable encoder layer
over the stride-8 level of the encoder memory, then a per-pixel linear keypoint classifier.

As in the official code, the layer runs without position or level embedding (the official call
passes them under a misspelt keyword that is silently ignored); the released checkpoints were
trained that way, so we keep it.
"""

import math

import torch.nn as nn

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
