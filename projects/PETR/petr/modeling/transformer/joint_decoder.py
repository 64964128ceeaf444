"""PETR's joint decoder (hikvision-research/opera, PETRTransformer.forward_refine): K learned
joint queries, shared by every pose, refine each selected pose's keypoints with standard
deformable attention around each joint."""

from typing import List

import torch
import torch.nn as nn

from .attention import PETRMSDeformAttn
from .common import inverse_sigmoid, mlp, xavier_init_
from .decoder_layer import PETRDecoderLayer
from .encoder import EncoderMemory


class PETRJointDecoder(nn.Module):
    def __init__(
        self, *, dim, num_heads, ffn_dim, dropout, num_layers, num_levels, num_points,
        num_keypoints,
    ):  # fmt: skip
        super().__init__()
        # rows: [query_pos | query content], one per joint
        self.query_embed = nn.Embedding(num_keypoints, 2 * dim)
        self.layers = nn.ModuleList(
            PETRDecoderLayer(
                dim,
                num_heads,
                ffn_dim,
                dropout,
                PETRMSDeformAttn(dim, num_heads, num_levels, num_points, dropout),
            )  # fmt: skip
            for _ in range(num_layers)
        )
        self.kpt_heads = nn.ModuleList(mlp([dim, dim, dim, 2]) for _ in range(num_layers))
        self._reset_parameters()

    def _reset_parameters(self):
        xavier_init_(self.layers)
        for layer in self.layers:
            layer.cross_attn._reset_parameters()
        nn.init.normal_(self.query_embed.weight)

    def forward(
        self, enc: EncoderMemory, kpts: torch.Tensor, counts: List[int] | None = None
    ) -> torch.Tensor:
        """kpts (N, 2K) normalised interleaved poses, ordered by image; counts: poses per image,
        or None when every image has N / B poses (inference; the batch size may be symbolic).

        Returns the refined keypoints of every layer, (Lj, N, K, 2) normalised (x, y)."""
        N = kpts.shape[0]
        B, L = enc.valid_ratios.shape[:2]
        pos, x = self.query_embed.weight.split(self.query_embed.weight.shape[1] // 2, dim=1)
        pos = pos[None].expand(N, -1, -1)
        x = x[None].expand(N, -1, -1)
        # each pose gets its image's ratios: (N, 1, L, 2), from the host-side counts (no sync)
        if counts is None:
            ratios = enc.valid_ratios[:, None].expand(B, N // B, L, 2).reshape(N, 1, L, 2)
        else:
            ratios = torch.cat(
                [enc.valid_ratios[b : b + 1].expand(n, -1, -1) for b, n in enumerate(counts)]
            )[:, None]
        ref = kpts.detach().view(N, -1, 2)
        outputs = []
        for layer, kpt_head in zip(self.layers, self.kpt_heads):
            x = layer.self_attention(x, pos)
            value = layer.cross_attn.project_value(enc.memory, enc.padding_mask)
            x = layer.cross_attn.forward_grouped(
                x, pos, ref[:, :, None] * ratios, value, enc.spatial_shapes,
                enc.level_start_index, counts,
            )  # fmt: skip
            x = layer.feed_forward(x)
            new_ref = (kpt_head(x) + inverse_sigmoid(ref)).sigmoid()
            outputs.append(new_ref)
            ref = new_ref.detach()
        return torch.stack(outputs)
