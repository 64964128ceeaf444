"""Swin checkpoint conversion (petr/checkpoint/swin_keys.py, tools/convert_swin_pretrained.py):
official PETR (mmdet names) and Microsoft ImageNet checkpoints into our backbone."""

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
from petr_testing import OPERA_STATE_DICTS, REPO_ROOT, tiny_swin
from torch import nn

from petr.checkpoint.swin_keys import convert_microsoft_swin, convert_opera_swin_backbone
from petr.config import add_petr_config
from petr.modeling.backbone.swin import relative_position_index

SWINL_TSV = os.environ.get(
    "PETR_SWINL_TSV", os.path.join(OPERA_STATE_DICTS, "opera-state-dict-swinl-coco.tsv")
)


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
    ours = tiny_swin()
    ref = [MMDetPatchMerging(24 * 2**s) for s in range(3)]
    mm = _to_mmdet(ours.state_dict())
    for s, r in enumerate(ref):
        for name, t in r.state_dict().items():
            mm[f"backbone.stages.{s}.downsample.{name}"] = t
    conv = convert_opera_swin_backbone(mm)
    loaded = tiny_swin()
    loaded.load_state_dict(conv)  # strict: exactly our keys
    for k, v in ours.state_dict().items():
        if ".downsample." not in k:
            assert torch.equal(conv[k], v), k
    for s, r in enumerate(ref):
        x = torch.randn(2, 6, 10, 24 * 2**s)
        ours = loaded.layers[s].downsample(x.flatten(1, 2), 6, 10)  # (B, H/2 * W/2, 2C)
        torch.testing.assert_close(ours, r(x).flatten(1, 2))


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
    sd = _to_mmdet(tiny_swin().state_dict())
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
    src_model = tiny_swin()
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
    tool = runpy.run_path(os.path.join(REPO_ROOT, "tools", "convert_swin_pretrained.py"))
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
            self.backbone = tiny_swin()
            self.head = nn.Linear(2, 2)

    model = Wrapper()
    DetectionCheckpointer(model).load(str(dst))
    for k, v in src_model.state_dict().items():
        if not re.match(r"norm\d", k):
            assert torch.equal(model.backbone.state_dict()[k], v), k
    assert torch.equal(model.backbone.norm1.weight, torch.ones(48))  # missing: keeps its init
