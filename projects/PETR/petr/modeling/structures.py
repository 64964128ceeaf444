"""Typed hand-offs between PETR's stages (the encoder's is `transformer.encoder.EncoderMemory`).

PETR.prepare_targets -> PoseTargets (one per image)
pose decoder, proposals, heads -> PETROutputs
PETRCriterion.match -> PETRMatches (one LayerMatch per matched layer)
PETR.predict -> PETRPredictions
"""

from dataclasses import dataclass
from typing import List, Tuple

from torch import Tensor

__all__ = ["LayerMatch", "PETRMatches", "PETROutputs", "PETRPredictions", "PoseTargets"]


@dataclass
class PoseTargets:
    """Ground truth of one image.

    keypoints (G, K, 3) pixels (x, y, v) of the unpadded network input, v > 0 visible;
    areas (G,) pixels^2; boxes (G, 4) xyxy pixels (they set the heatmap radius); image_size
    (h, w) of the unpadded input. host_keypoints / host_boxes: optional CPU copies of keypoints
    and boxes, read by the heatmap targets (drawn on the host) instead of the device tensors.
    """

    keypoints: Tensor
    areas: Tensor
    boxes: Tensor
    image_size: Tuple[int, int]
    host_keypoints: Tensor | None = None
    host_boxes: Tensor | None = None


@dataclass
class PETROutputs:
    """What the criterion scores.

    pose_logits (Ld, B, Q, 1) and pose_kpts (Ld, B, Q, 2K) normalised interleaved, per
    pose-decoder layer; optional enc_logits (B, S, 1) and enc_kpts (B, S, 2K) normalised (the
    proposals of every encoder token); optional joint_kpts (Lj, N, K, 2) normalised (x, y), the
    joint decoder's refinement of the N poses `PETRCriterion.joint_decoder_inputs` selected;
    optional hm_logits (B, K, H0, W0) stride-8 heatmap logits with hm_padding_mask (B, H0, W0)
    True = padding.
    """

    pose_logits: Tensor
    pose_kpts: Tensor
    enc_logits: Tensor | None = None
    enc_kpts: Tensor | None = None
    joint_kpts: Tensor | None = None
    hm_logits: Tensor | None = None
    hm_padding_mask: Tensor | None = None


@dataclass
class LayerMatch:
    """Matched pairs of one layer, concatenated over images (image order, ascending query).

    batch_idx, pred_idx, gt_idx (N,) int64; target (N, 2K) normalised interleaved ground truth;
    weight (N, 2K) 1 on both coords of visible joints; visible (N, K) bool; areas (N,) pixels^2;
    scale (N, 2K) the (w, h, w, h, ...) pixel factors; counts: matches per image (Python ints,
    known on the host without a sync).
    """

    batch_idx: Tensor
    pred_idx: Tensor
    gt_idx: Tensor
    target: Tensor
    weight: Tensor
    visible: Tensor
    areas: Tensor
    scale: Tensor
    counts: Tuple[int, ...]

    def __len__(self) -> int:
        return sum(self.counts)


@dataclass
class PETRMatches:
    """All Hungarian matches of a batch: `layers[i]` for pose-decoder layer i, `enc` for the
    encoder proposals (None when the outputs have none). The joint decoder refines the poses
    of `last`."""

    layers: List[LayerMatch]
    enc: LayerMatch | None = None

    @property
    def last(self) -> LayerMatch:
        return self.layers[-1]


@dataclass
class PETRPredictions:
    """The top poses of every image, sorted by descending score.

    scores (B, k) sigmoid pose scores; keypoints (B, k, K, 2) normalised (x, y) by each image's
    unpadded size (ImageList.image_sizes), refined by the joint decoder; optional joint_scores
    (B, k, K) in [0, 1], the heatmap branch at each joint (None: MODEL.PETR.JOINT_SCORES none).
    """

    scores: Tensor
    keypoints: Tensor
    joint_scores: Tensor | None = None
