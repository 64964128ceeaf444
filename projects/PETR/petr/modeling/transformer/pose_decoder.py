"""PETR's pose decoder with iterative keypoint refinement (hikvision-research/opera,
PetrTransformerDecoder and PETRHead): learned pose queries attend to the encoder memory around
their K reference keypoints; after every layer an un-shared head refines the keypoints in logit
space and another scores the pose."""

import math

import torch
import torch.nn as nn

from .attention import PETRPoseDeformAttn
from .common import inverse_sigmoid, mlp, xavier_init_
from .decoder_layer import PETRDecoderLayer
from .encoder import EncoderMemory


class PETRPoseDecoder(nn.Module):
    def __init__(
        self, *, dim, num_heads, ffn_dim, dropout, num_layers, num_levels, num_keypoints,
        num_queries, kpt_hidden_dim=512,
    ):  # fmt: skip
        super().__init__()
        self.num_keypoints = num_keypoints
        # rows: [query_pos | query content], as the official query_embedding
        self.query_embed = nn.Embedding(num_queries, 2 * dim)
        self.layers = nn.ModuleList(
            PETRDecoderLayer(
                dim,
                num_heads,
                ffn_dim,
                dropout,
                PETRPoseDeformAttn(dim, num_heads, num_levels, num_keypoints, dropout),
            )  # fmt: skip
            for _ in range(num_layers)
        )
        self.class_heads = nn.ModuleList(nn.Linear(dim, 1) for _ in range(num_layers))
        h = kpt_hidden_dim
        self.kpt_heads = nn.ModuleList(
            mlp([dim, h, h, h, 2 * num_keypoints]) for _ in range(num_layers)
        )
        self._reset_parameters()

    def _reset_parameters(self):
        xavier_init_(self.layers)
        for layer in self.layers:
            layer.cross_attn._reset_parameters()
        for head in self.class_heads:
            nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, enc: EncoderMemory, reference_points: torch.Tensor):
        """reference_points (B, Q, 2K) normalised interleaved (x0, y0, ...), detached.

        Returns hidden states (Ld, B, Q, C), logits (Ld, B, Q, 1) and keypoints (Ld, B, Q, 2K)
        normalised, one entry per layer."""
        B = enc.memory.shape[0]
        pos, x = self.query_embed.weight.split(self.query_embed.weight.shape[1] // 2, dim=1)
        pos = pos[None].expand(B, -1, -1)
        x = x[None].expand(B, -1, -1)
        # per level, the references scaled to that level's valid region: (B, 1, L, 2K)
        ratios = enc.valid_ratios.repeat(1, 1, self.num_keypoints)[:, None]
        hidden, logits, kpts = [], [], []
        ref = reference_points
        for layer, class_head, kpt_head in zip(self.layers, self.class_heads, self.kpt_heads):
            x = layer(
                x, pos, ref[:, :, None] * ratios, enc.memory, enc.spatial_shapes,
                enc.level_start_index, enc.padding_mask,
            )  # fmt: skip
            new_kpts = (kpt_head(x) + inverse_sigmoid(ref)).sigmoid()
            hidden.append(x)
            logits.append(class_head(x))
            kpts.append(new_kpts)
            ref = new_kpts.detach()
        return torch.stack(hidden), torch.stack(logits), torch.stack(kpts)
