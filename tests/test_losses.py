"""PETR's loss terms and their official normalisers, by hand (through the criterion, which
applies the weights and normalisers of petr.modeling.losses)."""

import math

import pytest
import torch
from petr_testing import (
    EPS32,
    K,
    criterion,
    focal_neg,
    focal_pos,
    normalised,
    outputs_for,
    person,
    target,
)

from petr.modeling import losses as losses_mod


def test_focal_and_perfect_prediction_losses_by_hand():
    kp, area = person(100, 80)
    t = target([(kp, area)])
    crit = criterion()
    logits = torch.tensor([1.5, -0.5, 0.3]).reshape(1, 1, 3, 1)
    kpts = torch.full((1, 1, 3, 2 * K), 0.5)
    kpts[0, 0, 0] = normalised(kp)  # query 0 is perfect
    out = outputs_for(logits, kpts)
    losses = crit(out, [t])
    # One positive: normaliser max(1, 1) + eps.
    expected = 2 * (focal_pos(1.5) + focal_neg(-0.5) + focal_neg(0.3)) / (1 + EPS32)
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-6)
    assert losses["loss_kpt"].item() < 1e-5
    assert losses["loss_oks"].item() < 1e-5


def test_l1_is_normalised_by_visible_coordinates_and_oks_by_hand():
    visible = torch.zeros(K, dtype=torch.bool)
    visible[[3, 8]] = True  # 2 visible joints -> 4 coords
    kp, area = person(100, 80, visible=visible)
    t = target([(kp, area)])
    pred = torch.full((K, 2), 0.5)
    pred[3] = kp[3, :2] / torch.tensor([224.0, 160.0]) + torch.tensor([0.02, 0.0])
    pred[8] = kp[8, :2] / torch.tensor([224.0, 160.0])
    crit = criterion()
    out = outputs_for(torch.zeros(1, 1, 1, 1), pred.reshape(1, 1, 1, -1))
    losses = crit(out, [t])
    assert losses["loss_kpt"].item() == pytest.approx(70 * 0.02 / 4, rel=1e-4)
    dx = 0.02 * 224  # pixels
    oks = (math.exp(-(dx**2) / (2 * area * (2 * 0.035) ** 2)) + 1) / 2
    assert losses["loss_oks"].item() == pytest.approx(2 * -math.log(oks), rel=1e-4)


def test_oks_loss_clamps_at_1e6():
    kp, area = person(100, 80, area=10.0)
    t = target([(kp, area)])
    far = torch.zeros(1, 1, 1, 2 * K)  # every joint at the image corner, far off
    crit = criterion()
    losses = crit(outputs_for(torch.zeros(1, 1, 1, 1), far), [t])
    assert losses["loss_oks"].item() == pytest.approx(2 * -math.log(1e-6), rel=1e-5)


def test_normalisers_average_over_processes(monkeypatch):
    """With 2 processes the counts are averaged: the other rank has 3 positives, we have 1."""
    kp, area = person(100, 80)
    t = target([(kp, area)])
    crit = criterion()
    logits = torch.tensor([1.0, -1.0]).reshape(1, 1, 2, 1)
    kpts = torch.full((1, 1, 2, 2 * K), 0.5)
    out = outputs_for(logits, kpts)
    single = crit(out, [t])

    other_rank = {1.0: 3.0, 34.0: 102.0}  # our count -> the other rank's count

    def all_reduce(value):  # gets our count / 2; leaves the mean of both ranks' counts
        ours = value.item() * 2
        value.fill_((ours + other_rank[ours]) / 2)

    monkeypatch.setattr(losses_mod.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    synced = crit(out, [t])
    # cls / OKS: mean(1, 3) = 2 positives instead of 1; L1: mean(34, 102) = 68 coords, not 34.
    assert synced["loss_cls"].item() == pytest.approx(single["loss_cls"].item() / 2, rel=1e-6)
    assert synced["loss_oks"].item() == pytest.approx(single["loss_oks"].item() / 2, rel=1e-6)
    assert synced["loss_kpt"].item() == pytest.approx(single["loss_kpt"].item() / 2, rel=1e-6)


def test_heatmap_loss_ignores_padding_for_negatives():
    t = target([person(60, 50)])
    crit = criterion()
    kpts = torch.rand(1, 1, 3, 2 * K)
    hm = torch.zeros(1, K, 20, 28)
    pad = torch.zeros(1, 20, 28, dtype=torch.bool)
    pad[:, :, 20:] = True
    base = crit(
        outputs_for(torch.zeros(1, 1, 3, 1), kpts, hm_logits=hm, hm_padding_mask=pad),
        [t],
    )["loss_hm"]
    hm2 = hm.clone()
    hm2[..., 20:] = 8.0  # confident "person" in the padding: not penalised
    moved = crit(
        outputs_for(torch.zeros(1, 1, 3, 1), kpts, hm_logits=hm2, hm_padding_mask=pad),
        [t],
    )["loss_hm"]
    torch.testing.assert_close(base, moved)
    hm2[..., :20] = 8.0  # ... but it is inside the image
    assert (
        crit(
            outputs_for(torch.zeros(1, 1, 3, 1), kpts, hm_logits=hm2, hm_padding_mask=pad),
            [t],
        )["loss_hm"]
        > base
    )
