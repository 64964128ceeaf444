"""Swin backbone: shapes, window locality and masking, gradients, checkpoint conversion."""

import contextlib
import io
import os
import re
import runpy

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from petr_testing import OPERA_STATE_DICTS
from torch import nn

from petr.checkpoint.swin_keys import convert_microsoft_swin, convert_opera_swin_backbone
from petr.config import add_petr_config
from petr.modeling.backbone.swin import (
    PETRSwinTransformer,
    SwinBlock,
    SwinStage,
    relative_position_index,
    shifted_window_mask,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWINL_TSV = os.environ.get(
    "PETR_SWINL_TSV", os.path.join(OPERA_STATE_DICTS, "opera-state-dict-swinl-coco.tsv")
)
TINY = dict(embed_dim=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 3, 4], window_size=7)


def tiny(**kw):
    return PETRSwinTransformer(**{**TINY, "drop_path_rate": 0.0, **kw})


@pytest.mark.parametrize("hw", [(97, 131), (32, 32), (5, 9)])
def test_output_shapes_and_strides(hw):
    m = tiny(out_features=["res2", "res3", "res4", "res5"]).eval()
    h, w = hw
    with torch.no_grad():
        out = m(torch.randn(2, 3, h, w))
    assert m.size_divisibility == 0
    for name, spec in m.output_shape().items():
        s = int(name[3:]) - 2
        assert (spec.channels, spec.stride) == (24 * 2**s, 4 * 2**s)
        size = (-(-h // spec.stride), -(-w // spec.stride))  # ceil division
        assert out[name].shape == (2, spec.channels, *size), name


def test_unrequested_stages_are_not_built():
    m = tiny(out_features=["res3"])
    assert len(m.layers) == 2 and m.layers[1].downsample is None
    assert [k for k in m.state_dict() if re.fullmatch(r"norm\d\.weight", k)] == ["norm1.weight"]
    with pytest.raises(ValueError, match="res6"):
        tiny(out_features=["res6"])


def test_build_from_config():
    cfg = get_cfg()
    add_petr_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_swin_backbone"
    cfg.MODEL.SWIN.EMBED_DIM = 24
    cfg.MODEL.SWIN.NUM_HEADS = [1, 2, 3, 4]
    m = build_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(m, PETRSwinTransformer)
    shapes = {k: (v.channels, v.stride) for k, v in m.output_shape().items()}
    assert shapes == {"res3": (48, 8), "res4": (96, 16), "res5": (192, 32)}
    assert [len(stage.blocks) for stage in m.layers] == [2, 2, 18, 2]


def test_relative_position_index_by_definition():
    w = 3
    idx = relative_position_index(w)
    for i in range(w * w):
        for j in range(w * w):
            dy, dx = i // w - j // w, i % w - j % w
            assert idx[i, j] == (dy + w - 1) * (2 * w - 1) + (dx + w - 1)


# ---- window locality: which output tokens change when one input token changes ----------------


def _groups(n, window, shift):
    """Token groups along one axis that may attend to each other (padded grid cut back to n)."""
    # Shifted: windows start at `shift`; the wrapped last window is split by the mask at 0.
    cuts = list(range(0, n, window)) if shift == 0 else [0, *range(shift, n, window)]
    return [range(a, min(b, n)) for a, b in zip(cuts, [*cuts[1:], n])]


def _reach(tokens, n, window, shift):
    """Tokens influenced by `tokens` through one (shifted-)window attention."""
    by_axis = _groups(n, window, shift)
    group = {i: g for g in by_axis for i in g}
    return {(y, x) for ty, tx in tokens for y in group[ty] for x in group[tx]}


def _changed(fn, n, c, token):
    x = torch.randn(1, n, n, c, dtype=torch.float64)
    x2 = x.clone()
    x2[0, token[0], token[1]] += torch.randn(c, dtype=torch.float64)
    with torch.no_grad():
        diff = (fn(x2) - fn(x)).abs().amax(-1)[0]
    assert ((diff > 1e-6) | (diff < 1e-10)).all(), "ambiguous change"
    return {tuple(t) for t in (diff > 1e-6).nonzero().tolist()}


def _randomise(m):
    torch.manual_seed(0)
    for p in m.parameters():
        nn.init.normal_(p, std=0.3)  # make every interaction clearly measurable
    return m.double().eval()


@pytest.mark.parametrize("n", [14, 12])  # 12: padded to 14 inside the block
@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("token", [(13, 13), (6, 6), (0, 5), (9, 2)])
def test_block_attends_within_its_window(n, shift, token):
    token = (min(token[0], n - 1), min(token[1], n - 1))
    blk = _randomise(SwinBlock(8, 2, 7, shift, 2.0, True, 0.0, 0.0, 0.0))
    hp = -(-n // 7) * 7
    mask = shifted_window_mask(hp, hp, 7, 3).double() if shift else None
    assert _changed(lambda x: blk(x, mask), n, 8, token) == _reach([token], n, 7, shift)


def test_shift_mask_is_what_separates_wrapped_regions():
    blk = _randomise(SwinBlock(8, 2, 7, 3, 2.0, True, 0.0, 0.0, 0.0))
    mask = shifted_window_mask(14, 14, 7, 3).double()
    assert (0, 0) not in _changed(lambda x: blk(x, mask), 14, 8, (13, 13))
    # Without the mask, the cyclic shift puts (13, 13) and (0, 0) in one window.
    assert (0, 0) in _changed(lambda x: blk(x, None), 14, 8, (13, 13))


def _reference_block(blk, x, shift, ws=7):
    """Naive Swin block (one image): pad after norm1, roll, then per-window attention with the
    relative bias and the -100 region mask spelled out token by token."""
    _, h, w, c = x.shape
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    y = torch.zeros(1, hp, wp, c, dtype=x.dtype)
    y[:, :h, :w] = blk.norm1(x)
    heads = blk.attn.relative_position_bias_table.shape[1]
    local = [(a, b) for a in range(ws) for b in range(ws)]
    # Table row of the offset (dy, dx) between token n=(an, bn) and token m=(am, bm).
    rows = [
        [(an - am + ws - 1) * (2 * ws - 1) + bn - bm + ws - 1 for am, bm in local]
        for an, bn in local
    ]
    bias = blk.attn.relative_position_bias_table[torch.tensor(rows)].permute(2, 0, 1)

    def region(r, n):
        return 0 if r < n - ws else 1 if r < n - shift else 2

    out = torch.zeros_like(y)
    for wy in range(0, hp, ws):
        for wx in range(0, wp, ws):
            rolled = [(wy + a, wx + b) for a, b in local]
            orig = [((r + shift) % hp, (q + shift) % wp) for r, q in rolled]
            t = torch.stack([y[0, i, j] for i, j in orig])
            q, k, v = blk.attn.qkv(t).view(ws * ws, 3, heads, -1).unbind(1)
            logits = torch.einsum("nhd,mhd->hnm", q, k) * q.shape[-1] ** -0.5 + bias
            if shift:
                ids = torch.tensor([region(r, hp) * 3 + region(q, wp) for r, q in rolled])
                logits = logits - 100.0 * (ids[:, None] != ids[None, :])
            o = blk.attn.proj(torch.einsum("hnm,mhd->nhd", logits.softmax(-1), v).flatten(1))
            for (i, j), val in zip(orig, o):
                out[0, i, j] = val
    x = x + out[:, :h, :w]
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("shift", [0, 3])
def test_block_matches_naive_reference_on_padded_input(shift):
    blk = _randomise(SwinBlock(8, 2, 7, shift, 2.0, True, 0.0, 0.0, 0.0))
    x = torch.randn(1, 12, 16, 8, dtype=torch.float64)
    mask = shifted_window_mask(14, 21, 7, 3).double()
    with torch.no_grad():
        torch.testing.assert_close(blk(x, mask), _reference_block(blk, x, shift))


@pytest.mark.parametrize("n", [14, 17])
def test_stage_alternates_regular_and_shifted_windows(n):
    stage = _randomise(SwinStage(8, 2, 2, 7, 2.0, True, 0.0, 0.0, [0.0, 0.0], False, False))
    token = (6, 8)
    expected = _reach(_reach([token], n, 7, 0), n, 7, 3)
    assert _changed(stage, n, 8, token) == expected


# ---- training ----------------------------------------------------------------------------------


def _weighted_loss(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return sum((v * torch.randn(v.shape, generator=g)).sum() for v in outs.values())


def test_gradients_reach_every_parameter_and_checkpointing_matches():
    torch.manual_seed(0)
    m = tiny().train()
    x = torch.randn(2, 3, 33, 47)
    _weighted_loss(m(x)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    m_cp = tiny(use_checkpoint=True).train()
    m_cp.load_state_dict(m.state_dict())
    _weighted_loss(m_cp(x)).backward()
    for (name, p), p_cp in zip(m.named_parameters(), m_cp.parameters()):
        torch.testing.assert_close(p_cp.grad, p.grad, msg=name)


def test_drop_path_drops_whole_samples():
    m = tiny(drop_path_rate=0.5)
    dp = m.layers[3].blocks[1].drop_path
    assert dp.p == 0.5 and m.layers[0].blocks[0].drop_path.p == 0.0  # linear over depth
    x = torch.ones(64, 3, 5)
    y = dp.train()(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    assert torch.equal(dp.eval()(x), x)


# ---- conversion --------------------------------------------------------------------------------

# Ours -> mmdet names, written independently of the converter (whose direction is the reverse).
_TO_MMDET = [
    (r"patch_embed\.proj\.", "patch_embed.projection."),
    (r"^layers\.", "stages."),
    (r"\.attn\.(?!w_msa)", ".attn.w_msa."),
    (r"\.mlp\.fc1\.", ".ffn.layers.0.0."),
    (r"\.mlp\.fc2\.", ".ffn.layers.1."),
]


def _to_mmdet(sd):
    out = {}
    for k, v in sd.items():
        for pattern, repl in _TO_MMDET:
            k = re.sub(pattern, repl, k)
        out["backbone." + k] = v
    return out


class MMDetPatchMerging(nn.Module):
    """mmdet's layout: nn.Unfold(2, stride 2) (channel-major, then (0,0),(0,1),(1,0),(1,1))."""

    def __init__(self, c):
        super().__init__()
        self.unfold = nn.Unfold(kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(4 * c)
        self.reduction = nn.Linear(4 * c, 2 * c, bias=False)
        nn.init.normal_(self.norm.weight)
        nn.init.normal_(self.norm.bias)

    def forward(self, x):  # (B, H, W, C) -> (B, H/2, W/2, 2C)
        b, h, w, _ = x.shape
        y = self.unfold(x.permute(0, 3, 1, 2)).transpose(1, 2)  # (B, H/2*W/2, 4C)
        return self.reduction(self.norm(y)).view(b, h // 2, w // 2, -1)


def test_opera_conversion_matches_mmdet_patch_merging():
    torch.manual_seed(0)
    ours = tiny()
    ref = [MMDetPatchMerging(24 * 2**s) for s in range(3)]
    mm = _to_mmdet(ours.state_dict())
    for s, r in enumerate(ref):
        for name, t in r.state_dict().items():
            mm[f"backbone.stages.{s}.downsample.{name}"] = t
    conv = convert_opera_swin_backbone(mm)
    loaded = tiny()
    loaded.load_state_dict(conv)  # strict: exactly our keys
    for k, v in ours.state_dict().items():
        if ".downsample." not in k:
            assert torch.equal(conv[k], v), k
    for s, r in enumerate(ref):
        x = torch.randn(2, 6, 10, 24 * 2**s)
        torch.testing.assert_close(loaded.layers[s].downsample(x), r(x))


def _swinl_mmdet_shapes():
    """Names and shapes of an mmdet Swin-L backbone (PETR's), from its architecture."""
    shapes = {
        "patch_embed.projection.weight": (192, 3, 4, 4),
        "patch_embed.projection.bias": (192,),
    }
    shapes.update({"patch_embed.norm.weight": (192,), "patch_embed.norm.bias": (192,)})
    for s, (depth, heads) in enumerate(zip([2, 2, 18, 2], [6, 12, 24, 48])):
        c = 192 * 2**s
        for b in range(depth):
            p = f"stages.{s}.blocks.{b}."
            linear = {
                "attn.w_msa.qkv": (3 * c, c),
                "attn.w_msa.proj": (c, c),
                "ffn.layers.0.0": (4 * c, c),
                "ffn.layers.1": (c, 4 * c),
            }
            for n, (o, i) in linear.items():
                shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (o, i), (o,)
            for n in ("norm1", "norm2"):
                shapes[p + n + ".weight"] = shapes[p + n + ".bias"] = (c,)
            shapes[p + "attn.w_msa.relative_position_bias_table"] = (169, heads)
            shapes[p + "attn.w_msa.relative_position_index"] = (49, 49)
        if s < 3:
            shapes[f"stages.{s}.downsample.norm.weight"] = (4 * c,)
            shapes[f"stages.{s}.downsample.norm.bias"] = (4 * c,)
            shapes[f"stages.{s}.downsample.reduction.weight"] = (2 * c, 4 * c)
        if s > 0:
            shapes[f"norm{s}.weight"] = shapes[f"norm{s}.bias"] = (c,)
    return {"backbone." + k: v for k, v in shapes.items()}


def test_swinl_names_match_official_checkpoint_listing():
    with open(SWINL_TSV) as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    listed = {n: tuple(int(d) for d in re.findall(r"\d+", s)) for n, s, _ in rows}
    listed = {n: s for n, s in listed.items() if n.startswith("backbone.")}
    assert listed == _swinl_mmdet_shapes()


def test_opera_swinl_conversion_gives_exactly_our_swinl_state_dict():
    cfg = get_cfg()
    add_petr_config(cfg)  # defaults are Swin-L
    cfg.MODEL.BACKBONE.NAME = "build_swin_backbone"
    with torch.device("meta"):
        model = build_backbone(cfg, ShapeSpec(channels=3))
    index = relative_position_index(7)
    src = {
        k: index.clone() if k.endswith("index") else torch.empty(s, device="meta")
        for k, s in _swinl_mmdet_shapes().items()
    }
    conv = convert_opera_swin_backbone(src)
    assert {k: tuple(v.shape) for k, v in conv.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }
    assert len(conv) == 355
    assert {k for k in conv if re.fullmatch(r"norm\d\.\w+", k)} == {
        f"norm{s}.{p}" for s in (1, 2, 3) for p in ("weight", "bias")
    }


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.update({"backbone.stages.0.blocks.0.attn.w_msa.foo": 0}), "w_msa.foo"),
        (lambda sd: sd.update({"neck.convs.0.conv.weight": 0}), "neck.convs.0.conv.weight"),
        (lambda sd: sd.update({"backbone.absolute_pos_embed": 0}), "absolute_pos_embed"),
        (lambda sd: sd.pop("backbone.stages.1.blocks.1.ffn.layers.1.bias"), "mlp.fc2.bias"),
        (
            lambda sd: sd.update(
                {"backbone.stages.2.blocks.0.attn.w_msa.qkv.weight": torch.ones(5)}
            ),
            r"stages.2.blocks.0.attn.w_msa.qkv.weight: shape \(5,\)",
        ),
        (
            lambda sd: sd.update(
                {"backbone.stages.0.blocks.1.attn.w_msa.relative_position_index": torch.eye(49)}
            ),
            "stages.0.blocks.1.attn.w_msa.relative_position_index",
        ),
    ],
)
def test_opera_conversion_rejects_bad_input(edit, match):
    sd = _to_mmdet(tiny().state_dict())
    edit(sd)
    with pytest.raises(ValueError, match=match):
        convert_opera_swin_backbone(sd)


def _microsoft_checkpoint(model):
    sd = {k: v for k, v in model.state_dict().items() if not re.match(r"norm\d", k)}
    sd.update({"norm.weight": torch.ones(192), "norm.bias": torch.zeros(192)})
    sd.update({"head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)})
    sd["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    return {"model": sd}


def test_microsoft_conversion_and_tool_load_into_detectron2(tmp_path):
    torch.manual_seed(0)
    src_model = tiny()
    ckpt = _microsoft_checkpoint(src_model)
    del ckpt["model"]["layers.1.blocks.0.attn.relative_position_index"]  # some releases lack it
    conv, dropped = convert_microsoft_swin(ckpt)
    assert sorted(dropped) == sorted(
        ["norm.weight", "norm.bias", "head.weight", "head.bias", "layers.0.blocks.1.attn_mask"]
    )
    bad = {**ckpt["model"], "layers.0.blocks.0.attn.q_bias": torch.zeros(24)}
    with pytest.raises(ValueError, match="q_bias"):
        convert_microsoft_swin(bad)

    src, dst = tmp_path / "swin.pth", tmp_path / "petr_swin.pth"
    torch.save(ckpt, src)
    tool = runpy.run_path(os.path.join(REPO, "tools", "convert_swin_pretrained.py"))
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert tool["main"]([str(src), str(dst)]) == 0
    assert (
        "backbone.norm{s}" in log.getvalue() and "layers.*.blocks.*.attn_mask (1)" in log.getvalue()
    )
    saved = torch.load(dst)
    assert saved["__author__"] == "petr" and len(saved["model"]) == len(conv)

    class Wrapper(nn.Module):  # a PETR-like model: backbone plus something else
        def __init__(self):
            super().__init__()
            self.backbone = tiny()
            self.head = nn.Linear(2, 2)

    model = Wrapper()
    DetectionCheckpointer(model).load(str(dst))
    for k, v in src_model.state_dict().items():
        if not re.match(r"norm\d", k):
            assert torch.equal(model.backbone.state_dict()[k], v), k
    assert torch.equal(model.backbone.norm1.weight, torch.ones(48))  # missing: keeps its init
