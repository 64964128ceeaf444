"""Infer the architecture of an official PETR checkpoint (hikvision-research/opera) from its shapes.

The official checkpoints carry no usable config, so the converter reads the hyper-parameters
(backbone, hidden size, heads, layer counts, number of keypoints, ...) off a few anchor tensors.
Every other tensor is then checked against the shapes this layout implies
(`opera_rules.expected_shapes`), so a checkpoint of an unexpected variant fails loudly instead of
loading half-right.

All keys here are official (mmdet) names, without any `module.` prefix.
"""

import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

__all__ = [
    "OperaCheckpointError",
    "OperaLayout",
    "ResNetLayout",
    "SwinLayout",
    "infer_layout",
    "matching_config",
]

_T = "bbox_head.transformer."
# Detectron2's `build_resnet_backbone` bottleneck block counts per depth.
_RESNET_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def _lst(values) -> str:
    """A list as one shell word that yacs parses back: [2,2,18,2]."""
    return "[" + ",".join(str(v) for v in values) + "]"


class OperaCheckpointError(ValueError):
    """An official PETR checkpoint cannot be converted: unreadable, unknown layout, unknown key
    or wrong shape. The message names the file, key or shapes at fault."""


@dataclass(frozen=True)
class ResNetLayout:
    depth: int
    blocks: Tuple[int, ...]  # blocks per stage res2..res5
    stem_out: int
    res2_out: int
    num_groups: int
    width_per_group: int

    @property
    def stage_channels(self) -> List[int]:
        """Output channels of res2..res5."""
        return [self.res2_out * 2**i for i in range(4)]

    def config_overrides(self) -> List[str]:
        return [
            "MODEL.BACKBONE.NAME build_resnet_backbone",
            f"MODEL.RESNETS.DEPTH {self.depth}",
            f"MODEL.RESNETS.STEM_OUT_CHANNELS {self.stem_out}",
            f"MODEL.RESNETS.RES2_OUT_CHANNELS {self.res2_out}",
            f"MODEL.RESNETS.NUM_GROUPS {self.num_groups}",
            f"MODEL.RESNETS.WIDTH_PER_GROUP {self.width_per_group}",
            # Not visible in the weights: mmdet style='pytorch', used by every official config.
            "MODEL.RESNETS.STRIDE_IN_1X1 False",
            "MODEL.RESNETS.NORM FrozenBN",
        ]


@dataclass(frozen=True)
class SwinLayout:
    embed_dim: int
    depths: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    window_size: int
    patch_size: int
    mlp_ratio: float

    @property
    def stage_channels(self) -> List[int]:
        return [self.embed_dim * 2**i for i in range(len(self.depths))]

    def config_overrides(self) -> List[str]:
        return [
            "MODEL.BACKBONE.NAME build_swin_backbone",
            f"MODEL.SWIN.EMBED_DIM {self.embed_dim}",
            f"MODEL.SWIN.DEPTHS {_lst(self.depths)}",
            f"MODEL.SWIN.NUM_HEADS {_lst(self.num_heads)}",
            f"MODEL.SWIN.WINDOW_SIZE {self.window_size}",
            f"MODEL.SWIN.PATCH_SIZE {self.patch_size}",
            f"MODEL.SWIN.MLP_RATIO {self.mlp_ratio}",
        ]


@dataclass(frozen=True)
class OperaLayout:
    backbone: ResNetLayout | SwinLayout
    hidden_dim: int  # C
    num_levels: int  # L, feature levels after the neck
    num_neck_convs: int  # backbone levels the neck reads (the last ones)
    num_heads: int
    dim_feedforward: int
    enc_layers: int
    pose_dec_layers: int
    joint_dec_layers: int
    hm_enc_layers: int
    enc_points: int  # per head and level, encoder and heatmap encoder
    joint_points: int  # per head and level, joint decoder
    num_keypoints: int  # K
    num_queries: int
    kpt_hidden_dim: int  # the joint decoder's MLP is C wide, like the official one

    @property
    def neck_in_channels(self) -> List[int]:
        return self.backbone.stage_channels[-self.num_neck_convs :]

    def config_overrides(self) -> List[str]:
        """`KEY VALUE` strings that select this architecture (see `config_opts`)."""
        return self.backbone.config_overrides() + [
            f"MODEL.PETR.HIDDEN_DIM {self.hidden_dim}",
            f"MODEL.PETR.NUM_FEATURE_LEVELS {self.num_levels}",
            f"MODEL.PETR.NUM_HEADS {self.num_heads}",
            f"MODEL.PETR.DIM_FEEDFORWARD {self.dim_feedforward}",
            f"MODEL.PETR.ENC_LAYERS {self.enc_layers}",
            f"MODEL.PETR.POSE_DEC_LAYERS {self.pose_dec_layers}",
            f"MODEL.PETR.JOINT_DEC_LAYERS {self.joint_dec_layers}",
            f"MODEL.PETR.HM_ENC_LAYERS {self.hm_enc_layers}",
            f"MODEL.PETR.ENC_N_POINTS {self.enc_points}",
            f"MODEL.PETR.JOINT_DEC_N_POINTS {self.joint_points}",
            f"MODEL.PETR.KPT_HEAD_HIDDEN_DIM {self.kpt_hidden_dim}",
            f"MODEL.PETR.NUM_QUERIES {self.num_queries}",
            f"MODEL.PETR.NUM_KEYPOINTS {self.num_keypoints}",
        ]

    def config_opts(self) -> List[str]:
        """Flat [KEY, VALUE, ...] list for `cfg.merge_from_list` or a command line's opts."""
        return [word for item in self.config_overrides() for word in item.split(" ", 1)]

    def describe(self) -> str:
        b = self.backbone
        if isinstance(b, ResNetLayout):
            bb = f"ResNet-{b.depth} (blocks {list(b.blocks)}, stem {b.stem_out}, res2 {b.res2_out})"
        else:
            bb = (
                f"Swin (embed {b.embed_dim}, depths {list(b.depths)}, heads {list(b.num_heads)}, "
                f"window {b.window_size})"
            )
        return (
            f"backbone: {bb}\n"
            f"keypoints K={self.num_keypoints}, queries {self.num_queries}, "
            f"hidden {self.hidden_dim}, {self.num_heads} heads, FFN {self.dim_feedforward}, "
            f"{self.num_levels} levels\n"
            f"layers: encoder {self.enc_layers}, pose decoder {self.pose_dec_layers}, "
            f"joint decoder {self.joint_dec_layers}, heatmap encoder {self.hm_enc_layers}"
        )


def _shape(sd: Dict[str, torch.Tensor], key: str) -> Tuple[int, ...]:
    if key not in sd:
        raise OperaCheckpointError(f"not a PETR checkpoint of a known layout: missing key '{key}'")
    return tuple(sd[key].shape)


def _count_indices(sd: Dict[str, torch.Tensor], prefix: str) -> int:
    """Number of `prefix{i}.` sub-modules; they must be numbered 0..n-1."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    if found != set(range(len(found))):
        raise OperaCheckpointError(
            f"'{prefix}N' indices are not contiguous from 0: {sorted(found)}"
        )
    return len(found)


def _divide(num: int, den: int, what: str, key: str) -> int:
    if den <= 0 or num % den:
        raise OperaCheckpointError(f"'{key}': {num} rows are not a multiple of {den} ({what})")
    return num // den


def _infer_resnet(sd) -> ResNetLayout:
    if "backbone.layer1.0.conv3.weight" not in sd:
        raise OperaCheckpointError(
            "'backbone.layer1.0.conv3.weight' missing: only bottleneck ResNets (50/101/152) are "
            "supported"
        )
    blocks = tuple(_count_indices(sd, f"backbone.layer{s}.") for s in range(1, 5))
    if blocks not in _RESNET_DEPTHS:
        raise OperaCheckpointError(
            f"ResNet with {list(blocks)} blocks per stage (from 'backbone.layerN.B.*') matches no "
            "Detectron2 depth"
        )
    conv2_key = "backbone.layer1.0.conv2.weight"
    mid, mid_per_group = _shape(sd, conv2_key)[:2]
    groups = _divide(mid, mid_per_group, "grouped 3x3 conv", conv2_key)
    return ResNetLayout(
        depth=_RESNET_DEPTHS[blocks],
        blocks=blocks,
        stem_out=_shape(sd, "backbone.conv1.weight")[0],
        res2_out=_shape(sd, "backbone.layer1.0.conv3.weight")[0],
        num_groups=groups,
        width_per_group=mid // groups,
    )


def _infer_swin(sd, swin_backbone) -> SwinLayout:
    # swin_keys owns the Swin names: read the architecture off its converted dict. Imported here
    # so that ResNet checkpoints convert without importing the Swin module (and Detectron2).
    from .swin_keys import convert_opera_swin_backbone, swin_arch_from_state_dict

    try:
        if swin_backbone is None:
            swin_backbone = convert_opera_swin_backbone(
                {k: v for k, v in sd.items() if k.startswith("backbone.")}
            )
        arch = swin_arch_from_state_dict(swin_backbone)
    except ValueError as e:
        raise OperaCheckpointError(f"Swin backbone: {e}") from e
    return SwinLayout(
        embed_dim=arch["embed_dim"],
        depths=tuple(arch["depths"]),
        num_heads=tuple(arch["num_heads"]),
        window_size=arch["window_size"],
        patch_size=arch["patch_size"],
        mlp_ratio=arch["mlp_ratio"],
    )


def infer_layout(
    sd: Dict[str, torch.Tensor], swin_backbone: Dict[str, torch.Tensor] | None = None
) -> OperaLayout:
    """Read the architecture off an official state dict (official names, no `module.` prefix).

    swin_backbone: the output of `swin_keys.convert_opera_swin_backbone` on this checkpoint, when
    the caller has it already (it is computed otherwise).
    """
    if "backbone.conv1.weight" in sd:
        backbone: ResNetLayout | SwinLayout = _infer_resnet(sd)
    elif "backbone.patch_embed.projection.weight" in sd:
        backbone = _infer_swin(sd, swin_backbone)
    else:
        some = next((k for k in sd if k.startswith("backbone.")), None)
        raise OperaCheckpointError(
            "unknown backbone: neither 'backbone.conv1.weight' (ResNet) nor "
            "'backbone.patch_embed.projection.weight' (Swin) is present; "
            f"first backbone key: {some}"
        )
    num_levels, c = _shape(sd, _T + "level_embeds")
    pose_layers = _count_indices(sd, _T + "decoder.layers.")
    kpt_out_key = f"bbox_head.kpt_branches.{pose_layers}.6.weight"
    k = _divide(_shape(sd, kpt_out_key)[0], 2, "x, y per keypoint", kpt_out_key)
    offsets_key = _T + "decoder.layers.0.attentions.1.sampling_offsets.weight"
    heads = _divide(_shape(sd, offsets_key)[0], num_levels * k * 2, "levels*K*2", offsets_key)
    enc_key = _T + "encoder.layers.0.attentions.0.sampling_offsets.weight"
    enc_points = _divide(_shape(sd, enc_key)[0], heads * num_levels * 2, "heads*levels*2", enc_key)
    # The heatmap encoder attends to one level (stride 8) with the encoder's number of points.
    hm_key = _T + "hm_encoder.layers.0.attentions.0.sampling_offsets.weight"
    hm_points = _divide(_shape(sd, hm_key)[0], heads * 2, "heads*1 level*2", hm_key)
    if hm_points != enc_points:
        raise OperaCheckpointError(
            f"'{hm_key}' implies {hm_points} points but the encoder has {enc_points}; "
            "MODEL.PETR.ENC_N_POINTS is shared by both"
        )
    joint_key = _T + "refine_decoder.layers.0.attentions.1.sampling_offsets.weight"
    joint_points = _divide(_shape(sd, joint_key)[0], heads * num_levels * 2, "heads*L*2", joint_key)
    return OperaLayout(
        backbone=backbone,
        hidden_dim=c,
        num_levels=num_levels,
        num_neck_convs=_count_indices(sd, "neck.convs."),
        num_heads=heads,
        dim_feedforward=_shape(sd, _T + "encoder.layers.0.ffns.0.layers.0.0.weight")[0],
        enc_layers=_count_indices(sd, _T + "encoder.layers."),
        pose_dec_layers=pose_layers,
        joint_dec_layers=_count_indices(sd, _T + "refine_decoder.layers."),
        hm_enc_layers=_count_indices(sd, _T + "hm_encoder.layers."),
        enc_points=enc_points,
        joint_points=joint_points,
        num_keypoints=k,
        num_queries=_shape(sd, "bbox_head.query_embedding.weight")[0],
        kpt_hidden_dim=_shape(sd, "bbox_head.kpt_branches.0.0.weight")[0],
    )


def _official(backbone, num_keypoints: int, pose_layers: int, joint_layers: int) -> OperaLayout:
    return OperaLayout(
        backbone=backbone,
        hidden_dim=256,
        num_levels=4,
        num_neck_convs=3,
        num_heads=8,
        dim_feedforward=1024,
        enc_layers=6,
        pose_dec_layers=pose_layers,
        joint_dec_layers=joint_layers,
        hm_enc_layers=1,
        enc_points=4,
        joint_points=4,
        num_keypoints=num_keypoints,
        num_queries=300,
        kpt_hidden_dim=512,
    )


def _torchvision_resnet(depth: int, blocks: Tuple[int, ...]) -> ResNetLayout:
    return ResNetLayout(depth, blocks, stem_out=64, res2_out=256, num_groups=1, width_per_group=64)


_SWIN_L = SwinLayout(
    192, (2, 2, 18, 2), (6, 12, 24, 48), window_size=7, patch_size=4, mlp_ratio=4.0
)
# The shipped config (relative to the repository root) for each official checkpoint's layout.
OFFICIAL_CONFIGS = {
    "configs/petr_R50.yaml": _official(_torchvision_resnet(50, (3, 4, 6, 3)), 17, 3, 2),
    "configs/petr_R101.yaml": _official(_torchvision_resnet(101, (3, 4, 23, 3)), 17, 3, 2),
    "configs/petr_SwinL.yaml": _official(_SWIN_L, 17, 3, 2),
    "configs/petr_SwinL_crowdpose.yaml": _official(_SWIN_L, 14, 6, 3),
}


def matching_config(layout: OperaLayout) -> str | None:
    """The shipped config whose architecture is exactly `layout`, or None."""
    return next((path for path, ref in OFFICIAL_CONFIGS.items() if ref == layout), None)
