"""Synthetic PETR inputs (random images and poses) for tests and benchmarks: no data downloads."""

import torch
from detectron2.structures import Boxes, Instances, Keypoints

__all__ = ["make_instances", "random_person_batch", "tight_boxes"]


def tight_boxes(keypoints: torch.Tensor) -> torch.Tensor:
    """(G, K, 3) pixels -> (G, 4) xyxy boxes of the visible joints."""
    vis = keypoints[..., 2] > 0
    inf = torch.tensor(float("inf"))
    x, y = keypoints[..., 0], keypoints[..., 1]
    return torch.stack(
        [
            torch.where(vis, x, inf).amin(1),
            torch.where(vis, y, inf).amin(1),
            torch.where(vis, x, -inf).amax(1),
            torch.where(vis, y, -inf).amax(1),
        ],
        -1,
    )


def make_instances(keypoints: torch.Tensor, areas: torch.Tensor, image_size) -> Instances:
    """Training targets as PETRDatasetMapper produces them. keypoints (G, K, 3) pixels."""
    inst = Instances(tuple(image_size))
    inst.gt_keypoints = Keypoints(keypoints)
    inst.gt_boxes = Boxes(tight_boxes(keypoints) if len(keypoints) else torch.zeros(0, 4))
    inst.gt_areas = areas.float()
    inst.gt_classes = torch.zeros(len(keypoints), dtype=torch.int64)
    return inst


def random_person_batch(num_keypoints, sizes, people, seed=0):
    """Synthetic Detectron2 training inputs: uint8 images of `sizes` (h, w), with "height" and
    "width", and `people[i]` random poses (keypoints in pixels, ~70% of joints visible, at least
    one per person; areas random) as `instances`."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for (h, w), n in zip(sizes, people):
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        xy = torch.rand(n, num_keypoints, 2, generator=g) * torch.tensor([w - 1.0, h - 1.0])
        vis = (torch.rand(n, num_keypoints, generator=g) > 0.3).float() * 2
        vis[:, 0] = 2  # at least one visible joint per person
        kpts = torch.cat([xy, vis[..., None]], -1) * (vis[..., None] > 0)
        areas = torch.rand(n, generator=g) * h * w * 0.3 + 50
        inst = make_instances(kpts, areas, (h, w))
        batch.append({"image": img, "height": h, "width": w, "instances": inst})
    return batch
