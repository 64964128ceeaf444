"""PETR matcher, losses, heatmap targets and criterion: hand-computable cases on CPU."""

import math

import pytest
import torch

from petr.data.metadata import COCO_OKS_SIGMAS
from petr.modeling import losses as losses_mod
from petr.modeling.criterion import OPERA_LOSS_KEYS, PETRCriterion, opera_loss_key
from petr.modeling.heatmap_target import build_heatmap_targets, gaussian_radius, heatmap_radius
from petr.modeling.matcher import PETRHungarianMatcher

K = 17
WEIGHTS = dict(
    cls=2.0, kpt=70.0, oks=2.0, hm=4.0, kpt_refine=80.0, oks_refine=3.0, cls_enc=2.0, kpt_enc=70.0
)
EPS32 = torch.finfo(torch.float32).eps


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def focal_pos(x):  # alpha 0.25, gamma 2, label 1
    p = sigmoid(x)
    return -0.25 * (1 - p) ** 2 * math.log(p)


def focal_neg(x):  # label 0
    p = sigmoid(x)
    return -0.75 * p**2 * math.log(1 - p)


def person(cx, cy, h=160, w=224, visible=None, spread=20.0, area=4000.0):
    """(K, 3) pixel keypoints around (cx, cy) on a deterministic pattern, and its area."""
    k = torch.arange(K, dtype=torch.float32)
    kpts = torch.stack(
        [cx + spread * torch.cos(k), cy + spread * torch.sin(k), 2 * torch.ones(K)], 1
    )
    kpts[:, 0].clamp_(0, w - 1)
    kpts[:, 1].clamp_(0, h - 1)
    if visible is not None:
        kpts[~visible] = 0.0
    return kpts, area


def target(people, h=160, w=224):
    if people:
        kpts = torch.stack([p[0] for p in people])
        areas = torch.tensor([p[1] for p in people])
    else:
        kpts, areas = torch.zeros(0, K, 3), torch.zeros(0)
    vis = kpts[..., 2] > 0
    big = torch.tensor(1e9)
    boxes = (
        torch.stack(
            [
                torch.where(vis, kpts[..., 0], big).amin(1),
                torch.where(vis, kpts[..., 1], big).amin(1),
                torch.where(vis, kpts[..., 0], -big).amax(1),
                torch.where(vis, kpts[..., 1], -big).amax(1),
            ],
            1,
        )
        if len(kpts)
        else torch.zeros(0, 4)
    )
    return {"keypoints": kpts, "areas": areas, "boxes": boxes, "image_size": (h, w)}


def normalised(kpts, h=160, w=224):
    """(K, 3) pixels -> (2K,) normalised interleaved."""
    return (kpts[:, :2] / torch.tensor([w, h])).reshape(-1)


def matcher(**kw):
    return PETRHungarianMatcher(oks_sigmas=COCO_OKS_SIGMAS, **kw)


def criterion(weights=WEIGHTS, m=None):
    return PETRCriterion(
        matcher=m or matcher(), num_keypoints=K, oks_sigmas=COCO_OKS_SIGMAS, weights=weights
    )


def outputs_for(crit, pose_logits, pose_kpts, targets, joint_kpts=None, **extra):
    """Pose-only outputs plus the last-layer match, as the model builds them."""
    out = {"pose_logits": pose_logits, "pose_kpts": pose_kpts}
    out["last_indices"] = crit.matcher(pose_logits[-1], pose_kpts[-1], targets)
    if joint_kpts is not None:
        out["joint_kpts"] = joint_kpts
    out.update(extra)
    return out


# --------------------------------------------------------------------------- matcher


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
    bad = dict(t, keypoints=torch.zeros(1, K, 2))
    with pytest.raises(ValueError, match=r"targets\[0\]\['keypoints'\]"):
        matcher()(torch.zeros(1, 3, 1), torch.rand(1, 3, 2 * K), [bad])
    with pytest.raises(ValueError, match="areas"):
        matcher()(torch.zeros(1, 3, 1), torch.rand(1, 3, 2 * K), [dict(t, areas=torch.zeros(1))])


# --------------------------------------------------------------------------- losses


def test_focal_and_perfect_prediction_losses_by_hand():
    kp, area = person(100, 80)
    t = target([(kp, area)])
    crit = criterion()
    logits = torch.tensor([1.5, -0.5, 0.3]).reshape(1, 1, 3, 1)
    kpts = torch.full((1, 1, 3, 2 * K), 0.5)
    kpts[0, 0, 0] = normalised(kp)  # query 0 is perfect
    out = outputs_for(crit, logits, kpts, [t])
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
    out = outputs_for(crit, torch.zeros(1, 1, 1, 1), pred.reshape(1, 1, 1, -1), [t])
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
    losses = crit(outputs_for(crit, torch.zeros(1, 1, 1, 1), far, [t]), [t])
    assert losses["loss_oks"].item() == pytest.approx(2 * -math.log(1e-6), rel=1e-5)


def test_invisible_joints_are_ignored_by_losses():
    visible = torch.ones(K, dtype=torch.bool)
    visible[[1, 2, 16]] = False
    kp, area = person(100, 80, visible=visible)
    t1 = target([(kp, area)])
    kp2 = kp.clone()
    kp2[~visible, :2] = torch.tensor([777.0, float("nan")])  # garbage on invisible joints
    t2 = dict(t1, keypoints=kp2[None])
    kpts = torch.rand(1, 1, 4, 2 * K)
    logits = torch.randn(1, 1, 4, 1)
    crit = criterion()
    hm = torch.randn(1, K, 20, 28)
    pad = torch.zeros(1, 20, 28, dtype=torch.bool)
    l1 = crit(outputs_for(crit, logits, kpts, [t1], hm_logits=hm, hm_padding_mask=pad), [t1])
    kpts2 = kpts.clone().reshape(1, 1, 4, K, 2)
    kpts2[..., ~visible, :] = 0.1
    kpts2 = kpts2.reshape(1, 1, 4, -1)
    l2 = crit(outputs_for(crit, logits, kpts2, [t2], hm_logits=hm, hm_padding_mask=pad), [t2])
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
        crit,
        pose_logits,
        pose_kpts,
        targets,
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
    out = outputs_for(crit, torch.zeros(1, 1, 6, 1), kpts, [t])
    ((pred_idx, gt_idx),) = out["last_indices"]
    assert pred_idx.tolist() == [2, 5]
    # Joint outputs ordered by ascending query: person 1 first, then person 0; perfect.
    perfect = torch.stack([p[0][:, :2] / torch.tensor([224.0, 160.0]) for p in people[::-1]])
    shifted = perfect + torch.tensor([0.01, 0.0])
    out["joint_kpts"] = torch.stack([perfect, shifted])
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
        crit,
        logits,
        kpts,
        targets,
        joint,
        joint_dummy=True,
        hm_logits=hm,
        hm_padding_mask=torch.zeros(2, 4, 4, dtype=torch.bool),
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
    kpts[0, 1, 3] = normalised(targets[1]["keypoints"][0])
    out = outputs_for(crit, torch.zeros(1, 2, 4, 1), kpts, targets)
    out["joint_kpts"] = kpts[0, 1, 3].reshape(1, 1, K, 2).repeat(2, 1, 1, 1)
    losses = crit(out, targets)
    assert out["last_indices"][0][0].numel() == 0
    assert out["last_indices"][1][0].tolist() == [3]
    assert losses["loss_kpt"].item() < 1e-5 and losses["loss_kpt_refine_0"].item() < 1e-5


def test_normalisers_average_over_processes(monkeypatch):
    """With 2 processes the counts are averaged: the other rank has 3 positives, we have 1."""
    kp, area = person(100, 80)
    t = target([(kp, area)])
    crit = criterion()
    logits = torch.tensor([1.0, -1.0]).reshape(1, 1, 2, 1)
    kpts = torch.full((1, 1, 2, 2 * K), 0.5)
    out = outputs_for(crit, logits, kpts, [t])
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


# --------------------------------------------------------------------------- heatmap


def test_gaussian_radius_values():
    # 10 x 10 cells, overlap 0.9: a3 = 3.6, b3 = -36, c3 = -10; the third (smallest) root
    # without the 1/(2a) factor is (b3 + sqrt(b3^2 - 4 a3 c3)) / 2 = (-36 + sqrt(1296 + 144)) / 2.
    r = gaussian_radius(torch.tensor(10.0), torch.tensor(10.0))
    assert r.item() == pytest.approx((-36 + math.sqrt(1440)) / 2, rel=1e-6)
    boxes = torch.tensor([[0.0, 0.0, 80.0, 80.0], [0.0, 0.0, 800.0, 800.0], [5.0, 5.0, 5.0, 5.0]])
    assert heatmap_radius(boxes).tolist() == [0, 3, 0]  # floor(0.97) = 0; clamp at 3; empty box


def test_heatmap_target_peak_radius_border_crop_and_max():
    s2 = 2 * (7 / 6) ** 2  # radius 3: diameter 7, sigma 7/6
    kp = torch.zeros(3, K, 3)
    kp[0, 0] = torch.tensor([83.0, 53.0, 2.0])  # cell (floor(83/8), floor(53/8)) = (10, 6)
    kp[1, 0] = torch.tensor([0.0, 0.0, 2.0])  # top-left corner: cropped gaussian
    kp[1, 1] = torch.tensor([50.0, 60.0, 0.0])  # invisible: nothing drawn
    kp[1, 2] = torch.tensor([26.0, 90.0, 2.0])  # cell (3, 11): two people overlap on joint 2
    kp[2, 2] = torch.tensor([39.9, 95.0, 2.0])  # cell (4, 11)
    boxes = torch.tensor([[0.0, 0.0, 800.0, 800.0]]).repeat(3, 1)  # radius clamped to 3
    hm = build_heatmap_targets([kp], [boxes], (12, 16))
    assert hm.shape == (1, K, 12, 16)
    assert hm[0, 0, 6, 10] == 1.0 and hm[0, 2, 11, 3] == 1.0 and hm[0, 2, 11, 4] == 1.0
    assert int((hm == 1).sum()) == 4  # one peak per visible joint
    assert hm[0, 1].sum() == 0
    # The 7x7 support around (10, 6) and nothing outside it.
    assert (hm[0, 0, 3:10, 7:14] > 0).all()
    assert hm[0, 0, 6, 14] == 0 and hm[0, 0, 10, 10] == 0
    assert hm[0, 0, 6, 11].item() == pytest.approx(math.exp(-1 / s2), rel=1e-6)
    # Corner: only the 4x4 quarter inside the map.
    assert hm[0, 0, 0, 0] == 1.0
    assert hm[0, 0, 3, 3].item() == pytest.approx(math.exp(-18 / s2), rel=1e-5)
    assert hm[0, 0, 0, 4] == 0 and hm[0, 0, 4, 0] == 0
    # Bottom border crop (rows 12+ are off the map) and elementwise max of overlapping people.
    assert hm[0, 2, 11, 5].item() == pytest.approx(math.exp(-1 / s2), rel=1e-6)
    assert hm[0, 2, 8, 2].item() == pytest.approx(math.exp(-(1 + 9) / s2), rel=1e-5)


def test_small_person_gives_single_pixel_peak():
    kp = torch.zeros(1, K, 3)
    kp[0, 4] = torch.tensor([17.0, 9.0, 1.0])  # v = 1 counts as visible
    hm = build_heatmap_targets([kp], [torch.tensor([[0.0, 0.0, 40.0, 40.0]])], (6, 6))
    assert hm.sum() == 1.0 and hm[0, 4, 1, 2] == 1.0


def test_heatmap_loss_ignores_padding_for_negatives():
    t = target([person(60, 50)])
    crit = criterion()
    kpts = torch.rand(1, 1, 3, 2 * K)
    hm = torch.zeros(1, K, 20, 28)
    pad = torch.zeros(1, 20, 28, dtype=torch.bool)
    pad[:, :, 20:] = True
    base = crit(
        outputs_for(crit, torch.zeros(1, 1, 3, 1), kpts, [t], hm_logits=hm, hm_padding_mask=pad),
        [t],
    )["loss_hm"]
    hm2 = hm.clone()
    hm2[..., 20:] = 8.0  # confident "person" in the padding: not penalised
    moved = crit(
        outputs_for(crit, torch.zeros(1, 1, 3, 1), kpts, [t], hm_logits=hm2, hm_padding_mask=pad),
        [t],
    )["loss_hm"]
    torch.testing.assert_close(base, moved)
    hm2[..., :20] = 8.0  # ... but it is inside the image
    assert (
        crit(
            outputs_for(
                crit, torch.zeros(1, 1, 3, 1), kpts, [t], hm_logits=hm2, hm_padding_mask=pad
            ),
            [t],
        )["loss_hm"]
        > base
    )


# --------------------------------------------------------------------------- config and keys


def test_missing_or_unknown_weight_raises():
    t = target([person(60, 50)])
    no_hm = {k: v for k, v in WEIGHTS.items() if k != "hm"}
    crit = criterion(weights=no_hm)
    out = outputs_for(
        crit,
        torch.zeros(1, 1, 3, 1),
        torch.rand(1, 1, 3, 2 * K),
        [t],
        hm_logits=torch.zeros(1, K, 4, 4),
        hm_padding_mask=torch.zeros(1, 4, 4, dtype=torch.bool),
    )
    with pytest.raises(KeyError, match="'hm'"):
        crit(out, [t])
    del out["hm_logits"]
    assert "loss_hm" not in crit(out, [t])  # no heatmap branch, no weight needed
    with pytest.raises(KeyError, match="unknown loss weights"):
        criterion(weights=dict(WEIGHTS, kpt_rpn=70.0))


def test_joint_outputs_must_match_the_number_of_matches():
    t = target([person(60, 50), person(150, 100)])
    crit = criterion()
    out = outputs_for(
        crit,
        torch.zeros(1, 1, 5, 1),
        torch.rand(1, 1, 5, 2 * K),
        [t],
        joint_kpts=torch.rand(2, 3, K, 2),
    )
    with pytest.raises(ValueError, match=r"joint_kpts.*2 matched"):
        crit(out, [t])


def test_opera_loss_key_mapping():
    assert opera_loss_key("enc_loss_cls") == "loss_cls_enc"
    assert opera_loss_key("enc_loss_kpt") == "loss_kpt_enc"
    assert opera_loss_key("d0.loss_cls") == "loss_cls_0"
    assert opera_loss_key("loss_cls") == "loss_cls"
    assert opera_loss_key("d1.loss_kpt_refine") == "loss_kpt_refine_1"
    assert opera_loss_key("d4.loss_oks") == "loss_oks_4"
    assert opera_loss_key("loss_hm") == "loss_hm"
    with pytest.raises(KeyError):
        opera_loss_key("loss_bbox")
    assert len(OPERA_LOSS_KEYS) == 16
