"""Bad data found when a dataset is loaded, before the first step or the first inference
(petr.data.annotation_checks, petr.evaluation.preflight), on real json and image files."""

import json

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.env import seed_all_rng
from petr_testing import captured_log, load_cfg, shrink_cfg

from petr.data.annotation_checks import BadAnnotationError, check_annotations
from petr.data.datasets.custom import register_coco_keypoint_dataset
from petr.engine import PETRTrainer
from petr.evaluation import build_keypoint_evaluator

K3 = ["head", "left_hand", "right_hand"]


def _person(image_id, ann_id, bbox=(4, 4, 20, 20), num_values=9, **extra):
    x, y, w, h = bbox
    kps = [v for j in range(3) for v in (x + (j + 1) * w / 4, y + h / 2, 2)][:num_values]
    ann = dict(id=ann_id, image_id=image_id, category_id=1, iscrowd=0, bbox=list(bbox),
               area=float(abs(w * h)), keypoints=kps, num_keypoints=3)  # fmt: skip
    ann.update(extra)
    return ann


def _write(root, images, name="ann.json"):
    """images: {stem: (annotations of image_id, (w, h) of the file, (w, h) in the json)}."""
    rng = np.random.default_rng(0)
    entries, annos = [], []
    for i, (stem, (make, (w, h), json_wh)) in enumerate(images.items(), start=1):
        cv2.imwrite(str(root / f"{stem}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        jw, jh = json_wh or (w, h)
        entries.append(dict(id=i, file_name=f"{stem}.png", width=jw, height=jh))
        annos += make(i)
    cats = [{"id": 1, "name": "person", "keypoints": K3, "skeleton": [[1, 2], [1, 3]]}]
    path = root / name
    path.write_text(json.dumps(dict(images=entries, annotations=annos, categories=cats)))
    return str(path)


def _register(name, json_file, root):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_keypoint_dataset(
        name, json_file, str(root), K3, [("left_hand", "right_hand")], [0.05] * 3
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


GOOD = (lambda i: [_person(i, 100 * i)], (64, 48), None)
# One image of each kind of bad annotation; each also holds a good person (id 100 * i + 1).
BAD = {
    "short": (
        lambda i: [_person(i, 100 * i, num_values=6), _person(i, 100 * i + 1)],
        (64, 48),
        None,
    ),
    "negative_box": (
        lambda i: [_person(i, 100 * i, bbox=(30, 4, -10, 20)), _person(i, 100 * i + 1)],
        (64, 48),
        None,
    ),
    "wrong_size": (lambda i: [_person(i, 100 * i)], (64, 48), (80, 60)),
    "bad_visibility": (
        lambda i: [_person(i, 100 * i, keypoints=[5, 5, 7] * 3), _person(i, 100 * i + 1)],
        (64, 48),
        None,
    ),
}  # fmt: skip


@pytest.fixture
def petr_log():
    with captured_log("petr") as messages:
        yield messages


def test_bad_annotations_are_dropped_named_and_the_good_ones_train(tmp_path, petr_log):
    name = "petr_test_load_checks_train"
    _register(name, _write(tmp_path, {"good": GOOD, **BAD}), tmp_path)
    cfg = _cfg(name, **{"DATALOADER.PETR.MAX_BAD_ANNOTATION_SHARE": 0.5})
    cfg.SOLVER.MAX_ITER, cfg.TEST.EVAL_PERIOD, cfg.OUTPUT_DIR = 1, 0, str(tmp_path / "out")
    cfg.DATASETS.TEST = ()  # its wrong-size image would stop the evaluation (tested below)
    seed_all_rng(0)
    trainer = PETRTrainer(cfg)
    table = next(m for m in petr_log if m.startswith(f"Dataset {name!r}"))
    # 8 annotations: the short list, the visibility 7 and the wrong-size image's are bad
    assert "8 annotations: 3 (37.5%) are malformed or in an image of another size" in table
    for reason, first in {
        "keypoints: not 3K values": "short.png#200",
        "keypoints: visibility not 0, 1 or 2": "bad_visibility.png#500",
        "person with visible keypoints dropped for its invalid box": "negative_box.png#300",
        "image file size differs from the json's width/height": "wrong_size.png (file 64x48, "
        "json 80x60)",
    }.items():
        row = next(line for line in table.splitlines() if line.startswith(reason))
        assert row.split()[len(reason.split())] == "1" and first in row, row
    trainer.train()
    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")]
    line = next(m for m in metrics if "data/bad_annotations" in m)  # one line, the first step
    assert line["data/bad_annotations"] == 3
    key = f"data/bad_annotations/{name}/person with visible keypoints dropped for its invalid box"
    assert line[key] == 1
    # The good people of the bad images still train; the wrong-size image does not.
    loader = PETRTrainer.build_train_loader(cfg)
    drawn = {}
    for batch, _ in zip(loader, range(40)):
        for d in batch:
            drawn[d["file_name"].rsplit("/", 1)[-1]] = len(d["instances"])
    assert drawn == {"good.png": 1, "short.png": 1, "negative_box.png": 1, "bad_visibility.png": 1}


def test_a_bad_share_above_the_limit_stops_before_training(tmp_path):
    name = "petr_test_load_checks_share"
    json_file = _write(tmp_path, {"good": GOOD, "short": BAD["short"]})
    _register(name, json_file, tmp_path)
    with pytest.raises(BadAnnotationError) as e:
        PETRTrainer.build_train_loader(_cfg(name))
    message = str(e.value)
    assert message.startswith(f"{json_file} (dataset {name!r}): 1 of 3 annotations")
    assert "MAX_BAD_ANNOTATION_SHARE = 0.01" in message and "short.png#200" in message


def test_the_check_is_vectorised_and_names_each_reason():
    annos = [
        _person(1, 1),
        _person(1, 2, num_values=6),
        _person(1, 3, keypoints=[1, 2, float("nan")] * 3),
        {**_person(1, 4), "bbox": [1, 2, 3]},
        _person(1, 5, bbox=(100, 100, 5, 5)),
        _person(1, 6, bbox=(100, 100, 5, 5), num_keypoints=0, keypoints=[0] * 9),
        _person(1, 7, keypoints=[], num_keypoints=0),
        _person(1, 8, category_id=5),
    ]
    codes = check_annotations(annos, [(64, 48)] * len(annos), 3, num_classes=2)
    assert codes.tolist() == [0, 2, 3, 5, 6, 7, 0, 1]


def test_evaluation_of_a_json_without_annotations_fails_before_inference(tmp_path):
    name = "petr_test_load_checks_empty"
    _register(name, _write(tmp_path, {"a": (lambda i: [], (64, 48), None)}), tmp_path)
    cfg = _cfg(name)
    model = PETRTrainer.build_model(cfg).eval()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=rf"TEST dataset '{name}' \(.*ann.json\) has no annot"):
        PETRTrainer.test(cfg, model)
    assert not calls  # nothing was inferred


def test_evaluation_of_a_json_with_other_keypoints_fails_naming_it(tmp_path):
    name = "petr_test_load_checks_k"
    four = lambda i: [_person(i, i, keypoints=[5, 5, 2] * 4, num_keypoints=4)]  # noqa: E731
    _register(name, _write(tmp_path, {"a": (four, (64, 48), None)}), tmp_path)
    with pytest.raises(ValueError, match=rf"'{name}' .*every annotation has 12 keypoint values"):
        build_keypoint_evaluator(_cfg(name), name)


def test_evaluation_leaves_malformed_ground_truth_out_and_scores(tmp_path, petr_log):
    name = "petr_test_load_checks_eval"
    images = {f"g{i}": GOOD for i in range(3)} | {"short": BAD["short"]}
    _register(name, _write(tmp_path, images), tmp_path)
    cfg = _cfg(name, **{"DATALOADER.PETR.MAX_BAD_ANNOTATION_SHARE": 0.5})
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    model = PETRTrainer.build_model(cfg).eval()
    results = PETRTrainer.test(cfg, model)  # pycocotools would fail on the 6-value list
    assert set(results["keypoints"]) >= {"AP", "AP50"}
    message = next(m for m in petr_log if "the evaluator scores against the json without" in m)
    assert "without 1 malformed annotations" in message and "short.png#400" in message


def test_evaluation_refuses_test_images_of_another_size(tmp_path):
    name = "petr_test_load_checks_eval_size"
    _register(name, _write(tmp_path, {"good": GOOD, "wrong_size": BAD["wrong_size"]}), tmp_path)
    with pytest.raises(ValueError, match=r"1 image files have another size .*wrong_size.png"):
        build_keypoint_evaluator(_cfg(name), name)
