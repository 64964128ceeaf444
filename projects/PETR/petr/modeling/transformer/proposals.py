"""Two-stage point proposals of PETR (hikvision-research/opera, PETRTransformer).

Every encoder token proposes one pose: its centre plus 2K keypoint offsets in logit space. The
top-k tokens by class score give the initial keypoint references of the pose queries (the queries
themselves stay learned embeddings).
"""

import math

import torch
import torch.nn as nn

from .common import mlp
from .encoder import EncoderMemory


def token_centre_logits(padding_mask, spatial_shapes):
    """Logit of every token's centre, normalised by its level's valid size: (B, S, 2) (x, y),
    and (B, S) True where the token is usable (not padding, centre inside (0.01, 0.99)).
    spatial_shapes: L (H_l, W_l) int (or symbolic int) pairs."""
    B = padding_mask.shape[0]
    centres, start = [], 0
    for h, w in spatial_shapes:
        m = padding_mask[:, start : start + h * w].view(B, h, w)
        valid_h = (~m[:, :, 0]).sum(1)
        valid_w = (~m[:, 0, :]).sum(1)
        dev = padding_mask.device
        # arange == the official linspace(0, n - 1, n) bit for bit, and keeps n symbolic
        gy, gx = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=dev),
            torch.arange(w, dtype=torch.float32, device=dev),
            indexing="ij",
        )
        grid = torch.stack([gx, gy], -1)  # (h, w, 2)
        scale = torch.stack([valid_w, valid_h], -1).view(B, 1, 1, 2)
        centres.append(((grid[None] + 0.5) / scale).view(B, -1, 2))
        start += h * w
    p = torch.cat(centres, 1)
    usable = ((p > 0.01) & (p < 0.99)).all(-1) & ~padding_mask
    # the mask expanded to (B, S, 2): onnxruntime's Where is slow on a broadcast of 1 element
    logits = torch.log(p / (1 - p)).masked_fill(~usable[..., None].expand_as(p), float("inf"))
    return logits, usable


class PETRPointProposals(nn.Module):
    """Scores every encoder token and predicts its pose; returns the top-k poses as references."""

    def __init__(self, *, dim, num_keypoints, num_proposals, kpt_hidden_dim=512):
        super().__init__()
        self.num_proposals = num_proposals
        self.output_proj = nn.Linear(dim, dim)
        self.output_norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, 1)
        self.kpt_head = mlp(
            [dim, kpt_hidden_dim, kpt_hidden_dim, kpt_hidden_dim, 2 * num_keypoints]
        )
        nn.init.xavier_uniform_(self.output_proj.weight)  # part of the official transformer init
        nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, enc: EncoderMemory):
        """Returns dict: enc_logits (B, S, 1); enc_kpts (B, S, 2K) normalised interleaved (x, y);
        reference_points (B, num_proposals, 2K) normalised, detached."""
        centres, usable = token_centre_logits(enc.padding_mask, enc.spatial_shapes)
        # Padded and out-of-range tokens see zero memory, so they share one constant score and
        # can still be selected (inherited from the official two-stage code).
        mem = enc.memory.masked_fill(~usable[..., None].expand_as(enc.memory), 0.0)
        mem = self.output_norm(self.output_proj(mem))
        logits = self.class_head(mem)
        delta = self.kpt_head(mem)
        B, S, _ = delta.shape
        delta = delta.view(B, S, -1, 2)
        kpt_logits = (delta + centres[:, :, None, :].expand_as(delta)).view(B, S, -1)
        if S < self.num_proposals:
            raise ValueError(
                f"The image gives {S} encoder tokens, fewer than MODEL.PETR.NUM_QUERIES="
                f"{self.num_proposals}: use a larger input or fewer queries"
            )
        topk = torch.topk(logits[..., 0], self.num_proposals, dim=1)[1]
        ref_logits = torch.gather(
            kpt_logits, 1, topk[..., None].expand(-1, -1, kpt_logits.shape[-1])
        )
        return {
            "enc_logits": logits,
            "enc_kpts": kpt_logits.sigmoid(),
            "reference_points": ref_logits.detach().sigmoid(),
        }
