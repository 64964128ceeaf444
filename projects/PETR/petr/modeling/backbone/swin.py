"""Swin Transformer backbone (Liu et al., ICCV 2021) for PETR's Swin-L configs: a registered builder
around Detectron2's `detectron2.modeling.backbone.swin.SwinTransformer`.

Detectron2's module is the detection variant of the official Microsoft code, as is the one the
official PETR code runs (hikvision-research/opera, through mmdet's `SwinTransformer`): a fixed
window size at every resolution; inputs of any size padded internally (to the patch size, to
window multiples inside each block, to even sizes before patch merging); padded tokens are not
masked in window attention; each returned stage has its own output LayerNorm. This subclass adds:
- Detectron2 backbone names: stage s is returned as `res{s+2}` (stride patch * 2^s, channels
  embed_dim * 2^s, as ResNet's), and stages after the last requested output are not built;
- stochastic depth by torchvision's `StochasticDepth` (Detectron2's imports timm, which is not a
  dependency), its rate growing linearly over all blocks of the full network;
- construction under `torch.device("meta")`, which Detectron2's constructor alone does not allow;
- `size_divisibility` 0 (Detectron2 says 32, but pads internally) and a shape check on the input.
`USE_CHECKPOINT` is Detectron2's activation checkpointing (the reentrant variant, per block; torch
2.4+ warns once that `use_reentrant` is not passed).

Parameter names are Detectron2's, which are the official Microsoft release's (so its ImageNet
weights load after dropping the classifier, see checkpoint/swin_keys.py): `patch_embed.{proj,norm}`,
`layers.{s}.blocks.{b}.{norm1,attn.qkv,attn.proj,attn.relative_position_bias_table,
attn.relative_position_index,norm2,mlp.fc1,mlp.fc2}`, `layers.{s}.downsample.{reduction,norm}`,
and `norm{s}` for the output LayerNorm of stage s (res2 -> `norm0` ... res5 -> `norm3`, as mmdet).

Same features as the implementation this module replaced (the project's own Swin, commit 56e5bbe;
tests/make_swin_fixture.py runs it from git history): the same weights (identical state-dict
names) in eval mode, a tiny Swin (embed 16, depths 2-2-2-2, heads 1-2-2-4, window 7) on inputs
(2, 3, H, W) with H x W = 56x56, 61x83 (not a patch multiple), 29x45 and 33x17 (res2..res5 not
window multiples, odd sizes before merging): largest absolute difference over res2..res5 0.0 in
float32 and in float64, on torch 2.14.1 (Detectron2 from source) and torch 2.3.1 (sal-detectron2
0.7.2) alike; training-mode gradients identical too. The fixture stored from torch 2.14.1 is
matched to 1.7e-6 on torch 2.3.1 (features of unit scale), as the old implementation matched it.
tests/test_swin.py checks the stored fixture.
"""

import contextlib
import warnings
from typing import Dict, Sequence

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.swin import SwinTransformer, WindowAttention
from torch.overrides import TorchFunctionMode
from torchvision.ops import StochasticDepth

__all__ = ["PETRSwinTransformer", "build_swin_backbone", "relative_position_index"]


class _LinspaceOnCpu(TorchFunctionMode):
    """Detectron2 reads its drop-path rates with `torch.linspace(...).item()`, which fails on the
    meta device (how full-size models are built without memory): compute that tensor on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.linspace:
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def _building_detectron2_swin():
    with warnings.catch_warnings(), _LinspaceOnCpu():
        # Detectron2's WindowAttention calls torch.meshgrid without `indexing` ("ij" is meant).
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
        yield


def relative_position_index(window_size: int) -> torch.Tensor:
    """The buffer Detectron2's WindowAttention registers: a LongTensor `(w*w, w*w)` indexing the
    `(2w-1)^2`-row bias table; entry [i, j] = (dy + w-1) * (2w-1) + (dx + w-1), where (dy, dx) =
    position(i) - position(j) in tokens, tokens in row-major order."""
    with _building_detectron2_swin(), torch.device("cpu"):
        attn = WindowAttention(1, (window_size, window_size), num_heads=1)
    return attn.relative_position_index


class PETRSwinTransformer(SwinTransformer):
    """Swin Transformer returning stage s as `res{s+2}` (stride patch_size * 2^s, channels
    embed_dim * 2^s).

    Input: (B, in_chans, H, W) normalised image, any H, W (padded internally; size_divisibility
    is 0). Output: dict of (B, C_s, ceil(H/2^(s+2)), ceil(W/2^(s+2))) maps, each passed through its
    own LayerNorm `norm{s}`. Stages after the last requested output are not built.
    """

    def __init__(
        self,
        *,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        patch_norm: bool = True,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        use_checkpoint: bool = False,
    ):
        if len(depths) != len(num_heads):
            raise ValueError(f"Swin: depths {list(depths)} and num_heads {list(num_heads)} differ")
        for s, heads in enumerate(num_heads):
            if (embed_dim * 2**s) % heads != 0:
                raise ValueError(f"Swin: dim {embed_dim * 2**s} is not divisible by {heads} heads")
        names = [f"res{s + 2}" for s in range(len(depths))]
        bad = [f for f in out_features if f not in names]
        if bad or not out_features:
            raise ValueError(f"Swin: out_features {list(out_features)} must be among {names}")
        out_stages = sorted(names.index(f) for f in out_features)
        num_stages = out_stages[-1] + 1
        with _building_detectron2_swin():
            super().__init__(
                patch_size=patch_size,
                in_chans=in_chans,
                embed_dim=embed_dim,
                depths=list(depths[:num_stages]),
                num_heads=list(num_heads[:num_stages]),
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_rate=drop_rate,
                attn_drop_rate=attn_drop_rate,
                drop_path_rate=0.0,  # set below, without timm
                patch_norm=patch_norm,
                out_indices=out_stages,
                use_checkpoint=use_checkpoint,
            )
        # Linear in the block index over the full network (as upstream), also when later stages
        # are not built. (Plain Python, so that it works under `torch.device("meta")`.)
        n = sum(depths)
        blocks = [blk for layer in self.layers for blk in layer.blocks]
        for i, blk in enumerate(blocks):
            p = drop_path_rate * i / max(n - 1, 1)
            if p > 0:
                blk.drop_path = StochasticDepth(p, mode="row")  # per sample, scaled by 1/(1-p)
        self._out_features = [names[s] for s in out_stages]
        self._out_feature_channels = {names[s]: embed_dim * 2**s for s in out_stages}
        self._out_feature_strides = {names[s]: patch_size * 2**s for s in out_stages}

    @property
    def size_divisibility(self) -> int:
        return 0

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.patch_embed.in_chans:
            raise ValueError(
                f"Swin expects (B, {self.patch_embed.in_chans}, H, W), got {tuple(x.shape)}"
            )
        # Detectron2 names stage s `p{s}`.
        return {f"res{int(k[1:]) + 2}": v for k, v in super().forward(x).items()}


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg, input_shape: ShapeSpec) -> PETRSwinTransformer:
    """Build from `cfg.MODEL.SWIN`. `PRETRAIN_IMG_SIZE` is not read: it only sizes an absolute
    position embedding, which the released Swin models (and PETR) do not use."""
    s = cfg.MODEL.SWIN
    return PETRSwinTransformer(
        patch_size=s.PATCH_SIZE,
        in_chans=input_shape.channels,
        embed_dim=s.EMBED_DIM,
        depths=list(s.DEPTHS),
        num_heads=list(s.NUM_HEADS),
        window_size=s.WINDOW_SIZE,
        mlp_ratio=s.MLP_RATIO,
        qkv_bias=s.QKV_BIAS,
        drop_rate=s.DROP_RATE,
        attn_drop_rate=s.ATTN_DROP_RATE,
        drop_path_rate=s.DROP_PATH_RATE,
        patch_norm=s.PATCH_NORM,
        out_features=list(s.OUT_FEATURES),
        use_checkpoint=s.USE_CHECKPOINT,
    )
