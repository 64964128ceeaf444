"""Detectron2's Keypoint R-CNN R50-FPN as the speed baseline of `tools/benchmark.py --compare`.

Built from Detectron2's model-zoo config COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml with
random weights. A trained model's keypoint head runs on its detected people (COCO keypoint AP
reads the top 20); random weights detect next to nothing (their RPN boxes collapse onto a few
whole-image boxes), so `KeypointRCNNRunner` runs the full inference path (backbone, RPN, box
head with NMS) and then hands the keypoint head N person-sized boxes per image instead of the
random detections: the measured cost is that of a model finding N people.
"""

from typing import Dict, List

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Boxes, Instances

__all__ = ["CONFIG", "KeypointRCNNRunner", "person_boxes"]

CONFIG = "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml"


def person_boxes(height: int, width: int, num: int) -> torch.Tensor:
    """`num` xyxy pixel boxes of a standing person's shape (1/3 of the height, 1/6 of the width)
    spread over a height x width image in reading order: (num, 4)."""
    cols = max(1, round((num * 2) ** 0.5))
    rows = -(-num // cols)
    i = torch.arange(num, dtype=torch.float32)
    cx = (i % cols + 0.5) / cols * width
    cy = (torch.div(i, cols, rounding_mode="floor") + 0.5) / rows * height
    hw, hh = width / 12.0, height / 6.0
    return torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], -1)


class KeypointRCNNRunner:
    """Keypoint R-CNN R50-FPN inference (eval mode, random weights) whose keypoint head runs on
    `num_boxes` person boxes per image. Call with Detectron2 dicts holding BGR uint8 images."""

    def __init__(self, device: str, num_boxes: int = 20):
        if num_boxes < 1:
            raise ValueError(f"Keypoint R-CNN needs >= 1 person box per image, got {num_boxes}")
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(CONFIG))
        cfg.MODEL.DEVICE = device
        cfg.MODEL.WEIGHTS = ""
        self.model: GeneralizedRCNN = build_model(cfg).eval()
        self.num_boxes = num_boxes
        # The random keypoint head gives logits of ~1e5, whose softmax underflows and trips
        # Detectron2's own consistency assert in heatmaps_to_keypoints; scaling the predictor
        # down gives small, finite heatmaps (the cost is the same).
        predictor = self.model.roi_heads.keypoint_head.score_lowres
        with torch.no_grad():
            predictor.weight.mul_(1e-5)

    def _people(self, detections: Instances) -> Instances:
        h, w = detections.image_size
        people = Instances((h, w))
        people.pred_boxes = Boxes(person_boxes(h, w, self.num_boxes).to(self.model.device))
        people.scores = torch.ones(self.num_boxes, device=self.model.device)
        people.pred_classes = torch.zeros(
            self.num_boxes, dtype=torch.int64, device=self.model.device
        )
        return people

    @torch.no_grad()
    def __call__(self, batched_inputs: List[Dict]) -> List[Dict]:
        # GeneralizedRCNN.inference, with the people swapped in before the keypoint head
        m = self.model
        images = m.preprocess_image(batched_inputs)
        features = m.backbone(images.tensor)
        proposals, _ = m.proposal_generator(images, features, None)
        detections = m.roi_heads._forward_box(features, proposals)
        people = [self._people(d) for d in detections]
        results = m.roi_heads.forward_with_given_boxes(features, people)
        return GeneralizedRCNN._postprocess(results, batched_inputs, images.image_sizes)


def keypoint_rcnn_batch(petr_batch: List[Dict]) -> List[Dict]:
    """The PETR benchmark's images for Keypoint R-CNN, whose INPUT.FORMAT is BGR."""
    return [
        {"image": x["image"].flip(0), "height": x["height"], "width": x["width"]}
        for x in petr_batch
    ]
