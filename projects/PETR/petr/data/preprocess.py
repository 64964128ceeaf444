"""The front door: the one path from original images to PETR's network input.

It has two halves because Detectron2 splits them between the data loader and the model:
- `PETRPreprocessor` (host, one image): channel order (BGR/RGB -> INPUT.FORMAT), the test resize
  (short side MIN_SIZE_TEST, long side <= MAX_SIZE_TEST, mmcv rounding, cv2 bilinear as the
  official test pipeline) and an optional horizontal flip. It returns Detectron2's model input
  {"image": (3, h, w) uint8 tensor, "height": H, "width": W} (H, W: the original size).
  Used by the dataset mapper's test branch, `PETRPredictor`, the TTA views and the ONNX predictor.
- `batch_images` (device, a batch): normalisation, zero padding bottom/right to a common size
  (the official collate), the unpadded image sizes and the padding mask, as `PETRImages`. Used by
  `PETR.preprocess_image` (every PyTorch route). `batch_tensor` is the same for a batch that
  arrives already padded, with a (B, 2) size tensor: the exported ONNX graph's input.
"""

import functools
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import Tensor

from .transforms import CV2ResizeTransform, rescale_size

__all__ = [
    "PETRImages",
    "PETRPreprocessor",
    "batch_images",
    "batch_tensor",
    "padding_mask",
    "test_resize",
]

CHANNEL_ORDERS = ("BGR", "RGB")


def test_resize(image: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """The official test resize of an (h, w, C) image: keep the aspect ratio, short side
    `min_size`, long side at most `max_size` (mmcv `imrescale` rounding), cv2 bilinear.
    min_size 0 means no resize (Detectron2's convention for INPUT.MIN_SIZE_TEST)."""
    if min_size == 0:
        return image
    h, w = image.shape[:2]
    new_h, new_w = rescale_size(h, w, min_size, max_size)
    if (new_h, new_w) == (h, w):
        return image
    return CV2ResizeTransform(h, w, new_h, new_w).apply_image(image)


class PETRPreprocessor:
    """Original image -> one model input dict (the host half of the front door)."""

    @configurable
    def __init__(self, *, min_size: int, max_size: int, input_format: str = "RGB"):
        if input_format not in CHANNEL_ORDERS:
            raise ValueError(f"INPUT.FORMAT must be one of {CHANNEL_ORDERS}, got {input_format!r}")
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg):
        return {
            "min_size": cfg.INPUT.MIN_SIZE_TEST,
            "max_size": cfg.INPUT.MAX_SIZE_TEST,
            "input_format": cfg.INPUT.FORMAT,
        }

    def __repr__(self) -> str:
        return (
            f"PETRPreprocessor(min_size={self.min_size}, max_size={self.max_size}, "
            f"input_format={self.input_format!r})"
        )

    def __call__(
        self,
        image: np.ndarray,
        image_format: str | None = None,
        *,
        min_size: int | None = None,
        max_size: int | None = None,
        flip: bool = False,
    ) -> Dict:
        """image: (H, W, 3) uint8 in `image_format` ("BGR" or "RGB"; default INPUT.FORMAT).
        min_size / max_size override the test resize (TTA scales; min_size 0: no resize).
        Returns {"image": (3, h, w) uint8 tensor in INPUT.FORMAT, resized, mirrored when
        `flip`; "height": H, "width": W} with (H, W) the original size."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"PETR needs an (H, W, 3) image, got shape {image.shape}")
        image_format = image_format or self.input_format
        if image_format not in CHANNEL_ORDERS:
            raise ValueError(f"image_format must be one of {CHANNEL_ORDERS}, got {image_format!r}")
        height, width = image.shape[:2]
        if image_format != self.input_format:
            image = image[:, :, ::-1]
        resized = test_resize(
            np.ascontiguousarray(image),
            self.min_size if min_size is None else int(min_size),
            self.max_size if max_size is None else int(max_size),
        )
        if flip:  # after the resize, as the official flip test mirrors the resized image
            resized = resized[:, ::-1]
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}


@dataclass
class PETRImages:
    """A normalised, zero-padded batch: the network input.

    tensor (B, 3, H, W) float; image_sizes [(h, w)] the unpadded size of each image (Python
    ints; a (B, 2) int64 tensor from `batch_tensor`); padding_mask (B, H, W) bool, True on
    padding.
    """

    tensor: Tensor
    image_sizes: List[Tuple[int, int]]
    padding_mask: Tensor

    def __len__(self) -> int:
        return len(self.image_sizes)


def batch_images(
    images: Sequence[Tensor],
    pixel_mean: Tensor,
    pixel_std: Tensor,
    size_divisibility: int = 1,
    device: torch.device | None = None,
) -> PETRImages:
    """The device half of the front door. images: (3, h, w) tensors (uint8 or float, raw 0-255
    values in INPUT.FORMAT order); pixel_mean / pixel_std: (3, 1, 1). Each image is moved to
    `device` (default: pixel_mean's), normalised, then the batch is zero-padded bottom/right to
    the largest size rounded up to `size_divisibility`.

    Same values as `ImageList.from_tensors(normalised, size_divisibility, 0.0)`, but sizes stay
    Python ints (from_tensors turns them into tensors and reads them back, which breaks
    torch.compile's graph), and the padding mask comes with them."""
    if not len(images):
        raise ValueError("batch_images needs at least one image")
    device = pixel_mean.device if device is None else device
    normed = [_normalize(im.to(device), pixel_mean, pixel_std) for im in images]
    # No int(), no Python max() and no slice assignment on sizes: under torch.compile(dynamic)
    # they are symbolic, and int() would pin them (a graph per size), max() and `dst[:h] = img`
    # guard on which image is larger (a graph per order).
    sizes = [(im.shape[-2], im.shape[-1]) for im in normed]
    H = _round_up(functools.reduce(torch.sym_max, [h for h, _ in sizes]), size_divisibility)
    W = _round_up(functools.reduce(torch.sym_max, [w for _, w in sizes]), size_divisibility)
    if len(normed) == 1 and sizes[0] == (H, W):
        batch = normed[0][None]
    else:
        batch = torch.stack([F.pad(im, (0, W - w, 0, H - h)) for im, (h, w) in zip(normed, sizes)])
    return PETRImages(batch, sizes, padding_mask(batch, sizes))


def _normalize(image: Tensor, pixel_mean: Tensor, pixel_std: Tensor) -> Tensor:
    return (image.float() - pixel_mean) / pixel_std


def _round_up(size, divisibility: int):
    d = max(int(divisibility), 1)
    return -(-size // d) * d


def batch_tensor(
    batch: Tensor,
    image_sizes: Tensor,
    pixel_mean: Tensor,
    pixel_std: Tensor,
    size_divisibility: int = 1,
) -> PETRImages:
    """`batch_images` for a batch that is already padded bottom/right: batch (B, 3, H, W) raw
    values in INPUT.FORMAT order, image_sizes (B, 2) int64, the unpadded (h, w) of each image.
    Tensor ops only, with no host read of a size, so B, H, W and the sizes stay dynamic in an
    exported graph. Whatever the caller padded with, the padding becomes zeros after
    normalisation, as `batch_images` pads, so both give the same network input."""
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"Expected a (B, 3, H, W) image batch, got {tuple(batch.shape)}")
    if image_sizes.dim() != 2 or image_sizes.shape[1] != 2:
        raise ValueError(f"Expected (B, 2) image_sizes, got {tuple(image_sizes.shape)}")
    normed = _normalize(batch, pixel_mean, pixel_std)
    if size_divisibility > 1:  # no pad op otherwise: the tracer (torch 2.3) would turn the
        H, W = batch.shape[-2:]  # level sizes into tensors
        pad_w, pad_h = _round_up(W, size_divisibility) - W, _round_up(H, size_divisibility) - H
        normed = F.pad(normed, (0, pad_w, 0, pad_h))
    mask = padding_mask(normed, image_sizes)
    return PETRImages(normed.masked_fill(mask[:, None], 0.0), image_sizes, mask)


def padding_mask(batch: Tensor, image_sizes) -> Tensor:
    """(B, H, W) bool, True on the padding of a (B, C, H, W) batch padded bottom/right.

    image_sizes: B (h, w) pairs of ints (or symbolic ints), or a (B, 2) int64 tensor (an
    exported graph's input, whose batch and sizes are dynamic)."""
    B, _, H, W = batch.shape
    if isinstance(image_sizes, Tensor):
        sizes = image_sizes.to(batch.device)
        rows = torch.arange(H, device=batch.device)[None, :, None] >= sizes[:, 0, None, None]
        cols = torch.arange(W, device=batch.device)[None, None, :] >= sizes[:, 1, None, None]
        return rows | cols
    mask = torch.ones((B, H, W), dtype=torch.bool, device=batch.device)
    for i, (h, w) in enumerate(image_sizes):
        mask[i, :h, :w] = False
    return mask
