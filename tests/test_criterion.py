"""PETRCriterion: matching every layer, the 16 loss keys, joint-decoder targets, batches without
people, and its errors."""

import dataclasses
import math

import pytest
import torch
from petr_testing import (
    EPS32,
    WEIGHTS,
    K,
    criterion,
    focal_neg,
    normalised,
    outputs_for,
    person,
    target,
)

from petr.data.metadata import COCO_OKS_SIGMAS
from petr.modeling.criterion import OPERA_LOSS_KEYS


def test_invisible_joints_are_ignored_by_losses():
    visible = torch.ones(K, dtype=torch.bool)
    visible[[1, 2, 16]] = False
    kp, area = person(100, 80, visible=visible)
    t1 = target([(kp, area)])
    kp2 = kp.clone()
    kp2[~visible, :2] = torch.tensor([777.0, float("nan")])  # garbage on invisible joints
    t2 = dataclasses.replace(t1, keypoints=kp2[None])
    kpts = torch.rand(1, 1, 4, 2 * K)
    logits = torch.randn(1, 1, 4, 1)
    crit = criterion()
    hm = torch.randn(1, K, 20, 28)
    pad = torch.zeros(1, 20, 28, dtype=torch.bool)
    l1 = crit(outputs_for(logits, kpts, hm_logits=hm, hm_padding_mask=pad), [t1])
    kpts2 = kpts.clone().reshape(1, 1, 4, K, 2)
    kpts2[..., ~visible, :] = 0.1
    kpts2 = kpts2.reshape(1, 1, 4, -1)
    l2 = crit(outputs_for(logits, kpts2, hm_logits=hm, hm_padding_mask=pad), [t2])
    for key in l1:
        torch.testing.assert_close(l1[key], l2[key])


def test_sixteen_keys_and_gradients_reach_every_output():
    torch.manual_seed(0)
    targets = [target([person(60, 60), person(150, 100)]), target([person(100, 80)])]
    crit = criterion()
    pose_logits = torch.randn(3, 2, 10, 1, requires_grad=True)
    pose_kpts = torch.rand(3, 2, 10, 2 * K).requires_grad_()
    enc_logits = torch.randn(2, 50, 1, requires_grad=True)
    enc_kpts = torch.rand(2, 50, 2 * K).requires_grad_()
    joint = torch.rand(2, 3, K, 2).requires_grad_()
    hm = torch.randn(2, K, 20, 28, requires_grad=True)
    pad = torch.zeros(2, 20, 28, dtype=torch.bool)
    pad[1, :, 24:] = True
    out = outputs_for(
        pose_logits,
        pose_kpts,
        joint,
        enc_logits=enc_logits,
        enc_kpts=enc_kpts,
        hm_logits=hm,
        hm_padding_mask=pad,
    )
    losses = crit(out, targets)
    assert set(losses) == set(OPERA_LOSS_KEYS.values())
    assert len(losses) == 16
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    for name, t in [("pose_logits", pose_logits), ("pose_kpts", pose_kpts),
                    ("enc_logits", enc_logits), ("enc_kpts", enc_kpts), ("joint", joint),
                    ("hm", hm)]:  # fmt: skip
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    # Every pose layer has its own gradient (not only the last one).
    assert all(pose_kpts.grad[i].abs().sum() > 0 for i in range(3))


def test_joint_losses_use_last_layer_targets_in_query_order():
    people = [person(60, 60), person(150, 100)]
    t = target(people)
    crit = criterion()
    kpts = torch.rand(1, 1, 6, 2 * K)
    kpts[0, 0, 5] = normalised(people[0][0])
    kpts[0, 0, 2] = normalised(people[1][0])
    out = outputs_for(torch.zeros(1, 1, 6, 1), kpts)
    last = crit.match(out, [t]).last
    assert last.pred_idx.tolist() == [2, 5] and last.gt_idx.tolist() == [1, 0]
    # Joint outputs ordered by ascending query: person 1 first, then person 0; perfect.
    perfect = torch.stack([p[0][:, :2] / torch.tensor([224.0, 160.0]) for p in people[::-1]])
    shifted = perfect + torch.tensor([0.01, 0.0])
    out.joint_kpts = torch.stack([perfect, shifted])
    losses = crit(out, [t])
    assert losses["loss_kpt_refine_0"].item() < 1e-5
    assert losses["loss_oks_refine_0"].item() < 1e-5
    # Layer 1: every x off by 0.01 -> sum 2*17*0.01 over 2*34 visible coords, times 80.
    assert losses["loss_kpt_refine_1"].item() == pytest.approx(80 * 0.005, rel=1e-4)
    # OKS: every joint 2.24 px off; -log OKS summed over the 2 instances, divided by N = 2.
    area = people[0][1]
    oks = sum(math.exp(-(2.24**2) / (2 * area * (2 * s) ** 2)) for s in COCO_OKS_SIGMAS) / K
    expected = 3 * 2 * -math.log(oks) / 2
    assert losses["loss_oks_refine_1"].item() == pytest.approx(expected, rel=1e-4)


def test_empty_batch_gives_finite_losses_and_dummy_joint_zero():
    targets = [target([]), target([])]
    crit = criterion()
    logits = torch.tensor([[0.2, -1.0], [0.4, 3.0]]).reshape(1, 2, 2, 1).requires_grad_()
    kpts = torch.rand(1, 2, 2, 2 * K).requires_grad_()
    joint = torch.rand(2, 1, K, 2).requires_grad_()
    hm = torch.zeros(2, K, 4, 4, requires_grad=True)
    out = outputs_for(
        logits, kpts, joint, hm_logits=hm, hm_padding_mask=torch.zeros(2, 4, 4, dtype=torch.bool)
    )
    losses = crit(out, targets)
    neg = sum(focal_neg(x) for x in (0.2, -1.0, 0.4, 3.0))
    assert losses["loss_cls"].item() == pytest.approx(2 * neg / (1 + EPS32), rel=1e-6)
    assert losses["loss_kpt"].item() == 0 and losses["loss_oks"].item() == 0
    assert losses["loss_kpt_refine_1"].item() == 0 and losses["loss_oks_refine_0"].item() == 0
    # No peaks: the heatmap loss is the plain negative sum: 2*17*16 pixels at p = 0.5.
    expected_hm = 4 * 2 * K * 16 * (-math.log(0.5) * 0.25)
    assert losses["loss_hm"].item() == pytest.approx(expected_hm, rel=1e-5)
    sum(losses.values()).backward()
    assert joint.grad is not None and kpts.grad is not None  # still in the graph


def test_image_without_people_next_to_one_with_people():
    targets = [target([]), target([person(100, 80)])]
    crit = criterion()
    kpts = torch.rand(1, 2, 4, 2 * K)
    kpts[0, 1, 3] = normalised(targets[1].keypoints[0])
    out = outputs_for(torch.zeros(1, 2, 4, 1), kpts)
    out.joint_kpts = kpts[0, 1, 3].reshape(1, 1, K, 2).repeat(2, 1, 1, 1)
    losses = crit(out, targets)
    last = crit.match(out, targets).last
    assert last.counts == (0, 1)  # image 0 has no match
    assert last.batch_idx.tolist() == [1] and last.pred_idx.tolist() == [3]
    assert losses["loss_kpt"].item() < 1e-5 and losses["loss_kpt_refine_0"].item() < 1e-5


def test_missing_or_unknown_weight_raises():
    t = target([person(60, 50)])
    no_hm = {k: v for k, v in WEIGHTS.items() if k != "hm"}
    crit = criterion(weights=no_hm)
    out = outputs_for(
        torch.zeros(1, 1, 3, 1),
        torch.rand(1, 1, 3, 2 * K),
        hm_logits=torch.zeros(1, K, 4, 4),
        hm_padding_mask=torch.zeros(1, 4, 4, dtype=torch.bool),
    )
    with pytest.raises(KeyError, match="'hm'"):
        crit(out, [t])
    out.hm_logits = None
    assert "loss_hm" not in crit(out, [t])  # no heatmap branch, no weight needed
    with pytest.raises(KeyError, match="unknown loss weights"):
        criterion(weights=dict(WEIGHTS, kpt_rpn=70.0))


def test_joint_outputs_must_match_the_number_of_matches():
    t = target([person(60, 50), person(150, 100)])
    crit = criterion()
    out = outputs_for(
        torch.zeros(1, 1, 5, 1), torch.rand(1, 1, 5, 2 * K), joint_kpts=torch.rand(2, 3, K, 2)
    )
    with pytest.raises(ValueError, match=r"joint_kpts.*2 matched"):
        crit(out, [t])


def test_joint_decoder_inputs_are_the_last_layer_matches_or_one_dummy():
    crit = criterion()
    kpts = torch.rand(2, 2, 4, 2 * K)
    targets = [target([]), target([person(100, 80), person(40, 40)])]
    kpts[1, 1, 3] = normalised(targets[1].keypoints[0])
    kpts[1, 1, 0] = normalised(targets[1].keypoints[1])
    out = outputs_for(torch.zeros(2, 2, 4, 1), kpts)
    poses, counts = crit.joint_decoder_inputs(out, crit.match(out, targets))
    assert counts == [0, 2]
    torch.testing.assert_close(poses, kpts[1, 1, [0, 3]], rtol=0, atol=0)  # ascending query
    assert not poses.requires_grad
    # No positive in the batch: one zero pose on image 0, so the joint decoder still runs.
    empty = [target([]), target([])]
    poses, counts = crit.joint_decoder_inputs(out, crit.match(out, empty))
    assert counts == [1, 0]
    assert poses.shape == (1, 2 * K) and not poses.any()
