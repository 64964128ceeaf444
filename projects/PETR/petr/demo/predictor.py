"""Run a PETR model on single images or video frames and draw the poses (Detectron2 demo style)."""

from typing import Iterator, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine.defaults import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import _KEYPOINT_THRESHOLD, ColorMode, VisImage, Visualizer

from ..checkpoint.checkpointer import PETRCheckpointer
from ..config import check_config
from ..data.metadata import check_keypoint_compat, check_metadata_keypoints
from ..data.preprocess import PETRPreprocessor
from ..modeling.compile import compile_model
from ..modeling.test_time_augmentation import PETRWithTTA

__all__ = ["PETRPredictor", "VisualizationDemo", "draw_poses"]


class PETRPredictor(DefaultPredictor):
    """`DefaultPredictor` (weights from MODEL.WEIGHTS, BGR input, one image in, one output dict
    out) whose input goes through PETR's front door (`PETRPreprocessor`: channel order, the
    test resize with mmcv rounding and cv2 bilinear). With TEST.AUG.ENABLED the model is wrapped
    in `PETRWithTTA`, which takes the original image and resizes it to each of its own scales.
    With MODEL.PETR.COMPILE.ENABLED the model runs under torch.compile. Outputs are in
    original-image pixels."""

    def __init__(self, cfg, config_file=None):
        # DefaultPredictor.__init__ with PETR's checks, checkpointer (official checkpoints,
        # safe loading) and front door; `config_file` only names the config in loading errors.
        check_config(cfg)
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        check_keypoint_compat(cfg, self.model)
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        PETRCheckpointer.from_config(cfg, self.model, config_file=config_file).load(
            cfg.MODEL.WEIGHTS
        )
        self.input_format = cfg.INPUT.FORMAT
        compile_model(self.model, cfg)  # MODEL.PETR.COMPILE
        self.preprocessor = PETRPreprocessor(cfg)
        self.resize = True
        if cfg.TEST.AUG.ENABLED:
            self.model = PETRWithTTA(cfg, self.model).eval()
            self.resize = False  # TTA resizes the original image itself

    def __call__(self, original_image: np.ndarray) -> dict:
        """original_image: (H, W, 3) uint8 BGR (cv2 order). Returns {"instances": Instances}."""
        inputs = self.preprocessor(original_image, "BGR", min_size=None if self.resize else 0)
        with torch.no_grad():
            return self.model([inputs])[0]


def _confident(instances: Instances, threshold: float) -> Instances:
    return instances[instances.scores >= threshold]


def _joints_over(instances: Instances, keypoint_threshold: float) -> Instances:
    """A copy whose joint scores are 1 above `keypoint_threshold` and 0 elsewhere, for drawers
    that keep Detectron2's fixed threshold (VideoVisualizer): the same joints get drawn."""
    if not instances.has("pred_keypoints"):
        return instances
    out = Instances(instances.image_size, **instances.get_fields())
    kpts = instances.pred_keypoints.clone()
    kpts[..., 2] = (kpts[..., 2] > keypoint_threshold).to(kpts)
    out.pred_keypoints = kpts
    return out


def draw_poses(
    image_rgb: np.ndarray,
    instances: Instances,
    metadata,
    confidence_threshold: float = 0.3,
    instance_mode: ColorMode = ColorMode.IMAGE,
    keypoint_threshold: float = _KEYPOINT_THRESHOLD,
) -> VisImage:
    """Draw the poses scoring >= confidence_threshold on an (H, W, 3) RGB image with Detectron2's
    `Visualizer`: joints whose score (pred_keypoints[..., 2]) exceeds keypoint_threshold, the
    skeleton of the metadata's `keypoint_connection_rules` (any K) between them, keypoint-tight
    boxes and scores. instances: pred_keypoints (N, K, 3) pixels of this image."""
    if instances.has("pred_keypoints"):
        check_metadata_keypoints(metadata, instances.pred_keypoints.shape[1])
    visualizer = Visualizer(image_rgb, metadata, instance_mode=instance_mode)
    visualizer.keypoint_threshold = keypoint_threshold
    return visualizer.draw_instance_predictions(
        _confident(instances.to("cpu"), confidence_threshold)
    )


def _shrink_for_drawing(image, instances, scale):
    """The image and the poses (pixels) scaled by `scale` < 1, for drawing only."""
    h, w = (max(1, round(side * scale)) for side in image.shape[:2])
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    shrunk = Instances((h, w), **instances.get_fields())
    if shrunk.has("pred_keypoints"):
        kpts = shrunk.pred_keypoints.clone()
        kpts[..., :2] *= scale
        shrunk.pred_keypoints = kpts
    if shrunk.has("pred_boxes"):
        boxes = shrunk.pred_boxes.clone()
        boxes.scale(scale, scale)
        shrunk.pred_boxes = boxes
    return image, shrunk


class VisualizationDemo:
    """Predict and draw poses on images and videos; the metadata (joint names, skeleton) comes
    from cfg.DATASETS.TEST[0]. With `onnx_path`, predictions come from `PETRONNXPredictor`."""

    def __init__(
        self,
        cfg,
        confidence_threshold=0.3,
        instance_mode=ColorMode.IMAGE,
        config_file=None,
        keypoint_threshold=_KEYPOINT_THRESHOLD,
        onnx_path=None,
    ):
        self.metadata = MetadataCatalog.get(
            cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
        )
        self.confidence_threshold = confidence_threshold
        self.keypoint_threshold = keypoint_threshold
        self.instance_mode = instance_mode
        if onnx_path:  # an exported graph on onnxruntime, with no model code
            from ..export.onnx_predictor import PETRONNXPredictor

            self.predictor = PETRONNXPredictor(cfg, onnx_path)
        else:
            self.predictor = PETRPredictor(cfg, config_file)  # checks the TEST keypoints

    def run_on_image(self, image: np.ndarray, max_side=None) -> Tuple[dict, VisImage]:
        """image: (H, W, 3) uint8 BGR. Returns (predictions, the drawing as a VisImage (RGB)).
        max_side: draw on the image shrunk to this long side when it is longer (drawing a
        48 MP photo at full size takes several GB); None: full size."""
        predictions = self.predictor(image)
        instances = predictions["instances"]
        scale = min(1.0, max_side / max(image.shape[:2])) if max_side else 1.0
        if scale < 1:
            image, instances = _shrink_for_drawing(image, instances.to("cpu"), scale)
        vis = draw_poses(
            image[:, :, ::-1], instances, self.metadata,
            self.confidence_threshold, self.instance_mode, self.keypoint_threshold,
        )  # fmt: skip
        return predictions, vis

    def run_on_video(self, video: cv2.VideoCapture) -> Iterator[np.ndarray]:
        """Yields one drawn (H, W, 3) uint8 BGR frame per frame read from `video`; colours stay
        with a person across frames (VideoVisualizer)."""
        visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        while video.isOpened():
            ok, frame = video.read()
            if not ok:
                break
            instances = self.predictor(frame)["instances"].to("cpu")
            instances = _confident(instances, self.confidence_threshold)
            instances = _joints_over(instances, self.keypoint_threshold)
            vis = visualizer.draw_instance_predictions(frame[:, :, ::-1], instances)
            yield cv2.cvtColor(vis.get_image(), cv2.COLOR_RGB2BGR)
