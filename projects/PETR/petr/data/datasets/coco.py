"""COCO keypoints: complete Detectron2's built-in `keypoints_coco_*` datasets for PETR.

Detectron2 registers them with keypoint names, flip map and skeleton; PETR also needs
`keypoint_oks_sigmas` (matcher, OKS loss, evaluation) and each annotation's segmentation "area"
(the OKS normaliser of the official code), which Detectron2's loader drops. This module adds the
sigmas and re-registers the loader so that it keeps "area", "num_keypoints" and "id".
"""

import functools

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..metadata import COCO_OKS_SIGMAS
from .custom import load_coco_keypoint_json

__all__ = ["complete_coco_keypoint_datasets"]


def complete_coco_keypoint_datasets():
    """Add sigmas and the area-keeping loader to every registered 17-keypoint COCO-json dataset
    whose name contains "keypoints". Returns the names it changed."""
    changed = []
    for name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if "keypoints" not in name or len(meta.get("keypoint_names", [])) != len(COCO_OKS_SIGMAS):
            continue
        if meta.get("keypoint_oks_sigmas") is None:
            meta.set(keypoint_oks_sigmas=list(COCO_OKS_SIGMAS))
        if meta.get("json_file") and meta.get("image_root"):
            DatasetCatalog.remove(name)
            DatasetCatalog.register(
                name,
                functools.partial(load_coco_keypoint_json, meta.json_file, meta.image_root, name),
            )
        changed.append(name)
    return changed


complete_coco_keypoint_datasets()
