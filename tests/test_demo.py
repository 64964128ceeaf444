"""tools/demo.py and petr.demo on CPU with a tiny random PETR (no trained weights needed)."""

import logging
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from petr_testing import captured_log, demo_cfg, load_tool

from petr.demo import VisualizationDemo, draw_poses
from petr.demo.predictor import _joints_over
from petr.modeling.test_time_augmentation import PETRWithTTA

K14 = "petr_test_demo_k14"
K14_NAMES = [
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "head",
    "neck",
]  # fmt: skip
GREEN, ORANGE = (0, 200, 80), (255, 128, 0)  # RGB
MetadataCatalog.get(K14).set(
    keypoint_names=K14_NAMES,
    keypoint_flip_map=[("left_shoulder", "right_shoulder"), ("left_hip", "right_hip")],
    keypoint_connection_rules=[("head", "neck", GREEN), ("left_hip", "left_knee", ORANGE)],
    thing_classes=["person"],
)


demo_script = load_tool("demo")


@pytest.fixture
def warnings_of_demo():
    with captured_log("petr.demo", logging.WARNING) as messages:
        yield messages


def test_folder_with_a_corrupt_file(tmp_path, demo_config_file, warnings_of_demo):
    rng = np.random.default_rng(0)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name, (h, w) in {"a.png": (40, 56), "b.png": (50, 36)}.items():
        cv2.imwrite(str(inputs / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    (inputs / "broken.jpg").write_bytes(rng.bytes(300))
    argv = ["--config-file", demo_config_file, "--input", str(inputs), "--output", str(out)]
    assert demo_script.main(argv + ["--confidence-threshold", "0"]) == 0
    assert sorted(os.listdir(out)) == ["a.png", "b.png"]
    for name, shape in {"a.png": (40, 56, 3), "b.png": (50, 36, 3)}.items():
        drawn, original = cv2.imread(str(out / name)), cv2.imread(str(inputs / name))
        assert drawn.shape == shape
        assert np.abs(drawn.astype(int) - original).max() > 50  # something was drawn on it
    assert any("broken.jpg" in m for m in warnings_of_demo)
    assert not any("a.png" in m or "b.png" in m for m in warnings_of_demo)


def test_nothing_readable_is_a_failure_and_globs_expand(tmp_path, demo_config_file):
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    argv = ["--config-file", demo_config_file, "--output", str(tmp_path / "out")]
    assert demo_script.main(argv + ["--input", str(tmp_path / "x.jpg")]) == 1
    assert demo_script.main(argv + ["--input", str(tmp_path / "none_*.png")]) == 1
    cv2.imwrite(str(tmp_path / "one.png"), np.zeros((20, 30, 3), np.uint8))
    assert demo_script.collect_inputs([str(tmp_path / "*.png"), str(tmp_path / "x.jpg")]) == [
        str(tmp_path / "one.png"), str(tmp_path / "x.jpg"),
    ]  # fmt: skip


def test_video_keeps_every_frame(tmp_path, demo_config_file):
    path, out = str(tmp_path / "clip.avi"), tmp_path / "out"
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(1)
    for _ in range(4):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    argv = ["--config-file", demo_config_file, "--video-input", path, "--output", str(out) + os.sep]
    assert demo_script.main(argv) == 0
    video = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = []
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 4 and frames[0].shape == (48, 64, 3)
    assert demo_script.main(argv[:3] + [str(tmp_path / "missing.mp4")]) == 1


def test_no_image_under_input_is_an_error_naming_it(tmp_path, demo_config_file, warnings_of_demo):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    argv = ["--config-file", demo_config_file, "--output", str(tmp_path / "out")]
    assert demo_script.main(argv + ["--input", str(empty), str(tmp_path / "*.png")]) == 1
    assert f"No image found under --input {empty} {tmp_path / '*.png'}" in warnings_of_demo


def test_video_writer_that_cannot_open_is_an_error(tmp_path, demo_config_file, warnings_of_demo):
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    target = tmp_path / "no_such_folder" / "out.mp4"
    argv = ["--config-file", demo_config_file, "--video-input", path, "--output", str(target)]
    assert demo_script.main(argv) == 1
    assert any(f"Cannot open the video writer for {str(target)!r}" in m for m in warnings_of_demo)
    assert not target.exists()


def _pose14(score):
    """One 14-joint pose: head (80.5, 20.5) - neck (80.5, 50.5) and left hip (40.5, 60.5) -
    left knee (40.5, 100.5) are connected by the rules; the others sit in the bottom right."""
    kpts = torch.ones(1, 14, 3)
    kpts[0, :, :2] = torch.tensor([[120.5 + i, 105.5] for i in range(14)])
    for name, xy in {"head": (80.5, 20.5), "neck": (80.5, 50.5), "left_hip": (40.5, 60.5),
                     "left_knee": (40.5, 100.5)}.items():  # fmt: skip
        kpts[0, K14_NAMES.index(name), :2] = torch.tensor(xy)
    inst = Instances((120, 160))
    inst.pred_keypoints = kpts
    inst.pred_boxes = Boxes(torch.tensor([[40.5, 20.5, 133.5, 105.5]]))
    inst.scores = torch.tensor([score])
    inst.pred_classes = torch.zeros(1, dtype=torch.int64)
    return inst


def test_skeleton_of_any_k_follows_the_metadata_rules():
    black = np.zeros((120, 160, 3), np.uint8)
    drawn = draw_poses(black, _pose14(0.9), MetadataCatalog.get(K14), 0.3).get_image()
    assert tuple(drawn[35, 80]) == GREEN  # middle of head-neck
    assert tuple(drawn[80, 40]) == ORANGE  # middle of left hip - left knee
    assert tuple(drawn[60, 60]) == (0, 0, 0)  # head and left knee are not connected
    below = draw_poses(black, _pose14(0.2), MetadataCatalog.get(K14), 0.3).get_image()
    assert not below.any()  # under the confidence threshold: nothing drawn
    with pytest.raises(ValueError, match="keypoints_coco_2017_val.*17 keypoint_names"):
        draw_poses(black, _pose14(0.9), MetadataCatalog.get("keypoints_coco_2017_val"))


def test_keypoint_threshold_hides_joints_of_low_confidence():
    black = np.zeros((120, 160, 3), np.uint8)
    meta = MetadataCatalog.get(K14)
    pose = _pose14(0.9)
    pose.pred_keypoints[0, K14_NAMES.index("head"), 2] = 0.4  # a doubtful head
    drawn = draw_poses(black, pose, meta, 0.3).get_image()  # Detectron2's default 0.05
    assert tuple(drawn[35, 80]) == GREEN
    strict = draw_poses(black, pose, meta, 0.3, keypoint_threshold=0.5).get_image()
    assert tuple(strict[35, 80]) == (0, 0, 0)  # the head is hidden, so is its bone
    assert tuple(strict[80, 40]) == ORANGE  # confident joints stay
    # the video drawer keeps Detectron2's fixed threshold: the joint scores are binarised
    over = _joints_over(pose, 0.5).pred_keypoints[0, :, 2]
    assert over.tolist() == [0.0 if n == "head" else 1.0 for n in K14_NAMES]
    assert pose.pred_keypoints[0, K14_NAMES.index("head"), 2] == pytest.approx(0.4)  # a copy
    parser = demo_script.get_parser()
    assert parser.parse_args(["--config-file", "x"]).keypoint_threshold == 0.05
    assert (
        parser.parse_args(["--config-file", "x", "--keypoint-threshold", "0.3"]).keypoint_threshold
        == 0.3
    )


def test_visualization_demo_with_a_14_joint_model_and_flip_test():
    cfg = demo_cfg(K14)
    cfg.TEST.AUG.ENABLED, cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE = True, (64,), 128
    torch.manual_seed(0)
    demo = VisualizationDemo(cfg, confidence_threshold=0.0)
    assert isinstance(demo.predictor.model, PETRWithTTA)
    image = np.random.default_rng(2).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    predictions, vis = demo.run_on_image(image)
    inst = predictions["instances"]
    assert inst.image_size == (60, 90) and inst.pred_keypoints.shape[1:] == (14, 3)
    assert vis.get_image().shape == (60, 90, 3)
