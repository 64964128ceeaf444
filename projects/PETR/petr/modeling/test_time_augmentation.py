"""Test-time augmentation for PETR: flip and multi-scale views, merged in one of two ways.

Each view goes through the front door (`PETRPreprocessor`) and the model's `predict`, without
postprocessing; the views are merged, and the merged poses go through the model's one back door
(`PETR.postprocess`: pixels, OUTPUT_PIXEL_OFFSET, optional OKS-NMS), as Detectron2's own TTA
postprocesses once. "soft_nms" follows the official flip test (hikvision-research/opera,
`PETR.aug_test` and mmdet `merge_aug_results` + `multiclass_nms` with mmcv linear `soft_nms`):
every view's poses are mapped back to the original image, concatenated, and linear soft-NMS on
the keypoint-tight boxes keeps the top ones. "oks_average" is NMS-free: each view's poses are
matched by OKS (Hungarian) to the poses of the reference view and matched poses are averaged.
Joint scores (MODEL.PETR.JOINT_SCORES) ride along as a third keypoint channel (x, y, c): a flip
swaps them with the joint ids, soft-NMS keeps them with their pose, "oks_average" averages them
as the coordinates.
All coordinates here are pixels (x, y) of the original image unless a docstring says otherwise.
"""

import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from detectron2.config import configurable
from scipy.optimize import linear_sum_assignment
from torch.nn.parallel import DistributedDataParallel

from ..data.image_io import read_image
from ..data.metadata import check_keypoint_compat
from ..data.preprocess import PETRPreprocessor
from .oks import pose_oks
from .postprocess import keypoint_boxes
from .structures import PETRPredictions

__all__ = [
    "PETRWithTTA",
    "hflip_poses",
    "merge_by_oks",
    "soft_nms_linear",
]

MERGES = ("soft_nms", "oks_average")


def hflip_poses(keypoints: torch.Tensor, width: float, flip_indices: Sequence[int]):
    """Horizontal flip of poses in an image `width` pixels wide: x' = width - x (continuous
    pixels, as the official `kpt_mapping_back`), then left/right joints swap ids.
    keypoints (N, K, C>=2) pixels; returns (N, K, C). Its own inverse."""
    if keypoints.shape[1] != len(flip_indices):
        raise ValueError(
            f"hflip_poses: keypoints {tuple(keypoints.shape)} vs {len(flip_indices)} flip indices"
        )
    out = keypoints[:, list(flip_indices)].clone()
    out[..., 0] = width - out[..., 0]
    return out


def _pairwise_iou(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of one xyxy box (4,) with boxes (M, 4), as mmcv (offset 0); 0 for a zero union."""
    wh = (torch.minimum(box[2:], boxes[:, 2:]) - torch.maximum(box[:2], boxes[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def soft_nms_linear(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float = 0.5,
    min_score: float = 1e-3,
    max_keep: int | None = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Linear soft-NMS (Bodla et al. 2017) with mmcv `soft_nms(method='linear')` semantics.

    Repeatedly keep the highest-scoring remaining box; every other remaining box whose IoU with
    it exceeds `iou_threshold` has its score multiplied by (1 - IoU); boxes whose score falls
    below `min_score` are dropped. boxes (N, 4) xyxy pixels, scores (N,).
    Returns (keep (M,) indices into the input, in selection order; their decayed scores (M,)),
    scores non-increasing. `max_keep` stops after that many: later steps never change earlier
    ones, so this equals truncating the full result.
    """
    scores = scores.detach().clone().float()
    alive = torch.arange(len(scores), device=scores.device)
    keep, kept_scores = [], []
    while alive.numel() and (max_keep is None or len(keep) < max_keep):
        i = int(scores[alive].argmax())
        best = alive[i]
        keep.append(best)
        kept_scores.append(scores[best])
        alive = torch.cat([alive[:i], alive[i + 1 :]])
        if not alive.numel():
            break
        iou = _pairwise_iou(boxes[best].float(), boxes[alive].float())
        scores[alive] *= torch.where(iou > iou_threshold, 1 - iou, torch.ones_like(iou))
        alive = alive[scores[alive] >= min_score]
    if not keep:
        return alive.new_zeros(0), scores.new_zeros(0)
    return torch.stack(keep), torch.stack(kept_scores)


def merge_by_oks(
    views: List[Tuple[torch.Tensor, torch.Tensor]], sigmas: torch.Tensor, oks_threshold: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """NMS-free merge. views: [(keypoints (N_v, K, C>=2) pixels (x, y, then e.g. the joint
    score), scores (N_v,))], views[0] the reference. Each later view is matched one-to-one
    (Hungarian, maximum OKS with the anchor's tight-box area as scale) to the current groups,
    which start as the reference poses; a pose matched with OKS >= oks_threshold joins that
    group, any other pose starts a new group with itself as anchor. Each group becomes one
    pose: the score-weighted mean of its keypoints (every channel) and the mean of its scores.
    Returns (keypoints (G, K, C), scores (G,)), sorted by score."""
    anchors, groups = views[0][0][..., :2], list(range(len(views[0][0])))
    for kpts, _ in views[1:]:
        ids = torch.arange(len(anchors), len(anchors) + len(kpts)).tolist()
        if len(anchors) and len(kpts):
            b = keypoint_boxes(anchors)
            areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            oks = pose_oks(anchors, kpts, sigmas, areas).cpu().numpy()
            for r, c in zip(*linear_sum_assignment(oks, maximize=True)):
                if oks[r, c] >= oks_threshold:
                    ids[c] = int(r)
        new = [c for c, g in enumerate(ids) if g >= len(anchors)]
        # renumber the new groups after the existing anchors, in the order of the view
        for n, c in enumerate(new):
            ids[c] = len(anchors) + n
        anchors = torch.cat([anchors, kpts[new, :, :2]])
        groups += ids
    all_kpts = torch.cat([k for k, _ in views])
    all_scores = torch.cat([s for _, s in views]).float()
    group = torch.tensor(groups, dtype=torch.long, device=all_kpts.device)
    G = len(anchors)
    w = all_scores[:, None, None]
    kpt_sum = all_kpts.new_zeros(G, *all_kpts.shape[1:]).index_add_(0, group, all_kpts * w)
    w_sum = all_scores.new_zeros(G).index_add_(0, group, all_scores)
    count = all_scores.new_zeros(G).index_add_(0, group, torch.ones_like(all_scores))
    kpts = kpt_sum / w_sum.clamp(min=1e-12)[:, None, None]
    scores = w_sum / count.clamp(min=1)
    order = scores.argsort(descending=True)
    return kpts[order], scores[order]


class PETRWithTTA(nn.Module):
    """A PETR model with test-time augmentation; call it like `PETR.forward` in eval mode.

    Views: for each short side in `min_sizes` (long side <= max_size) the front door's resize of
    the original image and, with `flip`, its mirror. Each view is one network pass (batch 1,
    `model(inputs, do_postprocess=False)`, so a compiled model stays compiled) giving normalised
    poses; flipped ones are un-flipped in that frame (x' = 1 - x, joint ids swapped: the official
    x' = W - x in the network's pixels, before OUTPUT_PIXEL_OFFSET). The views are merged in
    original-image pixels ("soft_nms" or "oks_average", see the module docstring; the reference
    view of "oks_average" is the unflipped view at min_sizes[0]) and the merged poses go through
    `model.postprocess` once.

    Inputs: Detectron2 dicts with "image" (C, H, W) in the model's input format, or only
    "file_name", plus optional "height"/"width" (the original size). Views are resized from the
    original pixels: when "image" differs in size from (height, width) and "file_name"
    exists, the original file is read again (the official test resizes the original once).
    """

    @configurable
    def __init__(
        self,
        model: nn.Module,
        *,
        min_sizes: Sequence[int],
        max_size: int,
        flip: bool,
        merge: str = "soft_nms",
        detections_per_image: int = 100,
        soft_nms_iou_threshold: float = 0.5,
        soft_nms_min_score: float = 1e-3,
        match_oks_threshold: float = 0.5,
    ):
        """model: a PETR (flip indices and OKS sigmas come from its `keypoint_spec`)."""
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if merge not in MERGES:
            raise ValueError(f"TEST.AUG.MERGE must be one of {MERGES}, got {merge!r}")
        if not min_sizes:
            raise ValueError("TEST.AUG.MIN_SIZES is empty")
        spec = model.keypoint_spec
        if flip and spec.flip_indices is None:
            raise ValueError(
                "TEST.AUG.FLIP needs the flip indices of the model's keypoints "
                "(keypoint_flip_map in the dataset metadata); turn TEST.AUG.FLIP off otherwise"
            )
        if merge == "oks_average" and spec.oks_sigmas is None:
            raise ValueError(
                "TEST.AUG.MERGE 'oks_average' needs OKS sigmas (MODEL.PETR.OKS_SIGMAS)"
            )
        self.model = model
        self.min_sizes = [int(s) for s in min_sizes]
        self.max_size = int(max_size)
        self.flip = bool(flip)
        self.merge = merge
        self.flip_indices = list(spec.flip_indices) if flip else None
        # a plain CPU tensor, not a buffer: the merges run on the CPU wherever the model is
        self.oks_sigmas = torch.as_tensor(spec.oks_sigmas or (), dtype=torch.float32).cpu()
        self.preprocessor = PETRPreprocessor(
            min_size=self.min_sizes[0], max_size=self.max_size, input_format=model.input_format
        )
        self.detections_per_image = detections_per_image
        self.soft_nms_iou_threshold = soft_nms_iou_threshold
        self.soft_nms_min_score = soft_nms_min_score
        self.match_oks_threshold = match_oks_threshold

    @classmethod
    def from_config(cls, cfg, model):
        a = cfg.TEST.AUG
        check_keypoint_compat(cfg, model)
        return {
            "model": model,
            "min_sizes": list(a.MIN_SIZES),
            "max_size": a.MAX_SIZE,
            "flip": a.FLIP,
            "merge": a.MERGE,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "soft_nms_iou_threshold": a.SOFT_NMS_IOU_THRESH,
            "soft_nms_min_score": a.SOFT_NMS_MIN_SCORE,
            "match_oks_threshold": a.MATCH_OKS_THRESH,
        }

    def forward(self, batched_inputs: List[Dict]):
        if self.training:
            raise RuntimeError("PETRWithTTA is for inference only: call .eval() first")
        with torch.no_grad():
            return [self._inference_one(x) for x in batched_inputs]

    def _original_image(self, x: Dict) -> Tuple[np.ndarray, int, int]:
        """The (h, w, C) image views are resized from and the output size (H, W)."""
        file_name = x.get("file_name")
        image = x.get("image")
        if image is None:
            if file_name is None:
                raise KeyError("PETRWithTTA needs 'image' or 'file_name' in every input dict")
            image = read_image(file_name, format=self.model.input_format)
        else:
            image = image.permute(1, 2, 0).cpu().numpy()
        H, W = int(x.get("height", image.shape[0])), int(x.get("width", image.shape[1]))
        if image.shape[:2] != (H, W) and file_name and os.path.isfile(file_name):
            image = read_image(file_name, format=self.model.input_format)
            if image.shape[:2] != (H, W):
                raise ValueError(f"{file_name}: image is {image.shape[:2]}, dict says {(H, W)}")
        return image, H, W

    def view_poses(self, x: Dict) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], int, int]:
        """Per view, the reference first: (keypoints (N, K, 2) normalised (x, y) of the original
        image, clamped to [0, 1], flipped views un-flipped, or (N, K, 3) with the joint score
        third when the model gives one; scores (N,)), and the original size (H, W)."""
        image, H, W = self._original_image(x)
        poses = []
        for size in self.min_sizes:
            for flipped in (False, True) if self.flip else (False,):
                view = self.preprocessor(image, min_size=size, flip=flipped)
                predictions, _ = self.model([view], do_postprocess=False)
                kpts = predictions.keypoints[0].clamp(0.0, 1.0)  # as postprocess clamps
                if predictions.joint_scores is not None:
                    kpts = torch.cat([kpts, predictions.joint_scores[0][..., None]], -1)
                if flipped:
                    kpts = hflip_poses(kpts, 1.0, self.flip_indices)
                poses.append((kpts, predictions.scores[0]))
        return poses, H, W

    def _inference_one(self, x: Dict) -> Dict:
        poses, H, W = self.view_poses(x)
        device = poses[0][0].device  # the result goes back where the model put its outputs
        # The merges run in original-image pixels (OKS and IoU), on the CPU (sequential).
        scale = torch.tensor([float(W), float(H), 1.0])[: poses[0][0].shape[-1]]  # (x, y, c)
        poses = [(k.cpu() * scale, s.cpu()) for k, s in poses]
        if self.merge == "soft_nms":
            kpts, scores = torch.cat([p[0] for p in poses]), torch.cat([p[1] for p in poses])
            valid = scores > 0  # mmdet multiclass_nms(score_thr=0.0)
            kpts, scores = kpts[valid], scores[valid]
            keep, scores = soft_nms_linear(
                keypoint_boxes(kpts), scores, self.soft_nms_iou_threshold,
                self.soft_nms_min_score, self.detections_per_image,
            )  # fmt: skip
            kpts = kpts[keep]
        else:
            kpts, scores = merge_by_oks(poses, self.oks_sigmas, self.match_oks_threshold)
        kpts, scores = kpts[: self.detections_per_image], scores[: self.detections_per_image]
        kpts = (kpts / scale)[None].to(device)
        joint_scores = kpts[..., 2] if kpts.shape[-1] == 3 else None
        merged = PETRPredictions(scores[None].to(device), kpts[..., :2], joint_scores)
        return self.model.postprocess(merged, [{"height": H, "width": W}], [(H, W)])[0]
