"""Turns PETR's normalised pose predictions into Detectron2 `Instances` in image pixels
(hikvision-research/opera, PETRHead._get_bboxes_single), plus the optional OKS-NMS."""

from typing import Tuple

import torch
from detectron2.structures import Boxes, Instances

from .oks import pose_oks


def poses_to_instances(
    keypoints: torch.Tensor,
    scores: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    pixel_offset: float = 0.0,
    joint_scores: torch.Tensor | None = None,
) -> Instances:
    """keypoints (N, K, 2) normalised (x, y) of the network input's unpadded image of size
    image_size (h, w); scores (N,); joint_scores (N, K) or None. Returns Instances of size
    output_size (H, W) (the original image) with pred_keypoints (N, K, 3) pixels (x, y, joint
    score), pred_boxes (the tight box of the keypoints), scores and pred_classes (0).
    `pixel_offset` shifts the keypoints (see MODEL.PETR.OUTPUT_PIXEL_OFFSET)."""
    h, w = image_size
    out_h, out_w = output_size
    xy = keypoints_to_pixels(keypoints, (h, w), (out_h / h, out_w / w), pixel_offset)
    return pose_instances(xy, scores, output_size, joint_scores)


def keypoints_to_pixels(keypoints: torch.Tensor, size, scale=(1.0, 1.0), pixel_offset=0.0):
    """The back door's arithmetic, tensor ops only: the ONNX graph runs it with the per-image
    sizes of a dynamic batch. keypoints (..., K, 2) normalised (x, y) by size = (h, w), the
    unpadded network input size, each a number (one image) or a tensor broadcastable to
    keypoints[..., 0] (a batch: (B, 1, 1)). Clamped to that image, multiplied by scale = (sy, sx)
    (to the output image) and shifted by `pixel_offset`. Returns (..., K, 2) pixels."""
    (h, w), (sy, sx) = size, scale
    x = (keypoints[..., 0] * w).clamp(min=0).clamp(max=w) * sx + pixel_offset
    y = (keypoints[..., 1] * h).clamp(min=0).clamp(max=h) * sy + pixel_offset
    return torch.stack([x, y], -1)


def keypoint_boxes(keypoints: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (..., N, 4) of poses (..., N, K, >=2) pixels, over all joints."""
    xy = keypoints[..., :2]
    return torch.cat([xy.amin(-2), xy.amax(-2)], -1)


def pose_instances(
    keypoints: torch.Tensor,
    scores: torch.Tensor,
    image_size: Tuple[int, int],
    joint_scores: torch.Tensor | None = None,
) -> Instances:
    """Detectron2's output of poses: keypoints (N, K, 2) pixels (x, y), scores (N,), image_size
    (H, W), joint_scores (N, K) or None. Returns Instances with pred_keypoints (N, K, 3)
    (x, y, joint score; 1 without joint_scores), pred_boxes (the tight box of the keypoints),
    scores and pred_classes (0)."""
    result = Instances(tuple(image_size))
    # Without joint scores (MODEL.PETR.JOINT_SCORES none, as the official model) every joint
    # gets 1.
    conf = torch.ones_like(keypoints[..., 0]) if joint_scores is None else joint_scores
    result.pred_keypoints = torch.cat([keypoints, conf.to(keypoints)[..., None]], -1)
    result.pred_boxes = Boxes(keypoint_boxes(keypoints))
    result.scores = scores
    result.pred_classes = torch.zeros_like(scores, dtype=torch.int64)
    return result


def oks_nms(keypoints: torch.Tensor, scores: torch.Tensor, sigmas: torch.Tensor, threshold: float):
    """Greedy OKS-NMS, as top-down pose estimators use it: visit poses by decreasing score and
    drop every pose whose OKS with an already kept one exceeds `threshold`. The OKS scale is the
    area of the kept pose's tight keypoint box. keypoints (N, K, >=2) pixels, scores (N,),
    sigmas (K,). Returns the kept indices (M,), by decreasing score."""
    order = scores.argsort(descending=True, stable=True)
    if order.numel() <= 1:
        return order
    return order[~oks_suppressed(keypoints[order], sigmas, threshold)]


def oks_suppressed(keypoints: torch.Tensor, sigmas: torch.Tensor, threshold: float):
    """The fixed-shape core of `oks_nms`: poses (..., N, K, >=2) pixels, already sorted by
    decreasing score. Returns (..., N) bool, True where greedy OKS-NMS drops the pose. Used
    as is by the ONNX graph, which zeroes the scores of the dropped poses."""
    kpts = keypoints[..., :2].float()
    box = keypoint_boxes(kpts)
    wh = box[..., 2:] - box[..., :2]
    oks = pose_oks(kpts, kpts, sigmas.to(kpts), wh[..., 0] * wh[..., 1])  # row = kept pose
    n = kpts.shape[-3]
    suppressed = [torch.zeros_like(oks[..., 0, 0], dtype=torch.bool)]
    # Tensor ops only (no `if suppressed[i]`): a suppressed pose suppresses nothing, and no
    # value is read on the host. Pose j is dropped by any kept pose i < j that overlaps it.
    for j in range(1, n):
        kept = ~torch.stack(suppressed, -1)  # (..., j)
        hit = (oks[..., :j, j] > threshold) & kept
        suppressed.append(hit.any(-1))
    return torch.stack(suppressed, -1)
