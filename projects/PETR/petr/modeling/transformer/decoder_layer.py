"""The post-norm decoder layer shared by PETR's pose and joint decoders (mmcv
DetrTransformerDecoderLayer: self-attention, norm, cross-attention, norm, FFN, norm)."""

import torch.nn as nn

from .common import PostNormLayer


class PETRDecoderLayer(PostNormLayer):
    """`cross_attn` is a PETRPoseDeformAttn (pose decoder) or PETRMSDeformAttn (joint decoder)."""

    def __init__(self, dim, num_heads, ffn_dim, dropout, cross_attn: nn.Module):
        super().__init__(dim, ffn_dim, dropout)
        # dropout acts on the attention probabilities and on the output, as mmcv's wrapper does
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.self_attn_dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = cross_attn
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def self_attention(self, x, pos):
        """x, pos (B, Q, C): q = k = x + pos, v = x; returns norm1(x + attention)."""
        q = x + pos
        out = self.self_attn(q, q, x, need_weights=False)[0]
        return self.norm1(x + self.self_attn_dropout(out))

    def forward(self, x, pos, reference_points, value, spatial_shapes, level_start_index, mask):
        x = self.self_attention(x, pos)
        x = self.cross_attn(
            x, pos, reference_points, value, spatial_shapes, level_start_index, mask
        )
        return self.feed_forward(x)

    def feed_forward(self, x):
        """The part after cross-attention: norm3(ffn(norm2(x)))."""
        return self.norm3(self.ffn(self.norm2(x)))
