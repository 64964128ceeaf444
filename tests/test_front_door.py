"""One front door, one back door: every inference route feeds the network the same input, TTA
ends in the model's own postprocess, and inference needs no training code."""

import ast
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from petr_testing import REPO_ROOT, load_cfg, shrink_cfg

from petr.data.dataset_mapper import PETRDatasetMapper
from petr.data.preprocess import PETRPreprocessor
from petr.demo.predictor import PETRPredictor, VisualizationDemo
from petr.engine import PETRTrainer
from petr.export.onnx_wrapper import PETRONNXWrapper
from petr.modeling.meta_arch import PETR
from petr.modeling.test_time_augmentation import PETRWithTTA

PACKAGE = os.path.join(REPO_ROOT, "projects", "PETR", "petr")


def _cfg():
    cfg = shrink_cfg(load_cfg("petr_R50.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 120
    cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE, cfg.TEST.AUG.FLIP = (96,), 120, False
    return cfg


def _record_network_inputs(model):
    """Wraps model.predict so that every network input it receives is kept."""
    seen, predict = [], model.predict
    model.predict = lambda images: (seen.append(images), predict(images))[1]
    return seen


def test_four_routes_give_identical_network_inputs(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    seen = _record_network_inputs(model)
    bgr = np.random.default_rng(0).integers(0, 256, (70, 110, 3), dtype=np.uint8)
    path = str(tmp_path / "person.png")
    cv2.imwrite(path, bgr)
    record = {"file_name": path, "height": 70, "width": 110, "image_id": 1}
    with torch.no_grad():
        # 1. the dataset mapper's test branch (--eval-only), reading the file as INPUT.FORMAT
        model([PETRDatasetMapper(cfg, is_train=False)(record)])
        # 2. TTA with a single unflipped view at the test scale, from the file
        PETRWithTTA(cfg, model).eval()([{"file_name": path, "height": 70, "width": 110}])
        # 3. the ONNX export wrapper, fed the front door's image as the exported graph is
        onnx_input = PETRPreprocessor(cfg)(bgr, "BGR")["image"].float()[None]
        PETRONNXWrapper(model)(onnx_input, torch.tensor([onnx_input.shape[-2:]]))
        # 4. the demo predictor (BGR in), on its own model
        predictor = PETRPredictor(cfg)
        seen_by_predictor = _record_network_inputs(predictor.model)
        predictor(bgr)
    inputs = seen + seen_by_predictor
    assert len(inputs) == 4
    # mmcv rescale: factor min(120 / 110, 96 / 70), sizes int(x * factor + 0.5)
    assert inputs[0].image_sizes == [(76, 120)]
    rgb = torch.from_numpy(cv2.resize(bgr[:, :, ::-1], inputs[0].image_sizes[0][::-1]).copy())
    mean, std = model.pixel_mean, model.pixel_std
    expected = (rgb.permute(2, 0, 1).float() - mean) / std
    for images in inputs:
        # the ONNX route's sizes are its (1, 2) input tensor
        assert [tuple(map(int, hw)) for hw in images.image_sizes] == inputs[0].image_sizes
        torch.testing.assert_close(images.tensor[0], expected, rtol=0, atol=1e-5)
        assert not images.padding_mask.any()


def test_a_padded_batch_matches_detectron2_and_masks_the_padding():
    cfg = _cfg()
    model = build_model(cfg).eval()
    model.size_divisibility = 32
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
              for h, w in [(50, 70), (64, 33)]]  # fmt: skip
    batch = model.preprocess_image([{"image": im} for im in images])
    normed = [(im.float() - model.pixel_mean) / model.pixel_std for im in images]
    reference = ImageList.from_tensors(normed, 32, 0.0)
    assert batch.tensor.shape == (2, 3, 64, 96) and batch.image_sizes == [(50, 70), (64, 33)]
    torch.testing.assert_close(batch.tensor, reference.tensor, rtol=0, atol=0)
    assert batch.padding_mask[0, :50, :70].logical_not().all() and batch.padding_mask[0].sum() == (
        64 * 96 - 50 * 70
    )
    assert batch.padding_mask[1, :, 33:].all() and not batch.padding_mask[1, :, :33].any()


def test_predictor_with_tta_hands_the_original_image_to_the_views():
    cfg = _cfg()
    cfg.TEST.AUG.ENABLED = True
    predictor = PETRPredictor(cfg)
    assert isinstance(predictor.model, PETRWithTTA)
    seen = _record_network_inputs(predictor.model.model)
    bgr = np.random.default_rng(2).integers(0, 256, (70, 110, 3), dtype=np.uint8)
    out = predictor(bgr)["instances"]
    assert out.image_size == (70, 110)
    assert [im.image_sizes for im in seen] == [[(76, 120)]]  # one view, resized once


def _module_imports(path):
    """Modules of the petr package that the file at `path` imports (relative or absolute)."""
    tree = ast.parse(open(path).read())
    package = os.path.relpath(os.path.dirname(path), os.path.dirname(PACKAGE)).split(os.sep)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            parts = base + (node.module.split(".") if node.module else [])
            found.add(".".join(parts))
            found.update(".".join(parts + [a.name]) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("petr")}


def _module_file(module):
    path = os.path.join(os.path.dirname(PACKAGE), *module.split("."))
    if os.path.isfile(path + ".py"):
        return path + ".py"
    init = os.path.join(path, "__init__.py")
    return init if os.path.isfile(init) else None


@pytest.mark.parametrize(
    "start", ["petr.modeling.postprocess", "petr.modeling.test_time_augmentation"]
)
def test_the_inference_path_imports_no_training_code(start):
    closure, todo = set(), [start]
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in closure or path is None:
            continue
        closure.add(module)
        todo += _module_imports(path)
    training = {f"petr.modeling.{m}" for m in ("criterion", "losses", "matcher")}
    assert "petr.modeling.oks" in closure or start.endswith("test_time_augmentation")
    assert not closure & training, closure & training


def test_inference_without_the_criterion_predicts_the_same():
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    cfg.MODEL.PETR.OKS_NMS_THRESH_TEST = 0.5  # the back door's OKS-NMS reads the model's sigmas
    model.oks_nms_thresh = 0.5
    image = torch.randint(0, 256, (3, 64, 80), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)  # fmt: skip
    with torch.no_grad():
        before = model([{"image": image}])[0]["instances"]
        del model.criterion
        after = model([{"image": image}])[0]["instances"]
        inference_only = PETR(**{**PETR.from_config(cfg), "criterion": None}).eval()
        inference_only.load_state_dict(model.state_dict())
        built = inference_only([{"image": image}])[0]["instances"]
    for other in (after, built):
        torch.testing.assert_close(other.pred_keypoints, before.pred_keypoints, rtol=0, atol=0)
        torch.testing.assert_close(other.scores, before.scores, rtol=0, atol=0)
    inference_only.train()
    with pytest.raises(RuntimeError, match="inference only"):
        inference_only([{"image": image}])


def test_one_keypoint_check_serves_every_route():
    """A 17-joint TEST set against a 14-joint model: the trainer, --eval-only, TTA, the
    predictor and the demo all fail before inference with the same message."""
    cfg = _cfg()
    cfg.DATASETS.TRAIN = ("crowdpose_train",)  # 14 joints
    model = build_model(cfg)  # a build without the check
    assert model.num_keypoints == 14 and cfg.DATASETS.TEST == ("keypoints_coco_2017_val",)
    message = "'keypoints_coco_2017_val'.*17 keypoint_names but the model predicts 14"
    routes = [
        lambda: PETRTrainer.build_model(cfg),
        lambda: PETRTrainer.test(cfg, model),
        lambda: PETRWithTTA(cfg, model),
        lambda: PETRPredictor(cfg),
        lambda: VisualizationDemo(cfg),
    ]
    for route in routes:
        with pytest.raises(ValueError, match=message):
            route()
