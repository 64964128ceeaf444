"""Run a PETR model on single images or video frames and draw the poses (Detectron2 demo style)."""

from typing import Iterator, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine.defaults import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, VisImage, Visualizer

from ..checkpoint.checkpointer import PETRCheckpointer
from ..config import check_config
from ..data.transforms import build_petr_augmentation
from ..modeling.compile import compile_model
from ..modeling.test_time_augmentation import PETRWithTTA

__all__ = ["PETRPredictor", "VisualizationDemo", "draw_poses"]


class PETRPredictor(DefaultPredictor):
    """`DefaultPredictor` (weights from MODEL.WEIGHTS, BGR input converted to INPUT.FORMAT, one
    image in, one output dict out) with PETR's test resize: short side INPUT.MIN_SIZE_TEST, long
    side <= INPUT.MAX_SIZE_TEST, mmcv rounding, cv2 bilinear. With TEST.AUG.ENABLED the model is
    wrapped in `PETRWithTTA`, which resizes the original image to each of its own scales.
    With MODEL.PETR.COMPILE.ENABLED the model runs under torch.compile. Outputs are in
    original-image pixels."""

    def __init__(self, cfg, config_file=None):
        # DefaultPredictor.__init__ with PETR's checks and checkpointer (official checkpoints,
        # safe loading); `config_file` only names the config in loading errors.
        check_config(cfg)
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        PETRCheckpointer.from_config(cfg, self.model, config_file=config_file).load(
            cfg.MODEL.WEIGHTS
        )
        self.input_format = cfg.INPUT.FORMAT
        compile_model(self.model, cfg)  # MODEL.PETR.COMPILE
        self.augmentations = T.AugmentationList(build_petr_augmentation(cfg, is_train=False))
        if cfg.TEST.AUG.ENABLED:
            self.model = PETRWithTTA(cfg, self.model).eval()
            self.augmentations = T.AugmentationList([])

    def __call__(self, original_image: np.ndarray) -> dict:
        """original_image: (H, W, 3) uint8 BGR (cv2 order). Returns {"instances": Instances}."""
        if original_image.ndim != 3 or original_image.shape[2] != 3:
            raise ValueError(
                f"PETRPredictor needs an (H, W, 3) BGR image, got {original_image.shape}"
            )
        image = original_image[:, :, ::-1] if self.input_format == "RGB" else original_image
        height, width = image.shape[:2]
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        with torch.no_grad():
            return self.model([{"image": tensor, "height": height, "width": width}])[0]


def check_keypoint_metadata(metadata, num_keypoints: int) -> None:
    """Drawing names joints by `keypoint_names` (and connects them by
    `keypoint_connection_rules`); a list of another length would mislabel every joint."""
    names = metadata.get("keypoint_names")
    if names and len(names) != num_keypoints:
        raise ValueError(
            f"Metadata {metadata.name!r} has {len(names)} keypoint_names but the model predicts "
            f"{num_keypoints} keypoints: set DATASETS.TEST to a dataset with this model's joints"
        )


def _confident(instances: Instances, threshold: float) -> Instances:
    return instances[instances.scores >= threshold]


def draw_poses(
    image_rgb: np.ndarray,
    instances: Instances,
    metadata,
    confidence_threshold: float = 0.3,
    instance_mode: ColorMode = ColorMode.IMAGE,
) -> VisImage:
    """Draw the poses scoring >= confidence_threshold on an (H, W, 3) RGB image with Detectron2's
    `Visualizer`: joints, the skeleton of the metadata's `keypoint_connection_rules` (any K),
    keypoint-tight boxes and scores. instances: pred_keypoints (N, K, 3) pixels of this image."""
    if instances.has("pred_keypoints"):
        check_keypoint_metadata(metadata, instances.pred_keypoints.shape[1])
    visualizer = Visualizer(image_rgb, metadata, instance_mode=instance_mode)
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
    from cfg.DATASETS.TEST[0]."""

    def __init__(
        self, cfg, confidence_threshold=0.3, instance_mode=ColorMode.IMAGE, config_file=None
    ):
        self.metadata = MetadataCatalog.get(
            cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
        )
        self.confidence_threshold = confidence_threshold
        self.instance_mode = instance_mode
        self.predictor = PETRPredictor(cfg, config_file)
        model = self.predictor.model
        num_keypoints = (model.model if isinstance(model, PETRWithTTA) else model).num_keypoints
        check_keypoint_metadata(self.metadata, num_keypoints)

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
            self.confidence_threshold, self.instance_mode,
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
            vis = visualizer.draw_instance_predictions(frame[:, :, ::-1], instances)
            yield cv2.cvtColor(vis.get_image(), cv2.COLOR_RGB2BGR)
