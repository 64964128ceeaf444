"""Swin Transformer backbone (Liu et al., ICCV 2021) for Detectron2, for PETR's Swin-L configs.

Follows the detection variant of the official Microsoft Swin implementation, which is also what the
official PETR code (hikvision-research/opera, through mmdet's `SwinTransformer`) runs: fixed window
size at every resolution, inputs of any size padded internally (to the patch size, to window
multiples inside each block and to even sizes before patch merging), padded tokens are not masked
in window attention (as upstream), and each returned stage has its own output LayerNorm.

Parameter names follow the official Microsoft release so its ImageNet weights load after dropping
the classifier: `patch_embed.{proj,norm}`, `layers.{s}.blocks.{b}.{norm1,attn.qkv,attn.proj,
attn.relative_position_bias_table,attn.relative_position_index,norm2,mlp.fc1,mlp.fc2}`,
`layers.{s}.downsample.{reduction,norm}`. The per-output LayerNorms are named by stage index like
mmdet: `norm{s}` normalises stage s, i.e. res2 -> `norm0`, res3 -> `norm1`, res4 -> `norm2`,
res5 -> `norm3`. Only the norms of requested outputs exist.

Layout inside the network is channels-last `(B, H, W, C)`; outputs are `(B, C, H, W)`.
"""

import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

__all__ = ["PETRSwinTransformer", "build_swin_backbone", "relative_position_index"]

# Logit added between tokens of different shifted-window regions (the official value).
_MASK_VALUE = -100.0


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index into the `(2w-1)^2` relative-position bias table for every token pair of a window.

    Returns a LongTensor `(w*w, w*w)`: entry [i, j] = (dy + w-1) * (2w-1) + (dx + w-1), where
    (dy, dx) = position(i) - position(j) in tokens, tokens in row-major order.
    """
    w = window_size
    ys, xs = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, w*w)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, w*w, w*w)
    return (rel[0] + w - 1) * (2 * w - 1) + (rel[1] + w - 1)


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of w -> (B * H/w * W/w, w*w, C), windows row-major."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def window_reverse(windows: torch.Tensor, w: int, b: int, h: int, wd: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nW, w*w, C) -> (B, H, W, C)."""
    x = windows.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, -1)


def shifted_window_mask(h: int, w: int, window: int, shift: int, device=None) -> torch.Tensor:
    """Additive attention mask for shifted windows on a padded (h, w) grid (multiples of window).

    After the cyclic shift, a window at the bottom/right border holds tokens from up to 3x3
    regions that are not neighbours in the image; only tokens of the same region may attend to
    each other. Returns `(nW, window^2, window^2)` with 0 (same region) or -100 (different).
    """

    def regions(n):  # region id along one axis: [0, n-window) | [n-window, n-shift) | [n-shift, n)
        r = torch.zeros(n, device=device)
        r[n - window :] = 1
        r[n - shift :] = 2
        return r

    ids = regions(h)[:, None] * 3 + regions(w)[None, :]  # (h, w)
    ids = window_partition(ids[None, :, :, None], window).squeeze(-1)  # (nW, window^2)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, _MASK_VALUE)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `p`."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Swin: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B*nW, N, C) window tokens; mask: (nW, N, N) additive or None -> (B*nW, N, C)."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*nW, heads, N, C/heads)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(x))


class SwinBlock(nn.Module):
    """(Shifted-)window block: x += DropPath(W-MSA(LN(x))); x += DropPath(MLP(LN(x)))."""

    def __init__(
        self, dim, num_heads, window_size, shift_size, mlp_ratio, qkv_bias, drop, attn_drop, dpath
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"Swin: shift {shift_size} must be in [0, window {window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(dpath)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, H, W, C); attn_mask: (nW, w*w, w*w) for the padded grid, used if shifted."""
        b, h, w, c = x.shape
        ws, s = self.window_size, self.shift_size
        y = self.norm1(x)
        # Pad after the norm, so padded tokens are zeros (as upstream).
        y = F.pad(y, (0, 0, 0, (-w) % ws, 0, (-h) % ws))
        hp, wp = y.shape[1:3]
        if s > 0:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(y, ws), attn_mask if s > 0 else None)
        y = window_reverse(y, ws, b, hp, wp)
        if s > 0:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w, :])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbour concatenation (Microsoft order) + LayerNorm(4C) + Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); odd sizes are zero-padded bottom/right."""
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # x0=(0::2,0::2), x1=(1::2,0::2), x2=(0::2,1::2), x3=(1::2,1::2): channel = q*C + c.
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1
        )
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`depth` blocks alternating W-MSA / SW-MSA, then optional PatchMerging (called by the owner,
    so that the pre-merging features can be returned)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        dpaths: Sequence[float],
        downsample: bool,
        use_checkpoint: bool,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                shift_size=0 if i % 2 == 0 else self.shift_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop,
                attn_drop=attn_drop,
                dpath=dpaths[i],
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C), before downsampling."""
        ws = self.window_size
        h, w = x.shape[1:3]
        mask = None
        if len(self.blocks) > 1 and self.shift_size > 0:
            hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
            mask = shifted_window_mask(hp, wp, ws, self.shift_size, x.device).to(x.dtype)
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = cp.checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; the image is zero-padded to patch multiples first."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, ceil(H/p), ceil(W/p), embed_dim)."""
        p = self.patch_size
        x = F.pad(x, (0, (-x.shape[3]) % p, 0, (-x.shape[2]) % p))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class PETRSwinTransformer(Backbone):
    """Swin Transformer returning stage s as `res{s+2}` (stride 2^(s+2), channels embed_dim * 2^s).

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
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"Swin: depths {list(depths)} and num_heads {list(num_heads)} differ")
        names = [f"res{s + 2}" for s in range(len(depths))]
        bad = [f for f in out_features if f not in names]
        if bad or not out_features:
            raise ValueError(f"Swin: out_features {list(out_features)} must be among {names}")
        out_stages = sorted(names.index(f) for f in out_features)
        num_stages = out_stages[-1] + 1
        self._out_features = [names[s] for s in out_stages]
        self._out_feature_channels = {names[s]: embed_dim * 2**s for s in out_stages}
        self._out_feature_strides = {names[s]: patch_size * 2**s for s in out_stages}

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        # Drop-path rate grows linearly over all blocks of the full network (as upstream).
        # (Plain Python, so that the module can be built under `torch.device("meta")`.)
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.layers = nn.ModuleList()
        for s in range(num_stages):
            first = sum(depths[:s])
            stage = SwinStage(
                embed_dim * 2**s,
                depths[s],
                num_heads[s],
                window_size,
                mlp_ratio,
                qkv_bias,
                drop_rate,
                attn_drop_rate,
                dpaths=dpr[first : first + depths[s]],
                downsample=s < num_stages - 1,
                use_checkpoint=use_checkpoint,
            )
            self.layers.append(stage)
        self._out_stages = out_stages
        for s in out_stages:
            self.add_module(f"norm{s}", nn.LayerNorm(embed_dim * 2**s))
        self.apply(_init_weights)

    @property
    def size_divisibility(self) -> int:
        return 0

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(
                f"Swin expects (B, {self.patch_embed.proj.in_channels}, H, W), got {tuple(x.shape)}"
            )
        x = self.pos_drop(self.patch_embed(x))
        outs = {}
        for s, stage in enumerate(self.layers):
            x = stage(x)
            if s in self._out_stages:
                y = getattr(self, f"norm{s}")(x)
                outs[f"res{s + 2}"] = y.permute(0, 3, 1, 2).contiguous()
            if stage.downsample is not None:
                x = stage.downsample(x)
        return outs


def _init_weights(m: nn.Module) -> None:
    # Upstream init: truncated-normal Linear weights, zero biases, identity LayerNorms.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


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
