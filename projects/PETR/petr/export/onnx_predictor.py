"""Run an exported PETR graph (tools/export_onnx.py) with onnxruntime, PETRPredictor-style:
BGR image in, Detectron2 `Instances` in original-image pixels out, with no model code.

The front door is PETR's own `PETRPreprocessor` (channel order, test resize); the back door is
the model-free part of `PETR.postprocess` (`keypoints_to_pixels`' scaling, `pose_instances`).
"""

import numpy as np
import torch

from ..data.preprocess import PETRPreprocessor
from ..modeling.postprocess import pose_instances
from ..utils.ort_session import ort_session
from .onnx_wrapper import INPUT_NAMES, OUTPUT_NAMES

__all__ = ["PETRONNXPredictor"]


class PETRONNXPredictor:
    """`PETRPredictor` on onnxruntime. cfg: the config the graph was exported from (INPUT.FORMAT,
    the test resize, OUTPUT_PIXEL_OFFSET, OKS_NMS_THRESH_TEST); onnx_path: the exported graph.
    The graph must take raw 0-255 input (exported without --normalized-input)."""

    def __init__(self, cfg, onnx_path: str, providers=("CPUExecutionProvider",), threads=None):
        if cfg.TEST.AUG.ENABLED:
            raise ValueError("TEST.AUG.ENABLED: test-time augmentation is not exported to ONNX")
        self.session = ort_session(onnx_path, threads, providers)
        names = tuple(i.name for i in self.session.get_inputs())
        if names != INPUT_NAMES:
            raise ValueError(
                f"{onnx_path}: inputs {names}, expected {INPUT_NAMES} (export it again with "
                "tools/export_onnx.py)"
            )
        # A fixed-size graph (the floor stack's traced export) gets each image padded to its size;
        # its in-graph padding mask (from image_sizes) keeps the padding out of the attention.
        shape = self.session.get_inputs()[0].shape
        self.fixed_hw = tuple(shape[2:]) if all(isinstance(d, int) for d in shape[2:]) else None
        self.preprocessor = PETRPreprocessor(cfg)
        self.pixel_offset = cfg.MODEL.PETR.OUTPUT_PIXEL_OFFSET
        self.oks_nms = cfg.MODEL.PETR.OKS_NMS_THRESH_TEST > 0

    def __call__(self, original_image: np.ndarray) -> dict:
        """original_image: (H, W, 3) uint8 BGR (cv2 order). Returns {"instances": Instances}
        sorted by descending score, in pixels of the original image."""
        inputs = self.preprocessor(original_image, "BGR")
        image = inputs["image"].numpy().astype(np.float32)[None]
        h, w = image.shape[-2:]
        if self.fixed_hw is not None:
            H, W = self.fixed_hw
            if h > H or w > W:
                raise ValueError(f"a {h}x{w} input does not fit the graph's fixed {H}x{W}")
            image = np.pad(image, ((0, 0), (0, 0), (0, H - h), (0, W - w)))
        feeds = {"image": image, "image_sizes": np.array([[h, w]], dtype=np.int64)}
        out = dict(zip(OUTPUT_NAMES, self.session.run(list(OUTPUT_NAMES), feeds)))
        scores = torch.from_numpy(out["scores"][0])
        xy = torch.from_numpy(out["keypoints"][0][..., :2])
        joint_scores = torch.from_numpy(out["keypoints"][0][..., 2])
        # the graph's pixels are those of the resized input: scale them as postprocess does
        scale = xy.new_tensor([inputs["width"] / w, inputs["height"] / h])
        xy = (xy - self.pixel_offset) * scale + self.pixel_offset
        if self.oks_nms:  # the graph zeroes the scores of suppressed poses
            keep = torch.nonzero(scores > 0)[:, 0]
            scores, xy, joint_scores = scores[keep], xy[keep], joint_scores[keep]
        order = scores.argsort(descending=True, stable=True)
        size = (inputs["height"], inputs["width"])
        return {"instances": pose_instances(xy[order], scores[order], size, joint_scores[order])}
