"""PETRHungarianMatcher: costs by hand, assignments, people without joints, bad inputs."""

import dataclasses
import math

import pytest
import torch
from petr_testing import K, matcher, normalised, person, sigmoid, target


def test_matcher_picks_obvious_assignment_and_maps_original_gt_indices():
    torch.manual_seed(0)
    people = [person(40, 40), person(120, 60), person(180, 120)]
    t = target(people)
    kpts = torch.rand(1, 5, 2 * K)
    kpts[0, 4] = normalised(people[0][0])  # query 4 <-> GT 0
    kpts[0, 1] = normalised(people[1][0]) + 0.01  # query 1 <-> GT 1 (slightly off)
    kpts[0, 2] = normalised(people[2][0])  # query 2 <-> GT 2
    logits = torch.zeros(1, 5, 1)
    ((pred_idx, gt_idx),) = matcher()(logits, kpts, [t])
    assert pred_idx.tolist() == [1, 2, 4]
    assert gt_idx.tolist() == [1, 2, 0]
    assert pred_idx.dtype == gt_idx.dtype == torch.int64


def test_matcher_cost_terms_by_hand():
    kp, area = person(100, 80)
    gt = kp[None]
    perfect = normalised(kp)[None]
    # Perfect keypoints: L1 cost 0, OKS cost = -weight (OKS is 1, no "1 -").
    only_oks = matcher(cost_class=0.0, cost_kpt=0.0)
    c = only_oks.cost_matrix(torch.zeros(1), perfect, gt, torch.tensor([area]), (160, 224))
    assert c.item() == pytest.approx(-7.0, abs=1e-6)
    # Shift every x by 0.01: mean |dxy| over the 34 coords is 0.005, times 70.
    only_l1 = matcher(cost_class=0.0, cost_oks=0.0)
    shifted = perfect.clone()
    shifted[0, 0::2] += 0.01
    c = only_l1.cost_matrix(torch.zeros(1), shifted, gt, torch.tensor([area]), (160, 224))
    assert c.item() == pytest.approx(70 * 0.005, rel=1e-4)
    # Focal cost at logit x: 2 * (pos - neg) with mmdet's formula.
    only_cls = matcher(cost_kpt=0.0, cost_oks=0.0)
    x = 0.7
    c = only_cls.cost_matrix(torch.tensor([x]), perfect, gt, torch.tensor([area]), (160, 224))
    p = sigmoid(x)
    expected = 2 * (0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p))
    assert c.item() == pytest.approx(expected, rel=1e-5)


def test_matcher_oks_cost_in_pixels_with_area():
    kp, area = person(100, 80)
    pred = kp[:, :2].clone()
    pred[3, 0] += 6.0  # one joint 6 px off (sigma 0.035)
    d2, var = 36.0, (2 * 0.035) ** 2
    oks = (16 + math.exp(-d2 / (2 * area * var))) / 17
    m = matcher(cost_class=0.0, cost_kpt=0.0)
    c = m.cost_matrix(
        torch.zeros(1),
        normalised(torch.cat([pred, kp[:, 2:]], 1))[None],
        kp[None],
        torch.tensor([area]),
        (160, 224),
    )
    assert c.item() == pytest.approx(-7 * oks, rel=1e-5)


def test_invisible_joints_do_not_change_costs():
    visible = torch.ones(K, dtype=torch.bool)
    visible[[0, 5, 9]] = False
    kp, area = person(100, 80, visible=visible)
    preds = torch.rand(4, 2 * K)
    m = matcher()
    base = m.cost_matrix(torch.zeros(4), preds, kp[None], torch.tensor([area]), (160, 224))
    garbage = kp.clone()
    garbage[~visible, :2] = torch.tensor([float("nan"), -50.0])  # invisible: anything
    preds2 = preds.clone().reshape(4, K, 2)
    preds2[:, ~visible] = 0.9  # predictions at invisible joints do not matter
    other = m.cost_matrix(
        torch.zeros(4), preds2.reshape(4, -1), garbage[None], torch.tensor([area]), (160, 224)
    )
    torch.testing.assert_close(base, other)


def test_matcher_skips_people_without_visible_joints_and_empty_images():
    nobody = person(50, 50, visible=torch.zeros(K, dtype=torch.bool))
    t = target([nobody, person(120, 60)])
    kpts = torch.rand(2, 6, 2 * K)
    res = matcher()(torch.zeros(2, 6, 1), kpts, [t, target([])])
    assert res[0][1].tolist() == [1]  # only the person with joints, original index kept
    assert res[1][0].numel() == 0 and res[1][1].numel() == 0


def test_encoder_match_is_over_all_tokens():
    people = [person(60, 60)]
    t = target(people)
    s = 1000
    kpts = torch.rand(1, s, 2 * K)
    kpts[0, 777] = normalised(people[0][0])
    ((pred_idx, gt_idx),) = matcher()(torch.zeros(1, s, 1), kpts, [t])
    assert pred_idx.tolist() == [777] and gt_idx.tolist() == [0]


def test_matcher_rejects_bad_shapes():
    t = target([person(60, 60)])
    with pytest.raises(ValueError, match="kpts must be"):
        matcher()(torch.zeros(1, 3, 1), torch.rand(1, 3, 2 * K - 2), [t])
    bad = dataclasses.replace(t, keypoints=torch.zeros(1, K, 2))
    with pytest.raises(ValueError, match=r"targets\[0\]\.keypoints"):
        matcher()(torch.zeros(1, 3, 1), torch.rand(1, 3, 2 * K), [bad])
    with pytest.raises(ValueError, match="areas"):
        no_area = dataclasses.replace(t, areas=torch.zeros(1))
        matcher()(torch.zeros(1, 3, 1), torch.rand(1, 3, 2 * K), [no_area])
