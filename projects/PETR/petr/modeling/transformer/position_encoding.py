"""Sine position encoding of Deformable DETR (mmdet SinePositionalEncoding, offset -0.5)."""

import math

import torch
import torch.nn as nn


class PETRSinePositionEncoding(nn.Module):
    """Normalised sine/cosine encoding of the valid (unpadded) region of a feature map.

    Returns (B, 2 * num_feats, H, W): channels [0, num_feats) encode y, the rest x, each as
    interleaved (sin, cos) pairs.
    """

    def __init__(self, num_feats: int, temperature: float = 10000.0, offset: float = -0.5):
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.offset = offset
        self.scale = 2 * math.pi
        self.eps = 1e-6

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: (B, H, W) bool, True on padding."""
        not_mask = (~mask).to(torch.float32)
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
        x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_feats)
        pos_x = x[..., None] / dim_t
        pos_y = y[..., None] / dim_t
        B, H, W = mask.shape
        # (B, H, W, F/2, 2) -> (B, H, W, F): sin and cos interleaved
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).view(
            B, H, W, -1
        )
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).view(
            B, H, W, -1
        )
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
