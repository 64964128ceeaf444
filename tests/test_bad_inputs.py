"""Images, configs, demo inputs and command-line datasets that used to fail late or silently:
16-bit and 1-channel PNGs, impossible config values, zero-frame videos, huge photos, unwritable
outputs, `tools/train_net.py --dataset`."""

import json
import logging
import os
import re

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from petr_testing import captured_log, load_cfg, load_tool, shrink_cfg
from PIL import Image

from petr.config import check_config
from petr.data.dataset_mapper import PETRDatasetMapper
from petr.data.image_io import read_image
from petr.data.preprocess import PETRPreprocessor

demo_script = load_tool("demo")
train_net = load_tool("train_net")
RAMP = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491


def test_16_bit_and_1_channel_pngs_are_scaled_to_8_bits(tmp_path):
    cv2.imwrite(str(tmp_path / "cv2_gray16.png"), RAMP)
    Image.fromarray(RAMP).save(tmp_path / "pil_gray16.png")
    cv2.imwrite(str(tmp_path / "cv2_rgb16.png"), np.stack([RAMP, RAMP // 2, RAMP // 4], -1))
    cv2.imwrite(str(tmp_path / "gray8.png"), (RAMP // 257).astype(np.uint8))
    expected = np.rint(RAMP * (255 / 65535)).astype(np.uint8)
    assert Image.open(tmp_path / "cv2_gray16.png").mode.startswith("I")  # the 16-bit case
    for name in ("cv2_gray16.png", "pil_gray16.png"):
        for fmt in ("BGR", "RGB"):
            image = read_image(str(tmp_path / name), format=fmt)
            assert image.shape == (48, 64, 3) and image.dtype == np.uint8
            assert (image == expected[..., None]).all(), name  # Detectron2's: all 255
        assert read_image(str(tmp_path / name), format="L")[..., 0].tolist() == expected.tolist()
    bgr = read_image(str(tmp_path / "cv2_rgb16.png"), format="BGR").astype(int)
    assert (
        np.abs(bgr[..., 0] - expected).max() <= 1 and np.abs(bgr[..., 2] - expected // 4).max() <= 1
    )
    gray8 = read_image(str(tmp_path / "gray8.png"), format="BGR")
    assert (gray8 == (RAMP // 257).astype(np.uint8)[..., None]).all()


def test_exif_orientation_and_8_bit_images_read_as_detectron2(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90
    image.save(tmp_path / "rotated.jpg", exif=exif)
    ours = read_image(str(tmp_path / "rotated.jpg"), format="BGR")
    assert ours.shape == (50, 30, 3)
    assert (ours == d2_utils.read_image(str(tmp_path / "rotated.jpg"), format="BGR")).all()


def _tiny_cfg(**overrides):
    cfg = shrink_cfg(load_cfg("petr_R50.yaml"))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ("keypoints_coco_2017_val",)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 128
    for key, value in overrides.items():
        cfg.merge_from_list([key, str(value)])
    return cfg


def test_the_mapper_and_the_demo_read_16_bit_grayscale(tmp_path):
    cv2.imwrite(str(tmp_path / "g16.png"), RAMP)
    mapper = PETRDatasetMapper(_tiny_cfg(), is_train=False)
    out = mapper({"file_name": str(tmp_path / "g16.png"), "height": 48, "width": 64})
    assert out["image"].float().mean() < 200  # not the white image
    config = tmp_path / "tiny.yaml"
    config.write_text(_tiny_cfg().dump())
    argv = ["--config-file", str(config), "--input", str(tmp_path / "g16.png")]
    assert demo_script.main(argv + ["--output", str(tmp_path / "d.png")]) == 0
    assert cv2.imread(str(tmp_path / "d.png")).mean() < 200


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("MODEL.PETR.NUM_QUERIES", 0, "MODEL.PETR.NUM_QUERIES must be >= 1, got 0"),
        ("SOLVER.IMS_PER_BATCH", 0, "SOLVER.IMS_PER_BATCH must be >= 1"),
        ("INPUT.MIN_SIZE_TEST", -1, "INPUT.MIN_SIZE_TEST must be >= 0 px (0: no resize"),
        ("INPUT.MAX_SIZE_TEST", 0, "INPUT.MAX_SIZE_TEST must be >= 1 px, got 0"),
        ("INPUT.MIN_SIZE_TRAIN", (0, 800), "INPUT.MIN_SIZE_TRAIN must be >= 1 px, got (0, 800)"),
        ("MODEL.PETR.NUM_FEATURE_LEVELS", 2, "NUM_FEATURE_LEVELS must be >= len(MODEL.PETR.IN"),
        ("MODEL.PETR.ENC_N_POINTS", 0, "MODEL.PETR.ENC_N_POINTS must be >= 1, got 0"),
        ("MODEL.PETR.OKS_WEIGHT", -1.0, "MODEL.PETR.OKS_WEIGHT must be >= 0, got -1.0"),
        ("MODEL.PETR.OKS_NMS_THRESH_TEST", 1.5, "OKS_NMS_THRESH_TEST must be [0, 1]"),
    ],
)
def test_impossible_config_values_name_the_key_and_range(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(_tiny_cfg(**{key: value}))


def test_weights_folder_is_refused_and_the_demo_runs_the_check(tmp_path):
    with pytest.raises(ValueError, match="MODEL.WEIGHTS must be a checkpoint file, got the fold"):
        check_config(_tiny_cfg(**{"MODEL.WEIGHTS": str(tmp_path)}))
    config = tmp_path / "tiny.yaml"
    config.write_text(_tiny_cfg(**{"MODEL.PETR.NUM_QUERIES": 0}).dump())
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((40, 50, 3), np.uint8))
    with pytest.raises(ValueError, match="MODEL.PETR.NUM_QUERIES must be >= 1"):
        demo_script.main(["--config-file", str(config), "--input", str(tmp_path / "a.png")])


def test_min_size_test_0_means_no_resize():
    cfg = _tiny_cfg(**{"INPUT.MIN_SIZE_TEST": 0})
    check_config(cfg)
    out = PETRPreprocessor(cfg)(np.zeros((40, 90, 3), np.uint8), "BGR")
    assert tuple(out["image"].shape) == (3, 40, 90)
    assert tuple(PETRPreprocessor(_tiny_cfg())(np.zeros((40, 90, 3), np.uint8))["image"].shape) == (
        3, 57, 128
    )  # fmt: skip


@pytest.fixture
def demo_errors():
    with captured_log("petr.demo", logging.ERROR) as messages:
        yield messages


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(_tiny_cfg().dump())
    return str(path)


def test_a_video_without_frames_is_an_error_and_leaves_nothing(tmp_path, config_file, demo_errors):
    path = str(tmp_path / "empty.avi")
    cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48)).release()
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--config-file", config_file, "--video-input", path, "--output", str(out / "e.mp4")]
    assert demo_script.main(argv) == 1
    assert len(demo_errors) == 1 and path in demo_errors[0], demo_errors
    assert os.listdir(out) == []


def test_large_images_are_drawn_at_a_bounded_size(tmp_path, config_file):
    cv2.imwrite(str(tmp_path / "big.png"), np.full((600, 900, 3), 90, np.uint8))
    argv = ["--config-file", config_file, "--input", str(tmp_path / "big.png"), "--output"]
    assert demo_script.main(argv + [str(tmp_path / "s.png"), "--max-output-size", "300"]) == 0
    assert cv2.imread(str(tmp_path / "s.png")).shape == (200, 300, 3)
    assert demo_script.main(argv + [str(tmp_path / "f.png"), "--max-output-size", "300",
                                    "--full-size"]) == 0  # fmt: skip
    assert cv2.imread(str(tmp_path / "f.png")).shape == (600, 900, 3)


def test_an_unwritable_output_is_one_error_line(tmp_path, config_file, demo_errors):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((40, 50, 3), np.uint8))
    (tmp_path / "file").write_text("a file, not a folder")
    target = str(tmp_path / "file" / "out.png")
    argv = ["--config-file", config_file, "--input", str(tmp_path / "a.png"), "--output", target]
    assert demo_script.main(argv) == 1
    assert len(demo_errors) == 1 and "file/out.png" in demo_errors[0], demo_errors


def _keypoint_json(path, names, skeleton):
    rng = np.random.default_rng(0)
    cv2.imwrite(str(path.parent / "a.png"), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    kps = [v for j in range(len(names)) for v in (8 + 4 * j, 20, 2)]
    ann = dict(id=1, image_id=1, category_id=1, iscrowd=0, bbox=[4, 4, 50, 30], area=1500.0,
               keypoints=kps, num_keypoints=len(names))  # fmt: skip
    cats = [{"id": 1, "name": "person", "keypoints": names, "skeleton": skeleton}]
    images = [dict(id=1, file_name="a.png", width=64, height=48)]
    path.write_text(json.dumps(dict(images=images, annotations=[ann], categories=cats)))
    return str(path)


def test_train_net_dataset_flag_registers_a_json_in_main(tmp_path):
    names = ["head", "l_hand", "r_hand", "hand_left_tip", "hand_right_tip"]
    json_file = _keypoint_json(tmp_path / "k5.json", names, [[1, 2], [2, 4], [3, 5]])
    name = "petr_test_cli_k5"
    for n in (name,):
        if n in DatasetCatalog.list():
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)
    cfg = _tiny_cfg(**{"DATASETS.TEST": f"('{name}',)", "OUTPUT_DIR": str(tmp_path / "o")})
    cfg.DATASETS.TRAIN = (name,)
    (tmp_path / "c.yaml").write_text(cfg.dump())
    args = train_net.get_parser().parse_args(
        ["--config-file", str(tmp_path / "c.yaml"), "--eval-only",
         "--dataset", name, json_file, str(tmp_path), "--oks-sigmas", "0.1,0.1,0.1,0.1,0.1"]
    )  # fmt: skip
    results = train_net.main(args)  # what each launched process runs
    assert set(results["keypoints"]) >= {"AP", "AP50"}
    meta = MetadataCatalog.get(name)
    assert meta.keypoint_names == names and meta.keypoint_oks_sigmas == [0.1] * 5
    assert meta.keypoint_flip_map == [("l_hand", "r_hand"), ("hand_left_tip", "hand_right_tip")]
    green, orange = (0, 200, 80), (255, 128, 0)
    assert meta.keypoint_connection_rules == [
        ("head", "l_hand", (51, 153, 255)), ("l_hand", "hand_left_tip", green),
        ("r_hand", "hand_right_tip", orange),
    ]  # fmt: skip


def test_dataset_flag_without_sigmas_for_unknown_joints_is_an_error(tmp_path):
    json_file = _keypoint_json(tmp_path / "k2.json", ["a", "b"], [])
    args = train_net.get_parser().parse_args(
        ["--config-file", "x.yaml", "--dataset", "petr_test_cli_k2", json_file, str(tmp_path)]
    )
    with pytest.raises(ValueError, match=r"k2.json has 2 keypoints .*--oks-sigmas"):
        train_net.register_datasets(args)
