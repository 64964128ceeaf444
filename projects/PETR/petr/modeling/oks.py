"""Object keypoint similarity (COCO OKS), shared by training (matcher, OKS loss) and inference
(OKS-NMS, test-time augmentation). A module of its own so that inference imports no training
code."""

import torch
from torch import Tensor

__all__ = ["keypoint_oks", "pose_oks"]


def keypoint_oks(
    pred: Tensor, gt: Tensor, visible: Tensor, areas: Tensor, sigmas: Tensor
) -> Tensor:
    """COCO object keypoint similarity, in pixels, broadcast over leading dimensions.

    Args:
        pred, gt: (..., K, 2) keypoints in pixels (x, y).
        visible: (..., K) bool or {0,1}; at least one visible joint per pose, else OKS is NaN.
        areas: (...) ground-truth areas in pixels^2 (the scale s^2).
        sigmas: (K,) per-keypoint sigmas (kappa = 2 sigma).

    Returns:
        (...) OKS = mean over visible joints of exp(-d^2 / (2 s^2 kappa^2)).
    """
    variances = (sigmas * 2) ** 2
    sq_dist = (pred - gt).pow(2).sum(-1)  # (..., K)
    sim = torch.exp(-sq_dist / (areas[..., None] * variances * 2))
    visible = visible.bool()
    return torch.where(visible, sim, 0.0).sum(-1) / visible.sum(-1)


def pose_oks(
    anchors: torch.Tensor, poses: torch.Tensor, sigmas: torch.Tensor, areas: torch.Tensor
) -> torch.Tensor:
    """COCO OKS between anchors (..., A, K, >=2) and poses (..., P, K, >=2), pixels, every joint
    counted. sigmas (K,); areas (..., A) the scale s^2 of each anchor. Leading dimensions (a
    batch) broadcast. Returns (..., A, P) in [0, 1]."""
    every_joint = torch.ones(anchors.shape[-2], dtype=torch.bool, device=anchors.device)
    eps = torch.finfo(anchors.dtype).eps  # pycocotools' np.spacing(1): zero area -> OKS 0 or 1
    return keypoint_oks(
        anchors[..., :, None, :, :2],
        poses[..., None, :, :, :2],
        every_joint,
        areas[..., :, None] + eps,
        sigmas,
    )
