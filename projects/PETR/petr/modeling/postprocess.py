"""Turns PETR's normalised pose predictions into Detectron2 `Instances` in image pixels
(hikvision-research/opera, PETRHead._get_bboxes_single)."""

from typing import Tuple

import torch
from detectron2.structures import Boxes, Instances


def poses_to_instances(
    keypoints: torch.Tensor,
    scores: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    pixel_offset: float = 0.0,
) -> Instances:
    """keypoints (N, K, 2) normalised (x, y) of the network input's unpadded image of size
    image_size (h, w); scores (N,). Returns Instances of size output_size (H, W) (the original
    image) with pred_keypoints (N, K, 3) pixels (x, y, 1), pred_boxes (the tight box of the
    keypoints), scores and pred_classes (0). `pixel_offset` shifts the keypoints (see
    MODEL.PETR.OUTPUT_PIXEL_OFFSET)."""
    h, w = image_size
    out_h, out_w = output_size
    x = (keypoints[..., 0] * w).clamp(min=0, max=w) * (out_w / w) + pixel_offset
    y = (keypoints[..., 1] * h).clamp(min=0, max=h) * (out_h / h) + pixel_offset
    # The official model has no per-joint confidence: every joint gets score 1.
    kpts = torch.stack([x, y, torch.ones_like(x)], -1)
    result = Instances((out_h, out_w))
    result.pred_keypoints = kpts
    if kpts.shape[0]:
        boxes = torch.stack([x.min(1)[0], y.min(1)[0], x.max(1)[0], y.max(1)[0]], -1)
    else:
        boxes = kpts.new_zeros(0, 4)
    result.pred_boxes = Boxes(boxes)
    result.scores = scores
    result.pred_classes = torch.zeros_like(scores, dtype=torch.int64)
    return result
