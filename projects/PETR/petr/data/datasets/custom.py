"""Register a COCO-format keypoint dataset with any number of keypoints K.

The metadata follows Detectron2 (`keypoint_names`, `keypoint_flip_map`,
`keypoint_connection_rules`) plus PETR's `keypoint_oks_sigmas`, which the matcher, the OKS loss
and the evaluators read.
"""

import functools
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.utils.file_io import PathManager

__all__ = ["load_coco_keypoint_json", "register_coco_keypoint_dataset"]

# Beyond Detectron2's defaults: the segmentation area (PETR's OKS normaliser), the json's
# visible-joint count (the official 0-keypoint filter) and the annotation id (error messages).
_EXTRA_ANNOTATION_KEYS = ["area", "num_keypoints", "id"]


def load_coco_keypoint_json(json_file, image_root, dataset_name=None, area_from_bbox=False):
    """`load_coco_json` that also keeps "area", "num_keypoints" and "id" of each annotation.

    Keypoints come back in Detectron2's continuous pixel convention (json value + 0.5).
    With `area_from_bbox` (CrowdPose, whose json has no segmentation area) the area is the box
    w * h, overriding any "area" in the json.
    """
    dicts = load_coco_json(json_file, image_root, dataset_name, _EXTRA_ANNOTATION_KEYS)
    for record in dicts:
        for anno in record["annotations"]:
            if area_from_bbox:
                anno["area"] = float(anno["bbox"][2] * anno["bbox"][3])  # bbox is XYWH_ABS
    return dicts


def _check_json_keypoint_count(json_file, num_keypoints):
    with PathManager.open(json_file) as f:
        categories = json.load(f).get("categories", [])
    for cat in categories:
        names = cat.get("keypoints")
        if names is not None and len(names) != num_keypoints:
            raise ValueError(
                f"Category {cat.get('name')!r} of {json_file} lists {len(names)} keypoints but "
                f"the dataset was registered with {num_keypoints} keypoint_names"
            )


def _load_checked(json_file, image_root, name, num_keypoints, area_from_bbox):
    _check_json_keypoint_count(json_file, num_keypoints)
    return load_coco_keypoint_json(json_file, image_root, name, area_from_bbox)


def _validate(name, keypoint_names, keypoint_flip_map, keypoint_oks_sigmas, rules):
    names = list(keypoint_names)
    if not names:
        raise ValueError(f"Dataset {name!r}: keypoint_names is empty")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"Dataset {name!r}: duplicate keypoint_names {dup}")
    if len(keypoint_oks_sigmas) != len(names):
        raise ValueError(
            f"Dataset {name!r}: {len(keypoint_oks_sigmas)} keypoint_oks_sigmas for "
            f"{len(names)} keypoint_names"
        )
    if any(not float(s) > 0 for s in keypoint_oks_sigmas):
        raise ValueError(f"Dataset {name!r}: keypoint_oks_sigmas must be > 0")
    seen = set()
    for pair in keypoint_flip_map:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ValueError(f"Dataset {name!r}: flip map entry {pair!r} is not a pair of names")
        for n in pair:
            if n not in names:
                raise ValueError(f"Dataset {name!r}: flip map names unknown keypoint {n!r}")
            if n in seen:
                raise ValueError(f"Dataset {name!r}: keypoint {n!r} appears twice in the flip map")
            seen.add(n)
    for rule in rules:
        if len(rule) != 3 or len(rule[2]) != 3:
            raise ValueError(
                f"Dataset {name!r}: connection rule {rule!r} is not (name, name, (r, g, b))"
            )
        for n in rule[:2]:
            if n not in names:
                raise ValueError(f"Dataset {name!r}: connection rule names unknown keypoint {n!r}")


def register_coco_keypoint_dataset(
    name,
    json_file,
    image_root,
    keypoint_names,
    keypoint_flip_map,
    keypoint_oks_sigmas,
    keypoint_connection_rules=None,
    *,
    area_from_bbox=False,
    evaluator_type="coco",
    **extra_metadata,
):
    """Register a COCO-format person-keypoint dataset with K = len(keypoint_names) keypoints.

    Args:
        name: dataset name for DATASETS.TRAIN / DATASETS.TEST.
        json_file, image_root: the COCO-format json (keypoints as flat [x, y, v] * K lists in
            pixel indices, "bbox" XYWH) and the folder its "file_name"s are relative to.
        keypoint_names: K names. keypoint_flip_map: (left, right) name pairs swapped by a
            horizontal flip. keypoint_oks_sigmas: K OKS sigmas (COCO: 0.025 to 0.107).
        keypoint_connection_rules: optional (name, name, (r, g, b)) skeleton for visualisation.
        area_from_bbox: use box w * h as the OKS area (when the json has no segmentation area).
        evaluator_type: "coco" (COCOEvaluator) or "crowdpose" (needs "crowdIndex" per image).
    Loading is lazy: the json is read on `DatasetCatalog.get(name)`.
    """
    rules = [(a, b, tuple(c)) for a, b, c in (keypoint_connection_rules or [])]
    flip_map = [tuple(p) for p in keypoint_flip_map]
    _validate(name, keypoint_names, flip_map, keypoint_oks_sigmas, rules)
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    loader = functools.partial(
        _load_checked, json_file, image_root, name, len(keypoint_names), area_from_bbox
    )
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type=evaluator_type,
        keypoint_names=list(keypoint_names),
        keypoint_flip_map=flip_map,
        keypoint_oks_sigmas=[float(s) for s in keypoint_oks_sigmas],
        keypoint_connection_rules=rules,
        **extra_metadata,
    )
