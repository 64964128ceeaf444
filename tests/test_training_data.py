"""Which images training draws (the official image rule) and what happens with unreadable images,
through the real loaders of PETRTrainer on small generated COCO-format datasets."""

import json

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.env import seed_all_rng
from petr_testing import captured_log, load_cfg, shrink_cfg

from petr.data.bad_images import BadImageError
from petr.data.datasets.crowdpose import CROWDPOSE_KEYPOINT_NAMES, register_crowdpose
from petr.data.datasets.custom import register_coco_keypoint_dataset
from petr.engine import PETRTrainer
from petr.evaluation import ReadImagesOnly

K3 = ["head", "left_hand", "right_hand"]


def _person(image_id, ann_id, k, bbox=(4, 4, 20, 20), visible=2, **extra):
    """A person whose joints lie inside `bbox` (XYWH) with visibility `visible` (0: none)."""
    x, y, w, h = bbox
    kps = []
    for j in range(k):
        kps += [x + (j + 1) * w / (k + 1), y + h / 2, visible] if visible else [0, 0, 0]
    ann = dict(id=ann_id, image_id=image_id, category_id=1, iscrowd=0, bbox=list(bbox),
               area=float(w * h), keypoints=kps, num_keypoints=k if visible else 0)  # fmt: skip
    ann.update(extra)
    return ann


# name -> (width, height, annotations(image_id, k)), and whether the official rule keeps it.
CASES = {
    "normal": ((64, 48), lambda i, k: [_person(i, 10 * i, k)], True),
    "no_annotations": ((64, 48), lambda i, k: [], False),
    "crowd_only": ((64, 48), lambda i, k: [_person(i, 10 * i, k, iscrowd=1)], True),
    "no_keypoints": ((64, 48), lambda i, k: [_person(i, 10 * i, k, visible=0)], True),
    "width_31": ((31, 48), lambda i, k: [_person(i, 10 * i, k)], False),
    "height_31": ((64, 31), lambda i, k: [_person(i, 10 * i, k)], False),
    "side_32": ((32, 40), lambda i, k: [_person(i, 10 * i, k, bbox=(2, 2, 20, 20))], True),
    "box_outside": ((64, 48), lambda i, k: [_person(i, 10 * i, k, bbox=(100, 100, 10, 10))], True),
    "box_zero_area": ((64, 48), lambda i, k: [_person(i, 10 * i, k, bbox=(5, 5, 0, 12))], True),
    "other_category": ((64, 48), lambda i, k: [_person(i, 10 * i, k, category_id=2)], False),
}
# Kept images whose persons the instance filter removes: they train as negatives.
NEGATIVES = {"crowd_only", "no_keypoints", "box_outside", "box_zero_area"}


def _write_dataset(root, k, cases, bad=()):
    """Images (random pixels) and a COCO-format json; files named in `bad` are truncated JPEGs."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, name in enumerate(cases, start=1):
        (w, h), annos = CASES.get(name, ((64, 48), lambda i, k: [_person(i, 10 * i, k)]))[:2]
        file_name = f"{name}.jpg"
        data = cv2.imencode(".jpg", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))[1].tobytes()
        (root / file_name).write_bytes(data[: len(data) // 2] if name in bad else data)
        images.append(dict(id=i, file_name=file_name, width=w, height=h, crowdIndex=0.1))
        annotations += annos(i, k)
    categories = [{"id": 1, "name": "person", "keypoints": [str(j) for j in range(k)]}]
    if "other_category" in cases:
        categories.append({"id": 2, "name": "ball"})
    path = root / "ann.json"
    path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return str(path)


def _register(name, kind, root, cases, bad=()):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    if kind == "crowdpose":
        register_crowdpose(name, _write_dataset(root, 14, cases, bad), str(root))
    else:
        json_file = _write_dataset(root, len(K3), cases, bad)
        sigmas = [0.05] * len(K3)
        register_coco_keypoint_dataset(
            name, json_file, str(root), K3, [("left_hand", "right_hand")], sigmas
        )


def _cfg(name, **overrides):
    cfg = shrink_cfg(load_cfg("petr_toy.yaml"))
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = (name,)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64, 64), 96
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    cfg.SOLVER.IMS_PER_BATCH = 2
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def _draw(cfg, num_batches):
    seed_all_rng(0)
    loader = PETRTrainer.build_train_loader(cfg)
    drawn = []
    for batch, _ in zip(loader, range(num_batches)):
        drawn += batch
    return loader, drawn


@pytest.mark.parametrize("kind", ["custom_k3", "crowdpose"])
def test_training_draws_the_images_the_official_rule_keeps(tmp_path, kind):
    name = f"petr_test_image_rule_{kind}"
    # CrowdPose's metadata has the one class "person"; a json with a second one is refused.
    cases = [c for c in CASES if kind != "crowdpose" or c != "other_category"]
    _register(name, kind, tmp_path, cases)
    _, drawn = _draw(_cfg(name), 60)  # 120 draws from 6 images: each is drawn (p ~ 1e-8)
    names = {d["file_name"].rsplit("/", 1)[-1][:-4] for d in drawn}
    assert names == {n for n in cases if CASES[n][2]}
    for d in drawn:
        n = len(d["instances"])
        stem = d["file_name"].rsplit("/", 1)[-1][:-4]
        assert n == (0 if stem in NEGATIVES else 1), stem
        k = d["instances"].gt_keypoints.tensor.shape[1]
        assert k == (len(CROWDPOSE_KEYPOINT_NAMES) if kind == "crowdpose" else len(K3))


def test_image_filter_none_keeps_every_image(tmp_path):
    name = "petr_test_image_rule_none"
    _register(name, "custom", tmp_path, ["normal", "no_annotations", "width_31"])
    _, drawn = _draw(_cfg(name, **{"DATALOADER.PETR.IMAGE_FILTER": "none"}), 30)
    assert {d["file_name"].rsplit("/", 1)[-1] for d in drawn} == {
        "normal.jpg", "no_annotations.jpg", "width_31.jpg"
    }  # fmt: skip
    with pytest.raises(ValueError, match="IMAGE_FILTER must be one of"):
        _draw(_cfg(name, **{"DATALOADER.PETR.IMAGE_FILTER": "mmdet"}), 1)


def test_too_many_unreadable_training_images_stop_with_the_files(tmp_path):
    name = "petr_test_bad_share"
    _register(name, "custom", tmp_path, ["a", "b", "c", "truncated"], bad={"truncated"})
    with pytest.raises(BadImageError, match=r"more than .*0\.01; first files: .*truncated\.jpg"):
        _draw(_cfg(name), 200)  # a quarter of the reads fail: stops after 100 reads


@pytest.fixture
def petr_log():
    with captured_log("petr") as messages:
        yield messages


def test_training_replaces_a_truncated_jpeg_counts_it_and_continues(tmp_path, petr_log):
    name = "petr_test_bad_train"
    _register(name, "custom", tmp_path, ["a", "truncated"], bad={"truncated"})
    cfg = _cfg(name, **{"DATALOADER.PETR.MAX_BAD_IMAGE_SHARE": 0.9})
    cfg.SOLVER.MAX_ITER, cfg.TEST.EVAL_PERIOD, cfg.OUTPUT_DIR = 4, 0, str(tmp_path / "out")
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    seed_all_rng(0)
    trainer = PETRTrainer(cfg)
    trainer.train()
    monitor = trainer._trainer.data_loader
    history = trainer.storage.history("data/bad_image_reads")
    assert len(history.values()) == 4 and monitor.failed >= 1  # 4 steps; seeded draws
    assert list(monitor.failures) == [str(tmp_path / "truncated.jpg")]
    assert "truncated" in monitor.failures[str(tmp_path / "truncated.jpg")]
    assert history.latest() == monitor.failed and monitor.reads == 8 + monitor.failed
    warnings = [m for m in petr_log if m.startswith("Cannot read training image")]
    assert len(warnings) == 1 and "truncated.jpg" in warnings[0]  # once, however often drawn
    summary = [m for m in petr_log if "training image reads failed and were replaced" in m]
    assert summary == [monitor.summary()] and f"{monitor.failed} of {monitor.reads}" in summary[0]


class _Recorder(DatasetEvaluator):
    def reset(self):
        self.inputs = []

    def process(self, inputs, outputs):
        self.inputs += inputs

    def evaluate(self, img_ids=None):
        self.img_ids = img_ids
        return {"keypoints": {"AP": 0.0}}


def test_evaluation_skips_an_unreadable_image_and_scores_the_rest(tmp_path, petr_log):
    name = "petr_test_bad_eval"
    _register(name, "custom", tmp_path, ["a", "truncated", "b"], bad={"truncated"})
    cfg = _cfg(name)
    model = PETRTrainer.build_model(cfg).eval()
    recorder = _Recorder()
    PETRTrainer.test(cfg, model, [ReadImagesOnly(recorder)])
    assert [x["file_name"].rsplit("/", 1)[-1] for x in recorder.inputs] == ["a.jpg", "b.jpg"]
    assert recorder.img_ids == [1, 3]  # the truncated image (id 2) is not scored as missed
    assert any("Cannot read test image" in m and "truncated.jpg" in m for m in petr_log)
    assert any(m.startswith("Skipped 1 unreadable images") for m in petr_log)
    # The real evaluator of the dataset runs on the two readable images.
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    results = PETRTrainer.test(cfg, model)
    assert set(results["keypoints"]) >= {"AP", "AP50"}


def test_a_test_dataset_with_other_keypoints_fails_before_inference(tmp_path):
    name = "petr_test_k_mismatch"
    _register(name, "crowdpose", tmp_path, ["a"])
    cfg = _cfg(name)
    model = PETRTrainer.build_model(_cfg("petr_test_image_rule_none"))  # K = 3
    assert model.num_keypoints == 3
    with pytest.raises(
        ValueError, match=r"'petr_test_k_mismatch' \(.*\.json\) has 14 keypoint_names .* predicts 3"
    ):
        PETRTrainer.test(cfg, model, [_Recorder()])


def test_cuda_without_cuda_is_an_error_and_auto_opts_in(monkeypatch):
    from petr import get_petr_cfg

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = get_petr_cfg("configs/petr_toy.yaml", ["MODEL.DEVICE", "cuda"])
    assert cfg.MODEL.DEVICE == "cuda"  # not silently changed
    with pytest.raises(ValueError, match="MODEL.DEVICE is 'cuda' but CUDA is not available"):
        PETRTrainer.build_model(cfg)
    assert get_petr_cfg("configs/petr_toy.yaml", ["MODEL.DEVICE", "auto"]).MODEL.DEVICE == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_petr_cfg("configs/petr_toy.yaml", ["MODEL.DEVICE", "auto"]).MODEL.DEVICE == "cuda"
