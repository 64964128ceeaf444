"""Swin backbone (Detectron2's, behind our builder): features equal to the implementation it
replaced, shapes, window locality and masking, gradients (conversion: test_swin_keys.py)."""

import re

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.swin import BasicLayer
from make_swin_fixture import FIXTURE, SIZES, checksum, seeded_images, seeded_state_dict
from petr_testing import tiny_swin
from torch import nn
from torchvision.ops import StochasticDepth

from petr.config import add_petr_config
from petr.modeling.backbone.swin import PETRSwinTransformer, relative_position_index


def test_features_equal_those_of_the_replaced_implementation():
    """tests/data/swin_tiny_features.pt: features of our former Swin (see make_swin_fixture.py)."""
    fixture = torch.load(FIXTURE, weights_only=True)
    m = PETRSwinTransformer(**fixture["arch"]).eval()
    # Same names and shapes: the former model's state dict loads unchanged.
    assert {k: list(v.shape) for k, v in m.state_dict().items()} == fixture["state_dict_shapes"]
    sd = seeded_state_dict(m.state_dict())
    assert checksum(sd.values()) == pytest.approx(fixture["weights_checksum"], rel=1e-12)
    m.load_state_dict(sd)
    for h, w in SIZES:
        x = seeded_images((h, w))
        assert checksum([x]) == pytest.approx(fixture["images_checksum"][f"{h}x{w}"], rel=1e-12)
        with torch.no_grad():
            out = m(x)
        expected = fixture["features"][f"{h}x{w}"]
        assert out.keys() == expected.keys() == {"res2", "res3", "res4", "res5"}
        for name, feature in expected.items():  # unit-scale features; measured diffs <= 2e-6
            torch.testing.assert_close(out[name], feature, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("hw", [(97, 131), (32, 32), (5, 9)])
def test_output_shapes_and_strides(hw):
    m = tiny_swin(out_features=["res2", "res3", "res4", "res5"]).eval()
    h, w = hw
    with torch.no_grad():
        out = m(torch.randn(2, 3, h, w))
    assert m.size_divisibility == 0
    for name, spec in m.output_shape().items():
        s = int(name[3:]) - 2
        assert (spec.channels, spec.stride) == (24 * 2**s, 4 * 2**s)
        size = (-(-h // spec.stride), -(-w // spec.stride))  # ceil division
        assert out[name].shape == (2, spec.channels, *size), name
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(2, 4, 8, 8\)"):
        m(torch.randn(2, 4, 8, 8))


def test_unrequested_stages_are_not_built():
    m = tiny_swin(out_features=["res3"])
    assert len(m.layers) == 2 and m.layers[1].downsample is None
    assert [k for k in m.state_dict() if re.fullmatch(r"norm\d\.weight", k)] == ["norm1.weight"]
    with pytest.raises(ValueError, match="res6"):
        tiny_swin(out_features=["res6"])


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


def _stage(shifts):
    """Detectron2's stage (it builds the shifted-window mask) holding blocks with these shifts."""
    stage = _randomise(BasicLayer(8, 2, 2, window_size=7, mlp_ratio=2.0))
    stage.blocks = nn.ModuleList(stage.blocks[1 if s else 0] for s in shifts)
    return lambda x: stage(x.flatten(1, 2), x.shape[1], x.shape[2])[0].view(x.shape)


@pytest.mark.parametrize("n", [14, 12])  # 12: padded to 14 inside the block
@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("token", [(13, 13), (6, 6), (0, 5), (9, 2)])
def test_block_attends_within_its_window(n, shift, token):
    token = (min(token[0], n - 1), min(token[1], n - 1))
    assert _changed(_stage([shift]), n, 8, token) == _reach([token], n, 7, shift)


def test_shift_mask_is_what_separates_wrapped_regions():
    assert (0, 0) not in _changed(_stage([3]), 14, 8, (13, 13))
    # Without the mask, the cyclic shift puts (13, 13) and (0, 0) in one window.
    blk = _randomise(BasicLayer(8, 2, 2, window_size=7, mlp_ratio=2.0)).blocks[1]
    blk.H = blk.W = 14
    assert (0, 0) in _changed(lambda x: blk(x.flatten(1, 2), None).view(x.shape), 14, 8, (13, 13))


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


def test_stage_matches_naive_reference_on_padded_input():
    stage = _randomise(BasicLayer(8, 2, 2, window_size=7, mlp_ratio=2.0))
    x = torch.randn(1, 12, 16, 8, dtype=torch.float64)
    with torch.no_grad():
        y, h, w, *_ = stage(x.flatten(1, 2), 12, 16)
        ref = _reference_block(stage.blocks[1], _reference_block(stage.blocks[0], x, 0), 3)
    torch.testing.assert_close(y.view(1, h, w, 8), ref)


@pytest.mark.parametrize("n", [14, 17])
def test_stage_alternates_regular_and_shifted_windows(n):
    token = (6, 8)
    expected = _reach(_reach([token], n, 7, 0), n, 7, 3)
    assert _changed(_stage([0, 3]), n, 8, token) == expected


# ---- training ----------------------------------------------------------------------------------


def _weighted_loss(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return sum((v * torch.randn(v.shape, generator=g)).sum() for v in outs.values())


def test_gradients_reach_every_parameter_and_checkpointing_matches():
    torch.manual_seed(0)
    m = tiny_swin().train()
    x = torch.randn(2, 3, 33, 47)
    _weighted_loss(m(x)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    m_cp = tiny_swin(use_checkpoint=True).train()
    m_cp.load_state_dict(m.state_dict())
    _weighted_loss(m_cp(x)).backward()
    for (name, p), p_cp in zip(m.named_parameters(), m_cp.parameters()):
        torch.testing.assert_close(p_cp.grad, p.grad, msg=name)


def test_drop_path_drops_whole_samples():
    m = tiny_swin(drop_path_rate=0.5, out_features=["res3"])  # rates still over all 8 blocks
    dp = m.layers[1].blocks[1].drop_path
    assert isinstance(m.layers[0].blocks[0].drop_path, nn.Identity)  # linear over depth, from 0
    assert isinstance(dp, StochasticDepth) and dp.p == pytest.approx(0.5 * 3 / 7)
    dp.p = 0.5
    x = torch.ones(64, 3, 5)
    y = dp.train()(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    assert torch.equal(dp.eval()(x), x)
