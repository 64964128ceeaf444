"""The PETR neck: per-level 1x1 projection plus extra stride-2 levels (mmdet ChannelMapper).

Follows the official implementation (hikvision-research/opera, mmdet ChannelMapper): every conv
has no bias and is followed by GroupNorm(32) with no activation, and the first extra level is a
3x3 stride-2 conv on the *raw* last backbone feature, not on its projection.
"""

from typing import Dict, List

import torch.nn as nn
from detectron2.layers import Conv2d, ShapeSpec


class PETRChannelMapper(nn.Module):
    """Maps backbone features to `num_levels` maps of `out_channels` at strides s, 2s, 4s, ..."""

    def __init__(
        self,
        input_shapes: Dict[str, ShapeSpec],
        in_features: List[str],
        out_channels: int,
        num_levels: int,
        num_groups: int = 32,
    ):
        super().__init__()
        if num_levels < len(in_features):
            raise ValueError(
                f"MODEL.PETR.NUM_FEATURE_LEVELS={num_levels} < len(IN_FEATURES)={len(in_features)}"
            )
        missing = [f for f in in_features if f not in input_shapes]
        if missing:
            raise ValueError(
                f"MODEL.PETR.IN_FEATURES {list(in_features)}: the backbone has no {missing}; it "
                f"gives {sorted(input_shapes)} (MODEL.RESNETS / MODEL.SWIN .OUT_FEATURES)"
            )
        self.in_features = list(in_features)
        in_channels = [input_shapes[f].channels for f in in_features]

        def conv(cin, k, stride):
            return Conv2d(
                cin,
                out_channels,
                kernel_size=k,
                stride=stride,
                padding=k // 2,
                bias=False,
                norm=nn.GroupNorm(num_groups, out_channels),
            )

        self.convs = nn.ModuleList([conv(c, 1, 1) for c in in_channels])
        # The first extra level reads the raw last backbone level, later ones the previous extra.
        extra_in = [in_channels[-1]] + [out_channels] * (num_levels - len(in_features) - 1)
        self.extra_convs = nn.ModuleList([conv(c, 3, 2) for c in extra_in])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, features: Dict) -> List:
        """features: backbone outputs by name. Returns `num_levels` (B, C, H_l, W_l) maps."""
        inputs = [features[f] for f in self.in_features]
        outs = [conv(x) for conv, x in zip(self.convs, inputs)]
        x = inputs[-1]
        for conv in self.extra_convs:
            x = conv(x)
            outs.append(x)
        return outs
