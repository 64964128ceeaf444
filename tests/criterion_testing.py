"""Shared builders for the matcher, loss, heatmap-target and criterion tests: people on a
deterministic pattern (pixels), their PoseTargets, and by-hand focal terms."""

import math

import torch

from petr.data.metadata import COCO_OKS_SIGMAS
from petr.modeling.criterion import PETRCriterion
from petr.modeling.matcher import PETRHungarianMatcher
from petr.modeling.structures import PETROutputs, PoseTargets

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
    return PoseTargets(keypoints=kpts, areas=areas, boxes=boxes, image_size=(h, w))


def normalised(kpts, h=160, w=224):
    """(K, 3) pixels -> (2K,) normalised interleaved."""
    return (kpts[:, :2] / torch.tensor([w, h])).reshape(-1)


def matcher(**kw):
    return PETRHungarianMatcher(oks_sigmas=COCO_OKS_SIGMAS, **kw)


def criterion(weights=WEIGHTS, m=None):
    return PETRCriterion(
        matcher=m or matcher(), num_keypoints=K, oks_sigmas=COCO_OKS_SIGMAS, weights=weights
    )


def outputs_for(pose_logits, pose_kpts, joint_kpts=None, **extra):
    """PETROutputs of the pose layers, plus optional joint, encoder and heatmap outputs."""
    return PETROutputs(pose_logits, pose_kpts, joint_kpts=joint_kpts, **extra)
