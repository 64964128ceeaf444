"""Small pieces shared by PETR's transformer parts."""

import functools
from typing import List

import torch
import torch.nn as nn


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps (mmdet's definition)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def level_sizes_wh(spatial_shapes, like: torch.Tensor) -> torch.Tensor:
    """(L, 2) tensor of (W_l, H_l) per level, with `like`'s dtype and device.

    spatial_shapes: L (H_l, W_l) pairs. Python ints go in as one host-to-device copy; symbolic
    ints (torch.compile(dynamic), torch.export) through torch.full, since torch.tensor of a
    symbolic int would pin it to its current value."""
    if all(isinstance(s, int) for hw in spatial_shapes for s in hw):
        return like.new_tensor([[w, h] for h, w in spatial_shapes])
    full = functools.partial(torch.full, (), dtype=like.dtype, device=like.device)
    return torch.stack([torch.stack([full(w), full(h)]) for h, w in spatial_shapes])


def mlp(dims: List[int]) -> nn.Sequential:
    """Linear layers of sizes dims[0] -> ... -> dims[-1] with ReLU between them.

    The last Linear is zero-initialised: the official heads start by predicting no change.
    Sequential indices 0, 2, 4, ... are the Linears (the official checkpoint layout).
    """
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(a, b))
    nn.init.zeros_(layers[-1].weight)
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class PostNormLayer(nn.Module):
    """Base of the post-norm transformer layers: holds the feed-forward block.

    The FFN parameters sit on the layer itself (`linear1`, `linear2`), as in Deformable DETR.
    """

    def __init__(self, dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.ffn_dropout1 = nn.Dropout(dropout)
        self.ffn_dropout2 = nn.Dropout(dropout)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """x + drop(linear2(drop(relu(linear1(x))))), before the layer's last norm.

        ReLU and the residual add write into the fresh Linear outputs (no (B, S, F) copies);
        autograd allows it: Linear's and dropout's backward do not read their outputs."""
        h = self.ffn_dropout1(torch.relu_(self.linear1(x)))
        return self.ffn_dropout2(self.linear2(h)).add_(x)


def xavier_init_(module: nn.Module) -> None:
    """Xavier-uniform on every parameter with more than one dimension (the official transformer
    init; deformable attention modules re-apply their own init afterwards)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
