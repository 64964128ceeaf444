"""Dataset registration: CrowdPose, COCO sigmas and areas, custom keypoint datasets of any K."""

import json
import os

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data.datasets import register_coco_instances
from petr_testing import load_cfg

import petr.data  # noqa: F401  (registers the datasets)
from petr.data.dataset_mapper import PETRDatasetMapper
from petr.data.datasets.coco import complete_coco_keypoint_datasets
from petr.data.datasets.crowdpose import register_crowdpose
from petr.data.datasets.custom import register_coco_keypoint_dataset
from petr.data.metadata import COCO_OKS_SIGMAS, CROWDPOSE_OKS_SIGMAS


def _write_json(tmp_path, num_keypoints, people, crowd_index=None, category_keypoints=None):
    """A COCO-format json with one 64x48 image; people: list of (keypoints, bbox, area)."""
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((48, 64, 3), np.uint8))
    image = {"id": 5, "file_name": "a.png", "height": 48, "width": 64}
    if crowd_index is not None:
        image["crowdIndex"] = crowd_index
    annotations = []
    for i, (kps, bbox, area) in enumerate(people):
        ann = dict(id=100 + i, image_id=5, category_id=1, iscrowd=0, bbox=bbox, keypoints=kps)
        ann["num_keypoints"] = int(sum(v > 0 for v in kps[2::3]))
        if area is not None:
            ann["area"] = area
        annotations.append(ann)
    category = {"id": 1, "name": "person"}
    if category_keypoints is not None:
        category["keypoints"] = category_keypoints
    data = {"images": [image], "annotations": annotations, "categories": [category]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_crowdpose_splits_are_registered_with_full_metadata():
    root = os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "crowdpose")
    for split in ("train", "val", "trainval", "test"):
        name = f"crowdpose_{split}"
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "crowdpose"
        assert meta.json_file == os.path.join(root, "json", f"crowdpose_{split}.json")
        assert meta.image_root == os.path.join(root, "images")
    meta = MetadataCatalog.get("crowdpose_test")
    assert len(meta.keypoint_names) == 14 and meta.keypoint_names[12:] == ["head", "neck"]
    assert meta.keypoint_oks_sigmas == CROWDPOSE_OKS_SIGMAS
    # The official flip pairs [[0,1],[2,3],...,[10,11]]; head and neck stay.
    assert utils.create_keypoint_hflip_indices(["crowdpose_test"]) == [
        1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 12, 13,
    ]  # fmt: skip
    assert len(meta.keypoint_connection_rules) == 14


def test_crowdpose_loads_lazily_with_box_area(tmp_path):
    register_crowdpose("petr_test_crowdpose_missing", tmp_path / "nope.json", tmp_path)  # no I/O
    kps = [10, 12, 2] + [0, 0, 0] * 12 + [30, 8, 1]
    path = _write_json(tmp_path, 14, [(kps, [5, 6, 30, 20], 999.0)], crowd_index=0.3)
    register_crowdpose("petr_test_crowdpose_tiny", path, tmp_path)
    (record,) = DatasetCatalog.get("petr_test_crowdpose_tiny")
    (ann,) = record["annotations"]
    assert ann["area"] == 600.0  # w * h, not the json's 999
    assert ann["keypoints"][:3] == [10.5, 12.5, 2] and ann["keypoints"][-3:] == [30.5, 8.5, 1]
    assert ann["id"] == 100 and ann["num_keypoints"] == 2
    assert record["file_name"] == str(tmp_path / "a.png")


def test_coco_keypoint_datasets_get_sigmas_and_areas(tmp_path):
    assert MetadataCatalog.get("keypoints_coco_2017_train").keypoint_oks_sigmas == COCO_OKS_SIGMAS
    assert MetadataCatalog.get("keypoints_coco_2017_val").keypoint_oks_sigmas == COCO_OKS_SIGMAS
    # A dataset registered the way Detectron2's builtin COCO keypoints are.
    kps = [20, 20, 2] + [0, 0, 0] * 16
    path = _write_json(tmp_path, 17, [(kps, [10, 10, 30, 30], 321.5)])
    coco_meta = MetadataCatalog.get("keypoints_coco_2017_val")
    name = "petr_test_keypoints_coco_like"
    register_coco_instances(
        name,
        {
            "keypoint_names": coco_meta.keypoint_names,
            "keypoint_flip_map": coco_meta.keypoint_flip_map,
        },
        path,
        str(tmp_path),
    )
    assert "area" not in DatasetCatalog.get(name)[0]["annotations"][0]
    assert name in complete_coco_keypoint_datasets()
    assert MetadataCatalog.get(name).keypoint_oks_sigmas == COCO_OKS_SIGMAS
    assert DatasetCatalog.get(name)[0]["annotations"][0]["area"] == 321.5


K5 = dict(
    keypoint_names=["head", "l_hand", "r_hand", "l_foot", "r_foot"],
    keypoint_flip_map=[("l_hand", "r_hand"), ("l_foot", "r_foot")],
    keypoint_oks_sigmas=[0.05, 0.04, 0.04, 0.06, 0.06],
    keypoint_connection_rules=[("head", "l_hand", (255, 0, 0)), ("head", "r_hand", (0, 0, 255))],
)


def test_custom_dataset_with_five_keypoints_trains_through_the_mapper(tmp_path):
    kps = [30, 10, 2, 20, 20, 2, 40, 20, 1, 25, 40, 2, 35, 40, 0]
    path = _write_json(
        tmp_path, 5, [(kps, [15, 5, 30, 40], 800.0)], category_keypoints=list("abcde")
    )
    register_coco_keypoint_dataset("petr_test_custom_k5", path, tmp_path, **K5)
    meta = MetadataCatalog.get("petr_test_custom_k5")
    assert meta.keypoint_oks_sigmas == K5["keypoint_oks_sigmas"] and meta.evaluator_type == "coco"
    (record,) = DatasetCatalog.get("petr_test_custom_k5")
    cfg = load_cfg("Base-PETR.yaml")  # the recipe's INPUT keys
    cfg.DATASETS.TRAIN = ("petr_test_custom_k5",)
    np.random.seed(0)
    mapper = PETRDatasetMapper(cfg, is_train=True)
    # None means the official pipeline would resample this image; a few seeds give a sample.
    outs = [out for out in (mapper(record) for _ in range(5)) if out is not None]
    out = outs[0]
    assert out["instances"].gt_keypoints.tensor.shape[1:] == (5, 3)


def test_custom_dataset_json_with_other_keypoint_count_fails_on_load(tmp_path):
    path = _write_json(tmp_path, 5, [], category_keypoints=["a", "b", "c"])
    register_coco_keypoint_dataset("petr_test_custom_wrong_k", path, tmp_path, **K5)
    with pytest.raises(ValueError, match=r"ann.json lists 3 keypoints.* 5 keypoint_names"):
        DatasetCatalog.get("petr_test_custom_wrong_k")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(keypoint_oks_sigmas=[0.05] * 4), "4 keypoint_oks_sigmas for 5"),
        (dict(keypoint_oks_sigmas=[0.05, 0.04, 0.0, 0.06, 0.06]), "must be > 0"),
        (dict(keypoint_flip_map=[("l_hand", "r_paw")]), "unknown keypoint 'r_paw'"),
        (dict(keypoint_flip_map=[("l_hand", "r_hand"), ("l_hand", "r_foot")]), "appears twice"),
        (dict(keypoint_flip_map=[("head", "head")]), "not a pair"),
        (dict(keypoint_names=["head", "head", "a", "b", "c"]), "duplicate keypoint_names"),
        (dict(keypoint_connection_rules=[("head", "tail", (1, 2, 3))]), "unknown keypoint 'tail'"),
    ],
)
def test_custom_dataset_metadata_is_validated(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        register_coco_keypoint_dataset(
            "petr_test_custom_invalid", tmp_path / "x.json", tmp_path, **{**K5, **change}
        )
    assert "petr_test_custom_invalid" not in DatasetCatalog.list()
