"""Greedy OKS-NMS over final poses (MODEL.PETR.OKS_NMS_THRESH_TEST) and its model wiring."""

import math

import pytest
import torch
from detectron2.modeling import build_model
from petr_testing import load_cfg, shrink_cfg

from petr.data.synthetic import random_person_batch
from petr.modeling.postprocess import (
    keypoint_boxes,
    oks_nms,
    pose_instances,
    pose_oks,
    poses_to_instances,
)


def _square_pose(x0, y0, side=10.0):
    """Two joints at opposite corners of a side x side box: OKS scale = side**2."""
    return torch.tensor([[x0, y0], [x0 + side, y0 + side]])


def test_pose_oks_matches_the_coco_formula():
    a = _square_pose(0, 0)[None]
    b = (_square_pose(0, 0) + torch.tensor([3.0, 4.0]))[None]  # every joint 5 px away
    sigma = 0.1
    expected = math.exp(-(5.0**2) / (2 * 100.0 * (2 * sigma) ** 2))
    got = pose_oks(a, b, torch.tensor([sigma, sigma]), torch.tensor([100.0]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # one joint 2 px off: e = d^2 / (2 sigma)^2 / area / 2 = 4 / 0.04 / 100 / 2 = 0.5, averaged
    # with the exact joint
    one_off = _square_pose(0, 0).clone()[None]
    one_off[0, 0, 0] += 2.0
    got = pose_oks(a, one_off, torch.tensor([sigma, sigma]), torch.tensor([100.0]))
    assert got.item() == pytest.approx((math.exp(-0.5) + 1.0) / 2, rel=1e-6)


def test_oks_nms_drops_duplicates_and_keeps_other_people():
    sig = torch.tensor([0.1, 0.1])
    person_a = _square_pose(0, 0)
    person_b = _square_pose(50, 50)  # far away: OKS ~0 with a
    poses = torch.stack([
        person_a + 0.5,  # near-duplicate of a (OKS ~0.94 with it), higher score than a
        person_a,
        person_b,
        person_a + torch.tensor([3.0, 4.0]),  # 5 px off a: OKS exp(-25/8) ~0.044 -> kept
    ])  # fmt: skip
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert oks_nms(poses, scores, sig, 0.5).tolist() == [0, 2, 3]
    assert oks_nms(poses, scores, sig, 0.99).tolist() == [0, 1, 2, 3]  # nothing that close
    # the order follows the scores, not the input order
    assert oks_nms(poses.flip(0), scores.flip(0), sig, 0.5).tolist() == [3, 1, 0]
    assert oks_nms(poses[:0], scores[:0], sig, 0.5).tolist() == []


def _tiny_model(thresh):
    cfg = shrink_cfg(load_cfg("petr_R50.yaml"))
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    cfg.MODEL.PETR.OKS_NMS_THRESH_TEST = thresh
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_model_applies_oks_nms_only_when_asked(monkeypatch):
    from petr.modeling import meta_arch

    def with_a_duplicate(*args, **kwargs):
        # an untrained model's poses are points; give the first one extent (a 40 x 32 px box)
        # and make the second repeat it 0.1 px off
        inst = poses_to_instances(*args, **kwargs)
        spread = torch.stack([torch.linspace(10, 50, 17), torch.linspace(20, 52, 17)], -1)
        inst.pred_keypoints[0, :, :2] = spread
        inst.pred_keypoints[1, :, :2] = spread + 0.1
        return inst

    monkeypatch.setattr(meta_arch, "poses_to_instances", with_a_duplicate)
    image = random_person_batch(17, [(96, 128)], [0], seed=7)[0]
    del image["instances"]
    model = _tiny_model(0.0)
    with torch.no_grad():
        plain = model([image])[0]["instances"]
        model.oks_nms_thresh = 0.9
        nms = model([image])[0]["instances"]
    keep = oks_nms(plain.pred_keypoints, plain.scores, model.oks_sigmas, 0.9)
    assert len(plain) == 5 and 1 not in keep.tolist() and len(nms) == len(keep) >= 1
    torch.testing.assert_close(nms.pred_keypoints, plain.pred_keypoints[keep])
    torch.testing.assert_close(nms.scores, plain.scores[keep])


def test_bad_threshold_names_the_key():
    with pytest.raises(ValueError, match="OKS_NMS_THRESH_TEST"):
        _tiny_model(1.5)


def test_pose_instances_boxes_are_tight_over_every_joint():
    kpts = torch.tensor([[[3.0, 4.0], [10.0, 2.0], [7.0, 9.0]]])  # (1, K=3, 2) pixels
    inst = pose_instances(kpts, torch.tensor([0.8]), (20, 30))
    assert inst.image_size == (20, 30)
    assert inst.pred_boxes.tensor.tolist() == [[3.0, 2.0, 10.0, 9.0]]
    assert inst.pred_keypoints[..., 2].tolist() == [[1.0, 1.0, 1.0]]  # no joint scores
    conf = torch.tensor([[0.25, 0.5, 0.75]])
    assert pose_instances(kpts, torch.tensor([0.8]), (20, 30), conf).pred_keypoints[
        ..., 2
    ].tolist() == [[0.25, 0.5, 0.75]]
    assert inst.pred_classes.tolist() == [0] and inst.scores.tolist() == [pytest.approx(0.8)]
    empty = pose_instances(torch.zeros(0, 3, 2), torch.zeros(0), (20, 30))
    assert empty.pred_boxes.tensor.shape == (0, 4) and empty.pred_keypoints.shape == (0, 3, 3)
    assert keypoint_boxes(torch.zeros(0, 3, 3)).shape == (0, 4)
