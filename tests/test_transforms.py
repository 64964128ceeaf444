"""PETR augmentations: pixels and points move together; mmdet sampling and rounding rules."""

import math

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from petr_testing import load_cfg

from petr.data.preprocess import PETRPreprocessor
from petr.data.transforms import (
    AffineWarpTransform,
    CV2ResizeTransform,
    PhotometricDistortion,
    PhotometricDistortionTransform,
    RandomAffine,
    RandomChoice,
    RescaleShortEdge,
    build_petr_augmentation,
    rescale_size,
)


def _blob_image(h, w, xy, sigma=2.0):
    """Float32 (h, w, 3) black image with a Gaussian blob centred at continuous pixel xy."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    blob = 255.0 * np.exp(-((xs - xy[0]) ** 2 + (ys - xy[1]) ** 2) / (2 * sigma**2))
    return np.repeat(blob[..., None], 3, axis=2).astype(np.float32)


def _blob_centre(img):
    """Continuous xy of the intensity centroid of the pixels above half the maximum."""
    gray = img[..., 0].astype(np.float64)
    weight = np.where(gray > 0.5 * gray.max(), gray, 0.0)
    ys, xs = np.mgrid[0 : gray.shape[0], 0 : gray.shape[1]] + 0.5
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


def _rotation_about_centre(deg, h, w):
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    return np.array(
        [[c, -s, w / 2 - c * w / 2 + s * h / 2], [s, c, h / 2 - s * w / 2 - c * h / 2], [0, 0, 1]]
    )


H, W = 90, 120
POINTS = [(30.5, 20.5), (60.0, 45.0), (97.3, 70.8)]
TRANSFORMS = {
    "rotate_25": lambda: AffineWarpTransform(_rotation_about_centre(25, H, W), H, W),
    "rotate_-30": lambda: AffineWarpTransform(_rotation_about_centre(-30, H, W), H, W),
    "hflip": lambda: T.HFlipTransform(W),
    "resize_up_uneven": lambda: CV2ResizeTransform(H, W, 151, 173),
    "resize_down": lambda: CV2ResizeTransform(H, W, 61, 81),
    "crop": lambda: T.CropTransform(13, 7, 95, 70),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("point", POINTS)
def test_points_follow_pixels(name, point):
    tfm = TRANSFORMS[name]()
    out = tfm.apply_image(_blob_image(H, W, point))
    expected = tfm.apply_coords(np.array([point], dtype=np.float64))[0]
    # Sub-pixel: a half-pixel convention slip (W - 1 - x, index vs continuous) fails.
    assert np.abs(_blob_centre(out) - expected).max() < 0.25, (name, _blob_centre(out), expected)


def test_random_affine_samples_rotation_about_centre_within_range():
    np.random.seed(0)
    img = np.zeros((H, W, 3), np.float32)
    angles = []
    for _ in range(200):
        m = RandomAffine(30.0, 0.0).get_transform(img).matrix
        assert np.allclose(m @ [W / 2, H / 2, 1], [W / 2, H / 2, 1])  # centre fixed, no shift
        assert np.allclose(m[:2, :2] @ m[:2, :2].T, np.eye(2))  # a pure rotation without shear
        angles.append(math.degrees(math.atan2(m[1, 0], m[0, 0])))
    assert max(np.abs(angles)) <= 30.0 and min(angles) < -20 and max(angles) > 20


def test_random_affine_shear_is_bounded():
    np.random.seed(1)
    img = np.zeros((H, W, 3), np.float32)
    shears = []
    for _ in range(100):
        m = RandomAffine(0.0, 2.0).get_transform(img).matrix
        shears += [m[0, 1], m[1, 0]]
    assert max(np.abs(shears)) <= math.tan(math.radians(2.0)) + 1e-12
    assert max(np.abs(shears)) > math.tan(math.radians(1.0))


def test_affine_border_is_the_given_pixel_and_boxes_take_warped_corners():
    img = np.full((100, 100, 3), 50.0, np.float32)
    tfm = AffineWarpTransform(_rotation_about_centre(90, 100, 100), 100, 100, (10.0, 20.0, 30.0))
    # A 90 degree turn about (50, 50): (x, y) -> (100 - y, x).
    assert np.allclose(tfm.apply_box(np.array([[10.0, 20.0, 50.0, 40.0]])), [[60, 10, 80, 50]])
    tfm45 = AffineWarpTransform(_rotation_about_centre(45, 100, 100), 100, 100, (10.0, 20.0, 30.0))
    box = tfm45.apply_box(np.array([[40.0, 40.0, 60.0, 60.0]]))[0]
    assert np.allclose(box[2:] - box[:2], 20 * math.sqrt(2))
    out = tfm45.apply_image(img)
    assert out.shape == img.shape
    assert np.allclose(out[0, 0], [10, 20, 30]) and np.allclose(out[50, 50], 50)


@pytest.mark.parametrize(
    "hw, short, cap, expected",
    [
        ((480, 640), 800, 1333, (800, 1067)),  # 640 * 5/3 = 1066.67 rounds up
        ((100, 1000), 800, 1333, (133, 1333)),  # the long-side cap binds
        ((333, 500), 400, 1400, (400, 601)),  # 600.6 -> 601 (mmcv int(x + 0.5), not truncation)
        ((640, 427), 400, 4200, (600, 400)),  # portrait
    ],
)
def test_rescale_size_uses_mmcv_rounding(hw, short, cap, expected):
    assert rescale_size(*hw, short, cap) == expected


def test_rescale_short_edge_range_is_inclusive_and_capped():
    np.random.seed(0)
    img = np.zeros((300, 400, 3), np.uint8)
    aug = RescaleShortEdge((400, 1400), 1400, "range")
    sizes = [aug.get_transform(img) for _ in range(300)]
    shorts = [t.new_h for t in sizes]
    assert min(shorts) >= 400 and max(t.new_w for t in sizes) <= 1400
    # Uncapped (short <= 1050 here) the short side is exactly the sampled integer.
    assert min(shorts) < 450 and max(shorts) == 1050


def test_resize_is_opencv_bilinear_and_keeps_float_range():
    img = np.zeros((40, 60, 3), np.float32)
    img[:, :30] = -50.0
    img[:, 30:] = 400.0  # values PIL-based resizing cannot hold
    out = CV2ResizeTransform(40, 60, 80, 120).apply_image(img)
    assert out.dtype == np.float32 and out.shape == (80, 120, 3)
    assert np.allclose(out[:, :55], -50.0) and np.allclose(out[:, 65:], 400.0)
    small = np.random.RandomState(0).rand(20, 30, 3).astype(np.float32)
    ref = cv2.resize(small, (17, 11), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(CV2ResizeTransform(20, 30, 11, 17).apply_image(small), ref)


def _rgb_pixel(rgb, image_format):
    px = np.array(rgb, np.float32)[None, None, :]
    return px if image_format == "RGB" else px[..., ::-1].copy()


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_hue_shift_respects_channel_order_and_wraps(image_format):
    red = _rgb_pixel((200, 0, 0), image_format)
    green = PhotometricDistortionTransform(hue_delta=120.0, image_format=image_format)
    assert np.allclose(green.apply_image(red), _rgb_pixel((0, 200, 0), image_format), atol=1e-3)
    blue = PhotometricDistortionTransform(hue_delta=-120.0, image_format=image_format)
    assert np.allclose(blue.apply_image(red), _rgb_pixel((0, 0, 200), image_format), atol=1e-3)


def test_brightness_contrast_saturation_and_channel_swap_without_clipping():
    img = np.array([[[250.0, 100.0, 50.0]]], np.float32)
    out = PhotometricDistortionTransform(brightness_delta=20.0, contrast_alpha=1.5).apply_image(img)
    assert np.allclose(out, [[[405.0, 180.0, 105.0]]])  # (x + 20) * 1.5, above 255 kept
    gray = PhotometricDistortionTransform(saturation_scale=0.0).apply_image(img)
    assert np.allclose(gray, 250.0, atol=1e-3)
    swapped = PhotometricDistortionTransform(channel_order=(2, 0, 1)).apply_image(img)
    assert np.allclose(swapped, [[[50.0, 250.0, 100.0]]])
    with pytest.raises(ValueError, match="YUV"):
        PhotometricDistortion(image_format="YUV-BT.601")


def test_photometric_sampling_matches_mmdet_probabilities():
    np.random.seed(0)
    img = np.zeros((4, 4, 3), np.float32)
    tfms = [PhotometricDistortion(image_format="RGB").get_transform(img) for _ in range(2000)]

    def rate(attr):
        return np.mean([getattr(t, attr) is not None for t in tfms])

    for attr in ("brightness_delta", "contrast_alpha", "saturation_scale", "hue_delta"):
        assert 0.45 < rate(attr) < 0.55, attr
    assert 0.45 < rate("channel_order") < 0.55
    assert 0.45 < np.mean([t.contrast_first for t in tfms]) < 0.55
    assert max(abs(t.brightness_delta) for t in tfms if t.brightness_delta is not None) <= 32
    assert max(abs(t.hue_delta) for t in tfms if t.hue_delta is not None) <= 18
    alphas = [t.contrast_alpha for t in tfms if t.contrast_alpha is not None]
    assert 0.5 <= min(alphas) and max(alphas) <= 1.5


def test_random_choice_picks_each_policy_about_half_the_time():
    np.random.seed(0)
    choice = RandomChoice([[T.RandomFlip(prob=1.0)], [T.RandomFlip(prob=0.0)]])
    flips = 0
    for _ in range(400):
        tfms = choice(T.AugInput(np.zeros((4, 6, 3), np.uint8)))
        flips += any(isinstance(t, T.HFlipTransform) for t in tfms.transforms)
    assert 160 < flips < 240


def _train_cfg():
    cfg = load_cfg("Base-PETR.yaml")  # the recipe's INPUT keys
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [0.0, 0.0, 0.0]
    cfg.INPUT.PETR.PHOTOMETRIC = False
    return cfg


def test_full_training_pipeline_moves_a_joint_with_its_pixel():
    augs = T.AugmentationList(build_petr_augmentation(_train_cfg(), is_train=True))
    kinds = set()
    for seed in range(12):
        np.random.seed(seed)
        point = np.array([[70.5, 50.5]])
        aug_input = T.AugInput(_blob_image(120, 160, point[0], sigma=3.0))
        tfms = augs(aug_input)
        kinds |= {type(t).__name__ for t in tfms.transforms}
        moved = tfms.apply_coords(point)[0]
        h, w = aug_input.image.shape[:2]
        assert 400 <= min(h, w) and max(h, w) <= 1400
        if 0 <= moved[0] <= w and 0 <= moved[1] <= h and aug_input.image.max() > 100:
            assert np.abs(_blob_centre(aug_input.image) - moved).max() < 0.25, seed
    # Both resize/crop policies, the flip and the rotation were exercised.
    assert {"CropTransform", "HFlipTransform", "AffineWarpTransform"} <= kinds


def test_crop_policy_sizes_and_test_resize():
    cfg = _train_cfg()
    augs = build_petr_augmentation(cfg, is_train=True)
    policies = augs[-1].policies
    np.random.seed(0)
    for _ in range(50):
        aug_input = T.AugInput(np.zeros((480, 640, 3), np.float32))
        first, crop, _ = policies[1](aug_input).transforms
        assert min(first.new_h, first.new_w) in (400, 500, 600)
        assert 384 <= crop.h <= 600 and 384 <= crop.w <= 600
    test_input = PETRPreprocessor(cfg)(np.zeros((480, 640, 3), np.uint8))["image"]
    assert test_input.shape == (3, 800, 1067) and test_input.dtype == torch.uint8
    with pytest.raises(ValueError, match="PETRPreprocessor"):
        build_petr_augmentation(cfg, is_train=False)
