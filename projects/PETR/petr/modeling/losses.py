"""Loss functions of PETR: sigmoid focal, masked L1, OKS and the CenterNet heatmap focal loss.

Follows the official implementation (hikvision-research/opera: `opera/models/losses/oks_loss.py`,
`center_focal_loss.py`, mmdet `FocalLoss`/`L1Loss`) numerically. Every function returns an
unweighted *sum*; the criterion divides by the official normalisers (`reduce_mean` + `avg_factor`).
"""

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import Tensor

from .oks import keypoint_oks

# mmdet `weight_reduce_loss` divides by (avg_factor + this eps).
AVG_FACTOR_EPS = torch.finfo(torch.float32).eps
# opera OKSLoss clamps OKS at this value before the log.
OKS_LOG_EPS = 1e-6
# CenterNet clamps the heatmap probabilities to [eps, 1 - eps].
HEATMAP_PROB_EPS = 1e-4


def reduce_mean(value: Tensor) -> Tensor:
    """Average of `value` over all processes (mmdet `reduce_mean`); identity on one process."""
    world_size = comm.get_world_size()
    if world_size == 1:
        return value
    value = value.clone() / world_size
    torch.distributed.all_reduce(value)
    return value


def normaliser(count: float | Tensor, device: torch.device) -> Tensor:
    """max(mean over processes of `count`, 1) + eps: the official denominator of most losses.
    A 0-d float32 tensor on `device`, never read on the host (no sync in the training step)."""
    count = torch.as_tensor(count, dtype=torch.float32, device=device)
    return reduce_mean(count).clamp(min=1.0) + AVG_FACTOR_EPS


def sigmoid_focal_loss_sum(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Sum of the sigmoid focal loss (RetinaNet form, as mmdet `py_sigmoid_focal_loss`).

    Args:
        logits: any shape, raw class logits.
        targets: same shape, 1 for positives and 0 for negatives (float).
    """
    prob = logits.sigmoid()
    p_t_complement = (1 - prob) * targets + prob * (1 - targets)  # 1 - p_t
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (bce * alpha_t * p_t_complement.pow(gamma)).sum()


def masked_l1_sum(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Sum of |pred - target| * weight; all (N, 2K) normalised interleaved coordinates."""
    return ((pred - target).abs() * weight).sum()


def oks_loss_sum(
    pred: Tensor, gt: Tensor, visible: Tensor, areas: Tensor, sigmas: Tensor
) -> Tensor:
    """Sum over poses of -log(max(OKS, 1e-6)) (opera OKSLoss, linear=False); shapes as
    `keypoint_oks` with one leading dimension (N, K, 2)."""
    return -keypoint_oks(pred, gt, visible, areas, sigmas).clamp(min=OKS_LOG_EPS).log().sum()


def center_focal_loss(logits: Tensor, target: Tensor, padding_mask: Tensor) -> Tensor:
    """CornerNet/CenterNet penalty-reduced focal loss on keypoint heatmaps (opera
    `weighted_neg_loss`), normalised by the local number of peaks (not synced across processes).

    Args:
        logits: (B, K, H, W) heatmap logits.
        target: (B, K, H, W) gaussian targets in [0, 1], peaks exactly 1.
        padding_mask: (B, H, W) bool, True = padding; padded pixels are never negatives.
    """
    prob = logits.sigmoid().clamp(min=HEATMAP_PROB_EPS, max=1 - HEATMAP_PROB_EPS)
    pos = target.eq(1).to(prob.dtype)
    neg = (target.lt(1) & ~padding_mask[:, None]).to(prob.dtype)
    pos_loss = (torch.log(prob) * (1 - prob).pow(2) * pos).sum()
    neg_loss = (torch.log(1 - prob) * prob.pow(2) * (1 - target).pow(4) * neg).sum()
    # No peak: pos_loss is 0 and the official -neg_loss is what the clamp gives; no host read.
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1)
