"""ONNX export of PETR inference: one graph for every image size and batch size.

The exported graph takes
    image        (B, 3, H, W) float32  a batch padded bottom/right (any padding values)
    image_sizes  (B, 2) int64          the unpadded (h, w) of each image
and returns, per image,
    scores     (B, N)        sigmoid pose scores, sorted descending
    keypoints  (B, N, K, 3)  (x, y) in pixels of that image's unpadded input, then the joint
                             score (the heatmap branch at the joint; 1 with
                             MODEL.PETR.JOINT_SCORES none)
    boxes      (B, N, 4)     xyxy pixels, the tight box of the keypoints
with N = min(TEST.DETECTIONS_PER_IMAGE, MODEL.PETR.NUM_QUERIES). The front door's
`batch_tensor` (normalisation, padding mask from `image_sizes`) and the back door's
`keypoints_to_pixels` run inside the graph: the same code as every PyTorch route.

Exporter: on torch >= 2.6 the `torch.export`-based exporter (`dynamo=True`) with dynamic B, H
and W; on older torch (the floor stack, 2.3) the TorchScript tracer, which freezes B, H and W
at the export size (image_sizes stays an input, so the padding mask is still built in-graph).

Deformable attention: the explicit `deform_attn_backend("reference")` switch, chosen over an
onnxscript translation of `petr::ms_deform_attn`. The reference's GridSample decomposition (one
GridSample per level) is made of standard ops whose level sizes are already symbolic, so it
exports with dynamic sizes as is, and its parity with the kernel is tested; a translation would
emit the same ops (its SymInt[] level sizes arriving as int64 scalars), only grouped into one
ONNX function per call, which helps a runtime with a native deformable-attention kernel: we ship
none, and onnxruntime runs the decomposition (tools/benchmark.py --backends). The compiled
`petr._C` kernel cannot run in ONNX.

OKS-NMS (MODEL.PETR.OKS_NMS_THRESH_TEST > 0) keeps fixed shapes: `oks_suppressed`, the core of
the back door's `oks_nms`, marks the dropped poses and the graph sets their scores to 0 (rows
stay in score order of the un-suppressed model; filter score > 0 to get the kept poses).
"""

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn as nn

from petr.data.preprocess import batch_tensor
from petr.layers import deform_attn_backend
from petr.modeling.postprocess import keypoint_boxes, keypoints_to_pixels, oks_suppressed
from petr.utils.ort_session import ort_session

__all__ = [
    "DEFAULT_OPSET",
    "DYNAMIC_EXPORT",
    "INPUT_NAMES",
    "MIN_OPSET",
    "OUTPUT_NAMES",
    "PETRONNXWrapper",
    "compare_predictions",
    "export_petr_onnx",
    "run_onnxruntime",
    "run_reference",
]

MIN_OPSET = 16  # GridSample entered the ONNX standard in opset 16
INPUT_NAMES = ("image", "image_sizes")
OUTPUT_NAMES = ("scores", "keypoints", "boxes")
DYNAMIC_EXPORT = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 6)
DEFAULT_OPSET = 18 if DYNAMIC_EXPORT else 17  # the newest the TorchScript exporter of 2.3 has
MIN_SIDE = 65  # the smallest H and W the dynamic export accepts (>= 2 cells at stride 64)


class PETRONNXWrapper(nn.Module):
    """PETR inference on a padded (B, 3, H, W) batch with its (B, 2) unpadded sizes, returning
    plain tensors (see the module docstring).

    image: float32 in the model's INPUT.FORMAT channel order, raw 0-255 values, or already
    normalised ((x - PIXEL_MEAN) / PIXEL_STD) when `normalized_input` is True.
    """

    def __init__(self, model: nn.Module, normalized_input: bool = False):
        super().__init__()
        for part in ("predict", "postprocess"):
            if not hasattr(model, part):
                raise TypeError(f"Expected a PETR model, got {type(model).__name__} (no {part})")
        self.model = model
        self.normalized_input = normalized_input

    def forward(
        self, image: torch.Tensor, image_sizes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        mean, std = m.pixel_mean, m.pixel_std
        if self.normalized_input:
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
        images = batch_tensor(image, image_sizes, mean, std, m.size_divisibility)
        pred = m.predict(images)
        hw = image_sizes.to(pred.keypoints.dtype)[:, :, None, None]  # (B, 2, 1, 1)
        xy = keypoints_to_pixels(pred.keypoints, (hw[:, 0], hw[:, 1]), (1.0, 1.0),
                                 m.output_pixel_offset)  # fmt: skip
        scores = pred.scores
        if m.oks_nms_thresh > 0:
            dropped = oks_suppressed(xy, m.oks_sigmas, m.oks_nms_thresh)
            scores = scores.masked_fill(dropped, 0.0)
        joint = pred.joint_scores if pred.joint_scores is not None else torch.ones_like(xy[..., 0])
        keypoints = torch.cat([xy, joint[..., None].to(xy.dtype)], -1)
        return scores, keypoints, keypoint_boxes(xy)


def _check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset {opset} is not supported: PETR's deformable attention exports as GridSample, "
            f"which needs opset >= {MIN_OPSET}"
        )


def _dummy(sizes, normalized: bool, seed: int = 0):
    """A padded batch of random images of the given (h, w) sizes and its size tensor."""
    g = torch.Generator().manual_seed(seed)  # leave the global RNG alone
    H, W = max(h for h, _ in sizes), max(w for _, w in sizes)
    image = torch.zeros(len(sizes), 3, H, W)
    for i, (h, w) in enumerate(sizes):
        image[i, :, :h, :w] = torch.rand(3, h, w, generator=g) * (1.0 if normalized else 255.0)
    return image, torch.tensor(sizes, dtype=torch.int64)


def export_petr_onnx(
    model: nn.Module,
    path: str,
    height: int,
    width: int,
    *,
    opset: int = DEFAULT_OPSET,
    normalized_input: bool = False,
    min_size: int = MIN_SIDE,
    max_size: int = 2048,
    max_batch: int = 64,
) -> PETRONNXWrapper:
    """Export `model` (a PETR; moved to CPU and set to eval in place) to `path`. With
    DYNAMIC_EXPORT it is traced on a padded batch of 2 images of about height x width and serves
    any B in [1, max_batch] and H, W in [min_size, max_size]; otherwise (torch < 2.6, the
    TorchScript tracer) it is traced on one height x width image and B, H and W are frozen at
    (1, height, width). Returns the exported wrapper (for comparisons). Raises ValueError for
    opset < 16, a size outside the bounds, or a size the model refuses."""
    _check_opset(opset)
    if min(height, width) < 1 or min_size < 1:
        raise ValueError(f"Input size must be positive, got {height}x{width}")
    if DYNAMIC_EXPORT and not (max(min_size, MIN_SIDE) <= min(height, width)):
        raise ValueError(f"Export size {height}x{width}: H and W must be >= {MIN_SIDE}")
    if DYNAMIC_EXPORT and max(height, width) > max_size:
        raise ValueError(f"Export size {height}x{width} exceeds --max-size {max_size}")
    # eval() on the wrapper itself: export restores the wrapper's mode afterwards, and a wrapper
    # left in training mode would switch the wrapped model's dropout back on.
    wrapper = PETRONNXWrapper(model.cpu(), normalized_input).eval()
    # Two images of different sizes, so that neither the batch nor the padding specialises; the
    # tracer freezes whatever it sees, so it gets the one image size a fixed graph serves.
    small = (max(height - 16, min(height, max(min_size, MIN_SIDE))), width)
    sizes = [(height, width), small] if DYNAMIC_EXPORT else [(height, width)]
    args = _dummy(sizes, normalized_input)
    with deform_attn_backend("reference"), torch.no_grad():
        # One eager run first: the model's own errors (e.g. too few encoder tokens) surface as
        # they are instead of wrapped in the exporter's errors.
        wrapper(*args)
        kwargs = {}
        if DYNAMIC_EXPORT:
            Dim = torch.export.Dim
            b = Dim("B", min=1, max=max_batch)
            lo = max(min_size, MIN_SIDE)
            h, w = Dim("H", min=lo, max=max_size), Dim("W", min=lo, max=max_size)
            kwargs = {
                "dynamo": True,
                "dynamic_shapes": {"image": {0: b, 2: h, 3: w}, "image_sizes": {0: b}},
                "optimize": True,
            }
        else:
            import warnings

            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            kwargs = {"do_constant_folding": True}
        torch.onnx.export(
            wrapper,
            args,
            path,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            **kwargs,
        )
    return wrapper


def run_onnxruntime(path: str, image: torch.Tensor, image_sizes=None) -> Dict[str, np.ndarray]:
    """Run the exported graph on CPU with onnxruntime. image (B, 3, H, W) float32; image_sizes
    (B, 2) (default: every image unpadded)."""
    session = ort_session(path)
    if image_sizes is None:
        image_sizes = torch.tensor([image.shape[-2:]] * image.shape[0])
    feeds = {"image": image.detach().cpu().numpy(), "image_sizes": np.asarray(image_sizes)}
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), feeds)))


def run_reference(wrapper: PETRONNXWrapper, image: torch.Tensor, image_sizes=None):
    """The PyTorch outputs of the exported computation (reference deformable attention)."""
    if image_sizes is None:
        image_sizes = torch.tensor([image.shape[-2:]] * image.shape[0])
    wrapper.eval()
    with deform_attn_backend("reference"), torch.no_grad():
        outs = wrapper(image, torch.as_tensor(image_sizes, dtype=torch.int64))
    return {k: v.numpy() for k, v in zip(OUTPUT_NAMES, outs)}


def compare_predictions(
    ref: Dict[str, np.ndarray], other: Dict[str, np.ndarray], tie_tol: float = 1e-4
) -> Dict[str, float]:
    """Max absolute differences between two sets of sorted predictions, of one image
    (scores (N,)) or a batch (scores (B, N): the worst image).

    Scores are compared sorted. Poses whose score lies within `tie_tol` of another pose's may
    legitimately swap places between runtimes (topk breaks ties arbitrarily), so keypoints and
    boxes are compared only at ranks whose reference score is isolated. Returns max |diff| of
    scores, keypoints (pixels), boxes (pixels) and the number of isolated ranks compared.
    """
    for name in OUTPUT_NAMES:
        if ref[name].shape != other[name].shape:
            raise ValueError(f"{name}: shapes differ, {ref[name].shape} vs {other[name].shape}")
    if ref["scores"].ndim == 2:
        per_image = [
            compare_predictions({k: v[b] for k, v in ref.items()},
                                {k: v[b] for k, v in other.items()}, tie_tol)
            for b in range(ref["scores"].shape[0])
        ]  # fmt: skip
        worst = {k: max(d[k] for d in per_image) for k in ("scores", "keypoints", "boxes")}
        return {**worst, "compared": sum(d["compared"] for d in per_image)}
    s_ref = np.sort(ref["scores"])[::-1]
    s_other = np.sort(other["scores"])[::-1]
    scores = ref["scores"]
    gaps = np.abs(scores[:, None] - scores[None, :])
    np.fill_diagonal(gaps, np.inf)
    isolated = gaps.min(1) > tie_tol if len(scores) > 1 else np.ones(len(scores), bool)
    result = {
        "scores": float(np.abs(s_ref - s_other).max(initial=0.0)),
        "compared": int(isolated.sum()),
    }
    for name in ("keypoints", "boxes"):
        diff = np.abs(ref[name][isolated] - other[name][isolated])
        result[name] = float(diff.max(initial=0.0))
    return result
