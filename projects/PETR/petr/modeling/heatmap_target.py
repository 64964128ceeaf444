"""Gaussian keypoint-heatmap targets for PETR's auxiliary heatmap branch.

Follows the official implementation (hikvision-research/opera: `PETRHead.loss_heatmap` and
`opera/core/keypoint/transforms.py`), which takes CenterNet's `gaussian_radius` *without* its
1/(2a) division, floors it and clamps it to [0, 3]. Unlike the official code, nothing is modified
in place: the caller's boxes stay in pixels. Arithmetic is float32 torch, as in the official code,
so the floored radius is bit-identical.
"""

import functools
from typing import Sequence

import torch
from torch import Tensor

HEATMAP_STRIDE = 8
MIN_OVERLAP = 0.9
MAX_RADIUS = 3


def gaussian_radius(height: Tensor, width: Tensor, min_overlap: float = MIN_OVERLAP) -> Tensor:
    """Official (unfloored) radius for boxes of `height` x `width` feature cells.

    This is CornerNet's three-case formula with each root taken as (b + sqrt(b^2 - 4ac)) / 2,
    i.e. without dividing by 2a (the official quirk). Elementwise over float tensors.
    """
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + torch.sqrt(b2**2 - 4 * 4 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def heatmap_radius(boxes: Tensor, stride: int = HEATMAP_STRIDE) -> Tensor:
    """Integer gaussian radius per box: clamp(floor(gaussian_radius), 0, 3).

    Args:
        boxes: (G, 4) xyxy in pixels of the input image.

    Returns:
        (G,) int64 radii in heatmap cells.
    """
    cells = boxes.to(torch.float32) / stride  # official: gt_bbox /= 8, then the differences
    width = cells[:, 2] - cells[:, 0]
    height = cells[:, 3] - cells[:, 1]
    radius = torch.floor(gaussian_radius(height, width)).clamp(min=0, max=MAX_RADIUS)
    return radius.to(torch.int64)


def gaussian_kernel(radius: int) -> Tensor:
    """(2r+1, 2r+1) float32 gaussian with sigma = (2r+1)/6 and centre exactly 1; values below
    float32-eps times the maximum are zeroed (CenterNet `gaussian2D`)."""
    diameter = 2 * radius + 1
    sigma = torch.tensor(float(diameter), dtype=torch.float32) / 6  # float32, as official
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets[None, :] ** 2 + offsets[:, None] ** 2) / (2 * sigma * sigma))
    kernel[kernel < torch.finfo(torch.float32).eps * kernel.max()] = 0
    return kernel


# Radii are clamped to [0, MAX_RADIUS], so a handful of kernels serve every joint of a batch
# (building one per joint was ~2% of a toy training step). Read-only: callers must not mutate it.
_cached_kernel = functools.lru_cache(maxsize=None)(gaussian_kernel)


def draw_gaussian(heatmap: Tensor, cx: int, cy: int, radius: int) -> None:
    """Elementwise-max a gaussian of `radius` centred on cell (cx, cy) into `heatmap` (H, W),
    cropped at the borders. Centres off the map draw nothing: the official cropping gives nothing
    for cx >= W and a misplaced blob for cx < 0, which valid data never produces."""
    height, width = heatmap.shape
    if not (0 <= cx < width and 0 <= cy < height):
        return
    kernel = _cached_kernel(radius).to(heatmap)
    left, right = min(cx, radius), min(width - cx, radius + 1)
    top, bottom = min(cy, radius), min(height - cy, radius + 1)
    region = heatmap[cy - top : cy + bottom, cx - left : cx + right]
    patch = kernel[radius - top : radius + bottom, radius - left : radius + right]
    torch.maximum(region, patch, out=region)


def build_heatmap_targets(
    keypoints: Sequence[Tensor],
    boxes: Sequence[Tensor],
    heatmap_size: tuple[int, int],
    stride: int = HEATMAP_STRIDE,
) -> Tensor:
    """Gaussian heatmap targets of a batch.

    Args:
        keypoints: per image (G, K, 3) pixels (x, y, v) of the unpadded input image; v > 0 visible.
        boxes: per image (G, 4) xyxy pixels; they only set each person's radius.
        heatmap_size: (H, W) of the stride-`stride` heatmap (the padded batch).

    Returns:
        (B, K, H, W) float32 on the keypoints' device; each visible joint peaks at exactly 1 at
        cell floor(xy / stride).
    """
    if len(keypoints) != len(boxes):
        raise ValueError(f"{len(keypoints)} keypoint tensors but {len(boxes)} box tensors")
    if not keypoints:
        raise ValueError("build_heatmap_targets needs at least one image")
    num_kpts = keypoints[0].shape[1]
    height, width = heatmap_size
    targets = torch.zeros((len(keypoints), num_kpts, height, width), dtype=torch.float32)
    for b, (kpts, bxs) in enumerate(zip(keypoints, boxes)):
        if kpts.shape[0] != bxs.shape[0]:
            raise ValueError(
                f"image {b}: {kpts.shape[0]} keypoint instances but {bxs.shape[0]} boxes"
            )
        if kpts.shape[0] == 0:
            continue
        kpts = kpts.detach().to("cpu", torch.float32)
        radii = heatmap_radius(bxs.detach().to("cpu"), stride).tolist()
        centres = torch.floor(kpts[..., :2] / stride).to(torch.int64).tolist()
        visible = (kpts[..., 2] > 0).tolist()
        for g, radius in enumerate(radii):
            for k in range(num_kpts):
                if visible[g][k]:
                    draw_gaussian(targets[b, k], centres[g][k][0], centres[g][k][1], radius)
    return targets.to(keypoints[0].device)
