"""CrowdPoseEvaluator (xtcocotools 'keypoints_crowd') and build_keypoint_evaluator."""

import json

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

from petr.config import add_petr_config
from petr.data.datasets.crowdpose import register_crowdpose
from petr.data.datasets.custom import register_coco_keypoint_dataset
from petr.evaluation import CrowdPoseEvaluator, build_keypoint_evaluator
from petr.evaluation import crowdpose_evaluation as cpe

METRICS = {"AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_easy", "AP_medium", "AP_hard"}
CROWD_INDEX = {1: 0.1, 2: 0.5, 3: 0.9}  # one easy, one medium, one hard image


def _people(image_id, k):
    """Two people per image: (G, K, 3) json keypoints (pixel indices) and XYWH boxes."""
    rng = np.random.RandomState(image_id)
    kps, boxes = [], []
    for g in range(2):
        x0, y0 = 40 + 200 * g, 30
        xy = np.stack([x0 + rng.uniform(0, 120, k), y0 + rng.uniform(0, 250, k)], axis=1)
        vis = np.full(k, 2.0)
        vis[rng.rand(k) < 0.2] = 0
        xy[vis == 0] = 0
        kps.append(np.concatenate([np.round(xy), vis[:, None]], axis=1))
        boxes.append([x0, y0, 120.0, 250.0])
    return np.array(kps), boxes


def _write_json(path, k, crowd_index=True, area=False):
    images, anns = [], []
    for image_id, ci in CROWD_INDEX.items():
        image = {"id": image_id, "file_name": f"{image_id}.jpg", "height": 400, "width": 500}
        if crowd_index:
            image["crowdIndex"] = ci
        images.append(image)
        kps, boxes = _people(image_id, k)
        for g in range(len(kps)):
            ann = dict(
                id=10 * image_id + g, image_id=image_id, category_id=1, iscrowd=0, bbox=boxes[g],
                keypoints=kps[g].ravel().tolist(), num_keypoints=int((kps[g][:, 2] > 0).sum()),
            )  # fmt: skip
            if area:
                ann["area"] = boxes[g][2] * boxes[g][3] * 0.5
            anns.append(ann)
    cats = [{"id": 1, "name": "person"}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path)


def _predict(evaluator, k, shift=0.0, image_ids=tuple(CROWD_INDEX)):
    """Feed the ground truth (+ shift px) as predictions in Detectron2's continuous pixels."""
    for image_id in image_ids:
        kps, _ = _people(image_id, k)
        pred = torch.tensor(kps, dtype=torch.float32)
        pred[..., :2] += 0.5 + shift  # json pixel indices -> continuous, as load_coco_json
        pred[..., 2] = 1.0
        inst = Instances((400, 500))
        inst.pred_keypoints = pred
        lo, hi = pred[..., :2].min(dim=1).values, pred[..., :2].max(dim=1).values
        inst.pred_boxes = Boxes(torch.cat([lo, hi], dim=1))
        inst.scores = torch.tensor([0.9, 0.8])
        inst.pred_classes = torch.zeros(2, dtype=torch.int64)
        evaluator.process([{"image_id": image_id}], [{"instances": inst}])


@pytest.fixture(scope="module")
def crowdpose_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("crowdpose")
    register_crowdpose("petr_test_crowdpose_eval", _write_json(root / "gt.json", 14), root)
    return "petr_test_crowdpose_eval"


def test_perfect_predictions_score_100_everywhere(crowdpose_dataset, tmp_path):
    evaluator = CrowdPoseEvaluator(crowdpose_dataset, str(tmp_path), distributed=False)
    evaluator.reset()
    _predict(evaluator, 14)
    results = evaluator.evaluate()["keypoints"]
    assert set(results) == METRICS
    for name in METRICS:
        assert results[name] == pytest.approx(100.0), name
    dumped = json.loads((tmp_path / "crowdpose_keypoints_results.json").read_text())
    assert len(dumped) == 6 and {d["category_id"] for d in dumped} == {1}
    assert dumped[0]["keypoints"][:2] == _people(1, 14)[0][0, 0, :2].tolist()


def test_shifted_predictions_score_lower(crowdpose_dataset):
    evaluator = CrowdPoseEvaluator(crowdpose_dataset, distributed=False)
    _predict(evaluator, 14, shift=6.0)
    results = evaluator.evaluate()["keypoints"]
    assert 0.0 < results["AP"] < 95.0 and results["AP75"] <= results["AP50"]
    assert results["AP50"] == pytest.approx(100.0)  # 6 px on ~170 px people: OKS well above 0.5


def test_missing_images_lower_the_split_they_belong_to(crowdpose_dataset):
    evaluator = CrowdPoseEvaluator(crowdpose_dataset, distributed=False)
    _predict(evaluator, 14, image_ids=(1, 2))  # nothing for the hard image
    results = evaluator.evaluate()["keypoints"]
    assert results["AP_easy"] == pytest.approx(100.0) and results["AP_medium"] == pytest.approx(100)
    assert results["AP_hard"] == pytest.approx(0.0) and results["AR"] < 100.0


def test_predictions_from_all_processes_are_gathered(crowdpose_dataset, monkeypatch):
    other_rank = CrowdPoseEvaluator(crowdpose_dataset, distributed=False)
    _predict(other_rank, 14, image_ids=(3,))
    monkeypatch.setattr(cpe.comm, "gather", lambda data, dst=0: [data, other_rank._predictions])
    evaluator = CrowdPoseEvaluator(crowdpose_dataset, distributed=True)
    _predict(evaluator, 14, image_ids=(1, 2))
    assert evaluator.evaluate()["keypoints"]["AP"] == pytest.approx(100.0)


def test_json_without_crowd_index_is_rejected(tmp_path):
    path = _write_json(tmp_path / "no_ci.json", 14, crowd_index=False)
    register_crowdpose("petr_test_crowdpose_no_index", path, tmp_path)
    with pytest.raises(ValueError, match="no_ci.json: 3 images lack 'crowdIndex'"):
        CrowdPoseEvaluator("petr_test_crowdpose_no_index")


def test_json_without_num_keypoints_is_rejected(tmp_path):
    path = tmp_path / "no_count.json"
    _write_json(path, 14)
    data = json.loads(path.read_text())
    del data["annotations"][1]["num_keypoints"]
    path.write_text(json.dumps(data))
    register_crowdpose("petr_test_crowdpose_no_count", str(path), tmp_path)
    with pytest.raises(ValueError, match="no_count.json: 1 annotations lack 'num_keypoints'"):
        CrowdPoseEvaluator("petr_test_crowdpose_no_count")


def _cfg():
    cfg = get_cfg()
    add_petr_config(cfg)
    return cfg


def test_build_keypoint_evaluator_picks_by_evaluator_type(crowdpose_dataset, tmp_path):
    assert isinstance(build_keypoint_evaluator(_cfg(), crowdpose_dataset), CrowdPoseEvaluator)
    sigmas = [0.05, 0.04, 0.04, 0.06, 0.06]
    register_coco_keypoint_dataset(
        "petr_test_eval_k5",
        _write_json(tmp_path / "k5.json", 5, area=True),
        tmp_path,
        ["head", "l_hand", "r_hand", "l_foot", "r_foot"],
        [("l_hand", "r_hand"), ("l_foot", "r_foot")],
        sigmas,
    )
    DatasetCatalog.get("petr_test_eval_k5")  # as the test loader does: sets the category map
    evaluator = build_keypoint_evaluator(_cfg(), "petr_test_eval_k5", str(tmp_path / "out"))
    assert isinstance(evaluator, COCOEvaluator) and list(evaluator._kpt_oks_sigmas) == sigmas
    evaluator.reset()
    _predict(evaluator, 5)
    assert evaluator.evaluate()["keypoints"]["AP"] == pytest.approx(100.0)
    cfg = _cfg()
    cfg.TEST.KEYPOINT_OKS_SIGMAS = [0.1] * 5
    assert list(build_keypoint_evaluator(cfg, "petr_test_eval_k5")._kpt_oks_sigmas) == [0.1] * 5
    cfg.TEST.KEYPOINT_OKS_SIGMAS = [0.1] * 4
    with pytest.raises(ValueError, match="4 OKS sigmas for 5 keypoints"):
        build_keypoint_evaluator(cfg, "petr_test_eval_k5")
