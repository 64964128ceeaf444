"""PETRDatasetMapper: keypoint bookkeeping of the official pipeline, errors, negatives, seeds."""

import math

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from petr_testing import load_cfg

from petr.data.bad_images import BAD_IMAGES_KEY, UNREADABLE_KEY
from petr.data.dataset_mapper import MAX_CONSECUTIVE_BAD_READS, PETRDatasetMapper
from petr.data.preprocess import PETRPreprocessor
from petr.data.transforms import AffineWarpTransform, CV2ResizeTransform

DATASET = "petr_test_mapper_k5"
NAMES = ["nose", "left_eye", "right_eye", "left_hand", "right_hand"]
MetadataCatalog.get(DATASET).set(
    keypoint_names=NAMES,
    keypoint_flip_map=[("left_eye", "right_eye"), ("left_hand", "right_hand")],
    keypoint_oks_sigmas=[0.03, 0.03, 0.03, 0.06, 0.06],
)
H, W = 100, 200


class _Fixed(T.Augmentation):
    """Always returns the given transform."""

    def __init__(self, tfm):
        super().__init__()
        self.tfm = tfm

    def get_transform(self, image):
        return self.tfm


def _mapper(*augs, is_train=True):
    flip = utils.create_keypoint_hflip_indices([DATASET])
    front_door = (
        None if is_train else PETRPreprocessor(min_size=64, max_size=96, input_format="BGR")
    )
    return PETRDatasetMapper(
        is_train,
        augmentations=list(augs),
        image_format="BGR",
        num_keypoints=len(NAMES),
        keypoint_hflip_indices=flip,
        preprocessor=front_door,
    )


def _person(joints, box, area=500.0, ann_id=1, **extra):
    """joints: {name: (x, y, v)} in continuous pixels; box: XYWH."""
    kps = np.zeros((len(NAMES), 3))
    for name, xyv in joints.items():
        kps[NAMES.index(name)] = xyv
    return dict(
        id=ann_id, bbox=list(box), bbox_mode=BoxMode.XYWH_ABS, keypoints=kps.ravel().tolist(),
        area=area, iscrowd=0, category_id=0, **extra,
    )  # fmt: skip


def _record(tmp_path, annotations, h=H, w=W, name="img.png", image=None):
    path = tmp_path / name
    if image is None:
        image = np.random.RandomState(0).randint(0, 255, (h, w, 3)).astype(np.uint8)
    cv2.imwrite(str(path), image)
    return dict(file_name=str(path), height=h, width=w, image_id=1, annotations=annotations)


def _kpts(out):
    return out["instances"].gt_keypoints.tensor.numpy()


def test_flip_swaps_left_and_right_with_the_flip_map(tmp_path):
    joints = {
        "nose": (50.5, 10.5, 2), "left_eye": (30.5, 20.5, 2), "left_hand": (10.0, 60.0, 1),
        "right_hand": (90.0, 60.0, 2),
    }  # fmt: skip
    out = _mapper(T.RandomFlip(prob=1.0))(_record(tmp_path, [_person(joints, (5, 5, 100, 80))]))
    expected = np.array(
        [
            [W - 50.5, 10.5, 2],  # the nose has no partner
            [0.0, 0.0, 0.0],  # from the unlabelled right_eye: swapped, not moved
            [W - 30.5, 20.5, 2],  # from left_eye
            [W - 90.0, 60.0, 2],  # from right_hand
            [W - 10.0, 60.0, 1],
        ]
    )
    assert np.allclose(_kpts(out)[0], expected)
    assert np.allclose(out["instances"].gt_boxes.tensor.numpy(), [[W - 105, 5, W - 5, 85]])


def test_image_keeps_unlabelled_joints_at_zero_and_converts_boxes(tmp_path):
    # load_coco_json moves (0, 0, 0) joints to (0.5, 0.5, 0); the mapper zeroes them again.
    person = _person({"nose": (40.0, 30.0, 2), "left_eye": (0.5, 0.5, 0)}, (20, 10, 50, 60))
    out = _mapper()(_record(tmp_path, [person]))
    assert np.allclose(_kpts(out)[0, :2], [[40, 30, 2], [0, 0, 0]])
    assert np.allclose(out["instances"].gt_boxes.tensor.numpy(), [[20, 10, 70, 70]])
    assert out["image"].dtype == torch.float32 and out["image"].shape == (3, H, W)
    assert out["instances"].gt_classes.tolist() == [0]


def _rotate(deg, x, y, h=H, w=W):
    """Independent reference: rotate (x, y) by deg about the image centre (y down)."""
    t = math.radians(deg)
    dx, dy = x - w / 2, y - h / 2
    return w / 2 + dx * math.cos(t) - dy * math.sin(t), h / 2 + dx * math.sin(t) + dy * math.cos(t)


def _rotation_transform(deg):
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    m = (
        np.array([[1, 0, W / 2], [0, 1, H / 2], [0, 0, 1]])
        @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        @ np.array([[1, 0, -W / 2], [0, 1, -H / 2], [0, 0, 1]])
    )
    return AffineWarpTransform(m, H, W, 0.0)


def test_rotation_invalidates_joints_outside_and_drops_people_without_joints(tmp_path):
    inside, leaving = (100.0, 30.0), (5.0, 50.0)
    kept = _person({"nose": (*inside, 2), "left_hand": (*leaving, 2)}, (0, 20, 110, 40), area=700.0)
    lost = _person({"nose": (3.0, 40.0, 2), "left_eye": (8.0, 60.0, 1)}, (0, 35, 12, 30), ann_id=2)
    out = _mapper(_Fixed(_rotation_transform(90)))(_record(tmp_path, [kept, lost]))
    assert len(out["instances"]) == 1
    kps = _kpts(out)[0]
    assert np.allclose(kps[0, :2], _rotate(90, *inside), atol=1e-4) and kps[0, 2] == 2
    assert _rotate(90, *leaving)[1] < 0 and np.all(kps[3] == 0)  # left the image: (0, 0, 0)
    assert out["instances"].gt_areas.tolist() == [700.0]  # rotation keeps the area
    box = out["instances"].gt_boxes.tensor.numpy()[0]
    assert box.min() >= 0 and box[2] <= W and box[3] <= H
    # When the warp removes every person, the official code resamples: the mapper returns None.
    assert _mapper(_Fixed(_rotation_transform(90)))(_record(tmp_path, [lost])) is None


def test_resize_scales_keypoints_boxes_and_areas(tmp_path):
    person = _person({"nose": (10.0, 20.0, 2), "right_hand": (150.0, 90.0, 1)}, (4, 8, 160, 88))
    out = _mapper(_Fixed(CV2ResizeTransform(H, W, 200, 300)))(_record(tmp_path, [person]))
    assert out["image"].shape == (3, 200, 300)
    assert np.allclose(_kpts(out)[0, [0, 4]], [[15, 40, 2], [225, 180, 1]])
    assert np.allclose(out["instances"].gt_boxes.tensor.numpy(), [[6, 16, 246, 192]])
    assert out["instances"].gt_areas.tolist() == [pytest.approx(500.0 * 1.5 * 2.0)]


def test_crop_keeps_shifts_drops_and_resamples_like_the_official_code(tmp_path):
    a = _person({"nose": (30.0, 30.0, 2), "left_eye": (120.0, 50.0, 2)}, (20, 20, 110, 40))
    b = _person({"nose": (180.0, 90.0, 2)}, (170, 80, 20, 15), ann_id=2)
    record = _record(tmp_path, [a, b])
    out = _mapper(_Fixed(T.CropTransform(100, 10, 60, 60)))(record)  # x 100-160, y 10-70
    assert len(out["instances"]) == 1 and out["image"].shape == (3, 60, 60)
    assert np.allclose(_kpts(out)[0, :2], [[0, 0, 0], [20, 40, 2]])
    assert np.allclose(out["instances"].gt_boxes.tensor.numpy(), [[0, 10, 30, 50]])
    # Overlapping no box: kept as a negative sample.
    out = _mapper(_Fixed(T.CropTransform(140, 0, 25, 15)))(record)
    assert len(out["instances"]) == 0
    # Box a overlaps the crop but none of its joints lies inside: resample.
    assert _mapper(_Fixed(T.CropTransform(40, 25, 50, 30)))(record) is None


def test_unreadable_image_is_reported_on_the_next_sample(tmp_path):
    bad = tmp_path / "corrupt_frame.jpg"
    bad.write_bytes(b"this is not a jpeg")
    record = dict(file_name=str(bad), height=H, width=W, image_id=3, annotations=[])
    mapper = _mapper()
    assert mapper(record) is None  # Detectron2's MapDataset then draws another image
    good = mapper(_record(tmp_path, []))
    ((path, reason),) = good[BAD_IMAGES_KEY]
    assert path == str(bad) and "UnidentifiedImageError" in reason
    assert BAD_IMAGES_KEY not in mapper(_record(tmp_path, []))  # reported once
    # Inference: the dict comes back without an image, with the reason.
    out = _mapper(is_train=False)(record)
    assert "image" not in out and "cannot identify image file" in out[UNREADABLE_KEY]


def test_a_wrong_image_root_stops_instead_of_redrawing_forever(tmp_path):
    mapper = _mapper()
    missing = dict(height=H, width=W, image_id=3, annotations=[])
    for i in range(MAX_CONSECUTIVE_BAD_READS - 1):
        assert mapper({**missing, "file_name": str(tmp_path / f"{i}.jpg")}) is None
    with pytest.raises(OSError, match=r"last 50 image reads all failed; first: .*0\.jpg"):
        mapper({**missing, "file_name": str(tmp_path / "last.jpg")})


def test_keypoint_count_mismatch_names_the_annotation(tmp_path):
    person = _person({"nose": (10.0, 10.0, 2)}, (0, 0, 20, 20), ann_id=4242)
    person["keypoints"] = person["keypoints"][:12]  # 4 joints for a 5-joint dataset
    with pytest.raises(ValueError, match=r"4242 of .*img.png.* 12 keypoint values.*5 keypoints"):
        _mapper()(_record(tmp_path, [person]))


def test_size_mismatch_names_the_file(tmp_path):
    record = _record(tmp_path, [], name="wrong_size.png")
    record["height"] = H + 1
    with pytest.raises(utils.SizeMismatchError, match="wrong_size.png"):
        _mapper()(record)


def test_image_without_people_is_a_valid_negative(tmp_path):
    crowd = _person({"nose": (50.0, 50.0, 2)}, (40, 40, 30, 30))
    crowd["iscrowd"] = 1
    unlabelled = _person({}, (10, 10, 30, 30), ann_id=2)
    tagged_empty = _person({"nose": (70.0, 20.0, 1)}, (60, 10, 30, 30), ann_id=3, num_keypoints=0)
    for annotations in ([], [crowd, unlabelled, tagged_empty]):
        out = _mapper(_Fixed(_rotation_transform(20)))(_record(tmp_path, annotations))
        inst = out["instances"]
        assert len(inst) == 0 and inst.image_size == (H, W)
        assert inst.gt_keypoints.tensor.shape == (0, 5, 3) and inst.gt_boxes.tensor.shape == (0, 4)
        assert inst.gt_areas.shape == (0,) and out["image"].shape == (3, H, W)


def test_degenerate_boxes_are_skipped(tmp_path):
    thin = _person({"nose": (50.0, 50.0, 2)}, (50, 40, 0.5, 30))
    outside = _person({"nose": (50.0, 50.0, 2)}, (W + 5, 10, 20, 20), ann_id=2)
    no_area = _person({"nose": (50.0, 50.0, 2)}, (40, 40, 20, 20), area=0.0, ann_id=3)
    good = _person({"nose": (50.0, 50.0, 2)}, (40, 40, 20, 20), ann_id=4)
    out = _mapper()(_record(tmp_path, [thin, outside, no_area, good]))
    assert np.allclose(out["instances"].gt_boxes.tensor.numpy(), [[40, 40, 60, 60]])


def _cfg(**petr_input):
    cfg = load_cfg("Base-PETR.yaml")  # the recipe's INPUT keys
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.DATASETS.TRAIN = (DATASET,)
    for k, v in petr_input.items():
        setattr(cfg.INPUT.PETR, k, v)
    return cfg


def test_full_pipeline_is_deterministic_under_a_seed(tmp_path):
    person = _person({"nose": (100.0, 50.0, 2), "left_hand": (60.0, 70.0, 2)}, (50, 30, 70, 50))
    record = _record(tmp_path, [person])
    mapper = PETRDatasetMapper(_cfg(), is_train=True)
    outputs = []
    for seed in (7, 7, 8):
        np.random.seed(seed)
        outputs.append(mapper(record))
    a, b, c = outputs
    assert a["image"].dtype == torch.float32
    assert torch.equal(a["image"], b["image"]) and torch.equal(_kpts_t(a), _kpts_t(b))
    assert a["image"].shape != c["image"].shape or not torch.equal(a["image"], c["image"])


def _kpts_t(out):
    return out["instances"].gt_keypoints.tensor


def test_full_pipeline_keeps_joints_on_their_pixels(tmp_path):
    # One labelled joint drawn as a bright dot on a black image; photometric off keeps it white.
    image = np.zeros((H, W, 3), np.uint8)
    cv2.circle(image, (120, 40), 2, (255, 255, 255), -1)  # pixel (120, 40) = continuous 120.5
    record = _record(
        tmp_path, [_person({"nose": (120.5, 40.5, 2)}, (100, 20, 50, 50))], image=image
    )
    cfg = _cfg(PHOTOMETRIC=False)
    cfg.MODEL.PIXEL_MEAN = [0.0, 0.0, 0.0]
    mapper = PETRDatasetMapper(cfg, is_train=True)
    checked = 0
    for seed in range(8):
        np.random.seed(seed)
        out = mapper(record)
        if out is None or len(out["instances"]) == 0:
            continue
        img = out["image"][0].numpy()
        weight = np.where(img > 0.5 * img.max(), img, 0.0)
        ys, xs = np.mgrid[0 : img.shape[0], 0 : img.shape[1]] + 0.5
        centre = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
        assert np.abs(centre - _kpts(out)[0, 0, :2]).max() < 1.5, seed
        checked += 1
    assert checked >= 5


def test_test_mode_only_resizes(tmp_path):
    record = _record(tmp_path, [_person({"nose": (10.0, 10.0, 2)}, (0, 0, 20, 20))])
    out = PETRDatasetMapper(_cfg(), is_train=False)(record)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 667, 1333)
    assert "instances" not in out and "annotations" not in out
    assert (out["height"], out["width"]) == (H, W)


def test_training_needs_a_flip_map_when_flipping():
    name = "petr_test_mapper_no_flip_map"
    MetadataCatalog.get(name).set(keypoint_names=["a", "b"])
    cfg = _cfg()
    cfg.DATASETS.TRAIN = (name,)
    with pytest.raises(ValueError, match="keypoint_flip_map.*petr_test_mapper_no_flip_map"):
        PETRDatasetMapper(cfg, is_train=True)
    cfg.INPUT.PETR.FLIP_PROB = 0.0
    assert PETRDatasetMapper(cfg, is_train=True).num_keypoints == 2
