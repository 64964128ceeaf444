"""ONNX export of PETR inference for one image of a fixed size.

The exported graph takes a (1, 3, H, W) float32 image and returns, sorted by descending score,
    scores     (N,)       sigmoid pose scores
    keypoints  (N, K, 3)  (x, y) in pixels of the input image, then the joint score (the heatmap
                          branch at the joint; 1 with MODEL.PETR.JOINT_SCORES none)
    boxes      (N, 4)     xyxy pixels, the tight box of the keypoints
with N = min(TEST.DETECTIONS_PER_IMAGE, MODEL.PETR.NUM_QUERIES).

Exporter: `torch.onnx.export` with torch's default, the `torch.export`-based exporter (with
onnxscript) on torch >= 2.9, the TorchScript tracer on older torch (the floor stack).

Limits:
- H and W are frozen at export time: feature-map sizes travel as Python ints
  (`EncoderMemory.spatial_shapes`) into reference points, position encodings and the per-level
  split of the deformable attention, so both exporters record them as constants. onnxruntime
  rejects an input of any other size.
- Batch size 1, no padding: the padding mask is all False and is folded into constants.
- Deformable attention runs the pure-PyTorch reference (GridSample, opset >= 16), chosen with
  `petr.layers.deform_attn_backend("reference")`, never the compiled `petr._C` kernel, which
  ONNX cannot express.
"""

import warnings
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn as nn

from petr.data.preprocess import batch_images
from petr.layers import deform_attn_backend

__all__ = [
    "MIN_OPSET",
    "OUTPUT_NAMES",
    "PETRONNXWrapper",
    "compare_predictions",
    "export_petr_onnx",
    "run_onnxruntime",
    "run_reference",
]

MIN_OPSET = 16  # GridSample entered the ONNX standard in opset 16
INPUT_NAME = "image"
OUTPUT_NAMES = ("scores", "keypoints", "boxes")


class PETRONNXWrapper(nn.Module):
    """PETR inference on one unpadded (1, 3, H, W) image, returning plain tensors.

    image: float32 in the model's INPUT.FORMAT channel order, raw 0-255 values, or already
    normalised ((x - PIXEL_MEAN) / PIXEL_STD) when `normalized_input` is True.
    Returns scores (N,), keypoints (N, K, 3) and boxes (N, 4), pixels of the input image.
    """

    def __init__(self, model: nn.Module, normalized_input: bool = False):
        super().__init__()
        for part in ("predict", "postprocess"):
            if not hasattr(model, part):
                raise TypeError(f"Expected a PETR model, got {type(model).__name__} (no {part})")
        self.model = model
        self.normalized_input = normalized_input

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
            raise ValueError(f"Expected a (1, 3, H, W) image, got {tuple(image.shape)}")
        m = self.model
        # The front door's batching (normalisation, sizes, padding mask), as every route.
        mean, std = m.pixel_mean, m.pixel_std
        if self.normalized_input:
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
        images = batch_images([image[0]], mean, std, m.size_divisibility)
        inst = m.postprocess(m.predict(images), [{}], images.image_sizes)[0]["instances"]
        return inst.scores, inst.pred_keypoints, inst.pred_boxes.tensor


def _check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset {opset} is not supported: PETR's deformable attention exports as GridSample, "
            f"which needs opset >= {MIN_OPSET}"
        )


def export_petr_onnx(
    model: nn.Module,
    path: str,
    height: int,
    width: int,
    *,
    opset: int = 17,
    normalized_input: bool = False,
) -> PETRONNXWrapper:
    """Trace `model` (a PETR; moved to CPU and set to eval in place) on a (1, 3, height, width)
    image and write the ONNX graph to `path`. Returns the exported wrapper (for comparisons).
    Raises ValueError for opset < 16, a non-positive size, or a size the model refuses."""
    _check_opset(opset)
    if height <= 0 or width <= 0:
        raise ValueError(f"Input size must be positive, got {height}x{width}")
    # eval() on the wrapper itself: torch.onnx.export restores the wrapper's mode afterwards, and
    # a wrapper left in training mode would switch the wrapped model's dropout back on.
    wrapper = PETRONNXWrapper(model.cpu(), normalized_input).eval()
    g = torch.Generator().manual_seed(0)  # leave the global RNG alone
    dummy = torch.rand(1, 3, height, width, generator=g) * (1.0 if normalized_input else 255.0)
    with deform_attn_backend("reference"), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns wherever a shape becomes a constant: the fixed size is by design.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # One eager run first: the model's own errors (e.g. too few encoder tokens) surface as
        # they are instead of wrapped in the exporter's TorchExportError.
        wrapper(dummy)
        torch.onnx.export(
            wrapper,
            (dummy,),
            path,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            do_constant_folding=True,
        )
    return wrapper


def run_onnxruntime(path: str, image: torch.Tensor) -> Dict[str, np.ndarray]:
    """Run the exported graph on CPU with onnxruntime. image (1, 3, H, W) float32."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    outs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: image.detach().cpu().numpy()})
    return dict(zip(OUTPUT_NAMES, outs))


def run_reference(wrapper: PETRONNXWrapper, image: torch.Tensor) -> Dict[str, np.ndarray]:
    """The PyTorch outputs of the exported computation (reference deformable attention)."""
    wrapper.eval()
    with deform_attn_backend("reference"), torch.no_grad():
        outs = wrapper(image)
    return {k: v.numpy() for k, v in zip(OUTPUT_NAMES, outs)}


def compare_predictions(
    ref: Dict[str, np.ndarray], other: Dict[str, np.ndarray], tie_tol: float = 1e-4
) -> Dict[str, float]:
    """Max absolute differences between two sets of sorted predictions.

    Scores are compared sorted. Poses whose score lies within `tie_tol` of another pose's may
    legitimately swap places between runtimes (topk breaks ties arbitrarily), so keypoints and
    boxes are compared only at ranks whose reference score is isolated. Returns max |diff| of
    scores, keypoints (pixels), boxes (pixels) and the number of isolated ranks compared.
    """
    for name in OUTPUT_NAMES:
        if ref[name].shape != other[name].shape:
            raise ValueError(f"{name}: shapes differ, {ref[name].shape} vs {other[name].shape}")
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
