"""CrowdPose (Li et al., CVPR 2019) registration, as the official PETR (hikvision-research/opera).

Expected layout under $DETECTRON2_DATASETS (default "datasets"), the official release:
    crowdpose/images/*.jpg
    crowdpose/json/crowdpose_{train,val,trainval,test}.json
The official recipe trains on train + val ("crowdpose_trainval") and tests on "crowdpose_test".
The json has no segmentation area, so the OKS area is the box w * h (as the official code).
"""

import os

from ..metadata import CROWDPOSE_OKS_SIGMAS
from .custom import register_coco_keypoint_dataset

__all__ = [
    "CROWDPOSE_KEYPOINT_CONNECTION_RULES",
    "CROWDPOSE_KEYPOINT_FLIP_MAP",
    "CROWDPOSE_KEYPOINT_NAMES",
    "register_all_crowdpose",
    "register_crowdpose",
]

CROWDPOSE_KEYPOINT_NAMES = [
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "head",
    "neck",
]  # fmt: skip
CROWDPOSE_KEYPOINT_FLIP_MAP = [
    ("left_shoulder", "right_shoulder"),
    ("left_elbow", "right_elbow"),
    ("left_wrist", "right_wrist"),
    ("left_hip", "right_hip"),
    ("left_knee", "right_knee"),
    ("left_ankle", "right_ankle"),
]
_LEFT, _RIGHT, _CENTRE = (0, 200, 80), (255, 128, 0), (51, 153, 255)  # RGB
CROWDPOSE_KEYPOINT_CONNECTION_RULES = [
    ("head", "neck", _CENTRE),
    ("neck", "left_shoulder", _LEFT),
    ("neck", "right_shoulder", _RIGHT),
    ("left_shoulder", "left_elbow", _LEFT),
    ("left_elbow", "left_wrist", _LEFT),
    ("right_shoulder", "right_elbow", _RIGHT),
    ("right_elbow", "right_wrist", _RIGHT),
    ("left_shoulder", "left_hip", _LEFT),
    ("right_shoulder", "right_hip", _RIGHT),
    ("left_hip", "right_hip", _CENTRE),
    ("left_hip", "left_knee", _LEFT),
    ("left_knee", "left_ankle", _LEFT),
    ("right_hip", "right_knee", _RIGHT),
    ("right_knee", "right_ankle", _RIGHT),
]
_SPLITS = ("train", "val", "trainval", "test")


def register_crowdpose(name, json_file, image_root):
    """Register one CrowdPose-format json (14 keypoints, evaluator_type "crowdpose")."""
    register_coco_keypoint_dataset(
        name,
        json_file,
        image_root,
        CROWDPOSE_KEYPOINT_NAMES,
        CROWDPOSE_KEYPOINT_FLIP_MAP,
        CROWDPOSE_OKS_SIGMAS,
        CROWDPOSE_KEYPOINT_CONNECTION_RULES,
        area_from_bbox=True,
        evaluator_type="crowdpose",
        thing_classes=["person"],
    )


def register_all_crowdpose(root):
    """Register crowdpose_{train,val,trainval,test} under `root`/crowdpose (lazily loaded)."""
    base = os.path.join(root, "crowdpose")
    for split in _SPLITS:
        json_file = os.path.join(base, "json", f"crowdpose_{split}.json")
        register_crowdpose(f"crowdpose_{split}", json_file, os.path.join(base, "images"))


register_all_crowdpose(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
