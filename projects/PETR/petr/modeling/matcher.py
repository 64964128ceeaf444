"""Hungarian matcher between pose queries (or encoder proposals) and ground-truth people.

Follows the official implementation (hikvision-research/opera `PoseHungarianAssigner` with mmdet
`FocalLossCost`, opera `KptL1Cost` and `OksCost`):
    C = w_cls * focal cost + w_kpt * mean |dxy| over visible coords + w_oks * (-OKS in pixels)
minimised per image by scipy's `linear_sum_assignment` on CPU. The cost matrices of the whole
batch reach the host in one transfer (one sync per matching, not one per image).

Difference from the official code, by design: ground-truth people with no visible joint are left
out of the matching (they stay unmatched, i.e. neither positives nor L1/OKS targets). The official
OKS cost asserts at least one visible joint (its data pipeline drops such people); here they must
not crash training, and a pose without joints carries no keypoint supervision anyway.
"""

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .oks import keypoint_oks
from .structures import PoseTargets

# mmdet FocalLossCost adds this inside its logs.
FOCAL_COST_EPS = 1e-12
# Cost entries (queries x people x keypoints) computed at once; bounds memory for the S x G
# encoder matching (S can be ~40k tokens at training scales).
_MAX_CHUNK_ELEMENTS = 1 << 22


def validate_targets(targets: Sequence[PoseTargets], num_images: int, num_keypoints: int) -> None:
    """Raise a clear error if `targets` does not hold `num_images` well-formed PoseTargets
    (shapes only: reading values would sync the device; the matcher checks the areas of the
    people it matches on the host)."""
    if len(targets) != num_images:
        raise ValueError(f"targets: expected {num_images} PoseTargets, got {len(targets)}")
    for b, t in enumerate(targets):
        if not isinstance(t, PoseTargets):
            raise TypeError(f"targets[{b}] is a {type(t).__name__}, not a PoseTargets")
        kpts, areas = t.keypoints, t.areas
        if kpts.dim() != 3 or kpts.shape[1:] != (num_keypoints, 3):
            raise ValueError(
                f"targets[{b}].keypoints must be (G, {num_keypoints}, 3), got {tuple(kpts.shape)}"
            )
        if areas.shape != (kpts.shape[0],):
            raise ValueError(
                f"targets[{b}].areas must be ({kpts.shape[0]},), got {tuple(areas.shape)}"
            )
        if len(t.image_size) != 2:
            raise ValueError(f"targets[{b}].image_size must be (h, w), got {t.image_size}")


class PETRHungarianMatcher(nn.Module):
    """One-to-one assignment of predicted poses to ground-truth people (DETR-style)."""

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_kpt: float = 70.0,
        cost_oks: float = 7.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        oks_sigmas: Sequence[float],
    ):
        super().__init__()
        self.cost_class = cost_class
        self.cost_kpt = cost_kpt
        self.cost_oks = cost_oks
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        # Not persistent: constants from the dataset metadata, never part of a checkpoint.
        sigmas = torch.tensor(list(oks_sigmas), dtype=torch.float32)
        self.register_buffer("oks_sigmas", sigmas, persistent=False)

    @property
    def num_keypoints(self) -> int:
        return self.oks_sigmas.numel()

    # scipy on the host: torch.compile runs the matcher eagerly (one graph break per call)
    @torch.compiler.disable
    @torch.no_grad()
    def forward(self, logits: Tensor, kpts: Tensor, targets: Sequence[PoseTargets]) -> list:
        """Match every image of the batch.

        Args:
            logits: (B, Q, 1) class logits.
            kpts: (B, Q, 2K) predicted keypoints, normalised to [0, 1] by the unpadded image size,
                interleaved (x0, y0, x1, y1, ...).
            targets: B PoseTargets; their keypoints (G, K, 3) pixels (x, y, v), areas (G,)
                pixels^2 and image_size (h, w) of the unpadded image are read.

        Returns:
            Per image a pair (pred_idx, gt_idx) of int64 tensors on `logits.device`; pred_idx is
            sorted ascending and gt_idx indexes the image's original ground-truth list.
        """
        num_kpts = self.num_keypoints
        if logits.dim() != 3 or logits.shape[-1] != 1:
            raise ValueError(f"matcher: logits must be (B, Q, 1), got {tuple(logits.shape)}")
        if kpts.shape != (*logits.shape[:2], 2 * num_kpts):
            raise ValueError(
                f"matcher: kpts must be {(*logits.shape[:2], 2 * num_kpts)} to match logits "
                f"{tuple(logits.shape)} and {num_kpts} OKS sigmas, got {tuple(kpts.shape)}"
            )
        validate_targets(targets, logits.shape[0], num_kpts)
        device, num_queries = logits.device, logits.shape[1]
        pieces, people = [], []
        for b, target in enumerate(targets):
            gt = target.keypoints.to(device=device, dtype=torch.float32)
            areas = target.areas.to(device=device, dtype=torch.float32)
            people.append(gt.shape[0])
            if gt.shape[0] and num_queries:
                # every person, also those without a visible joint (dropped on the host below)
                cost = self.cost_matrix(logits[b, :, 0], kpts[b], gt, areas, target.image_size)
            else:
                cost = logits.new_zeros(0)
            pieces += [cost.flatten(), (gt[..., 2] > 0).any(1).float(), areas]
        host = torch.cat(pieces).cpu().numpy() if pieces else np.zeros(0)  # the one transfer
        sizes = [n for g in people for n in (num_queries * g, g, g)]
        chunks = np.split(host, np.cumsum(sizes)[:-1]) if sizes else []
        return [
            self._assign(b, *chunks[3 * b : 3 * b + 3], num_queries, device)
            for b in range(len(targets))
        ]

    @staticmethod
    def _assign(b, cost, has_joint, areas, num_queries, device) -> tuple[Tensor, Tensor]:
        """Hungarian assignment of image b on the host, among its people with a visible joint."""
        keep = np.flatnonzero(has_joint > 0)
        if not (areas[keep] > 0).all():
            raise ValueError(f"targets[{b}].areas must be > 0 for people with visible joints")
        if keep.size == 0 or num_queries == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return empty, empty.clone()
        cost = cost.reshape(num_queries, -1)[:, keep]
        if not np.isfinite(cost).all():
            raise FloatingPointError("matcher: the cost matrix has NaN/inf (predictions diverged?)")
        rows, cols = linear_sum_assignment(cost)
        pred_idx = torch.as_tensor(rows, dtype=torch.int64, device=device)
        return pred_idx, torch.as_tensor(keep[cols], dtype=torch.int64, device=device)

    def cost_matrix(
        self, logits: Tensor, kpts: Tensor, gt: Tensor, areas: Tensor, image_size
    ) -> Tensor:
        """Matching cost of one image.

        Args:
            logits: (Q,) class logits.
            kpts: (Q, 2K) normalised interleaved predicted keypoints.
            gt: (G, K, 3) ground truth in pixels (x, y, v); invisible joints (v <= 0) are masked.
            areas: (G,) ground-truth areas in pixels^2.
            image_size: (h, w) of the unpadded image.

        Returns:
            (Q, G) float32 cost.
        """
        logits = logits.detach().float()
        pred = kpts.detach().float().reshape(kpts.shape[0], -1, 2)  # (Q, K, 2) normalised
        height, width = (float(s) for s in image_size)
        scale = pred.new_tensor([width, height])
        visible = gt[..., 2] > 0  # (G, K)
        # Invisible joints may hold anything (even NaN): zero them before any arithmetic.
        gt_px = torch.where(visible[..., None], gt[..., :2], 0.0)  # (G, K, 2)
        gt_norm = gt_px / scale
        coord_weight = visible.to(pred.dtype)[..., None]  # (G, K, 1): both coords of a joint
        num_coords = (visible.sum(1) * 2).clamp(min=1).to(pred.dtype)  # (G,)

        prob = logits.sigmoid()
        pos = self.focal_alpha * (1 - prob).pow(self.focal_gamma) * -(prob + FOCAL_COST_EPS).log()
        neg = (1 - self.focal_alpha) * prob.pow(self.focal_gamma)
        neg = neg * -(1 - prob + FOCAL_COST_EPS).log()
        cls_cost = self.cost_class * (pos - neg)[:, None]  # (Q, 1): one class

        sigmas = self.oks_sigmas.to(pred.device)
        num_gt, num_kpts = gt.shape[:2]
        chunk = max(1, _MAX_CHUNK_ELEMENTS // (num_gt * num_kpts * 2))
        kpt_costs, oks_costs = [], []
        for start in range(0, pred.shape[0], chunk):
            p = pred[start : start + chunk, None]  # (q, 1, K, 2)
            l1 = ((p - gt_norm[None]).abs() * coord_weight[None]).sum((2, 3))  # (q, G)
            kpt_costs.append(l1 / num_coords)
            oks = keypoint_oks(p * scale, gt_px[None], visible[None], areas[None], sigmas)
            oks_costs.append(-oks)  # official: the constant 1 of (1 - OKS) is omitted
        kpt_cost = self.cost_kpt * torch.cat(kpt_costs)
        oks_cost = self.cost_oks * torch.cat(oks_costs)
        return cls_cost + kpt_cost + oks_cost
