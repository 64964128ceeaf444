"""Augmentations of the official PETR pipeline (hikvision-research/opera, mmdet 2.25 semantics).

Each step is a Detectron2 `Augmentation` (samples the randomness) returning an fvcore `Transform`
(deterministic). Coordinates are pixels in Detectron2's continuous convention: pixel index i
covers [i, i + 1), so a horizontal flip is x' = W - x and a resize scales coordinates exactly by
new / old size. Keypoint bookkeeping (invisible joints, dropped people, areas) lives in
`dataset_mapper.py`; these classes only move pixels and points.
"""

import math

import cv2
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import Transform

__all__ = [
    "AffineWarpTransform",
    "CV2ResizeTransform",
    "PhotometricDistortion",
    "PhotometricDistortionTransform",
    "RandomAffine",
    "RandomChoice",
    "RescaleShortEdge",
    "build_petr_augmentation",
    "rescale_size",
]

_TO_HSV = {
    "BGR": (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR),
    "RGB": (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB),
}


class PhotometricDistortionTransform(Transform):
    """mmdet `PhotoMetricDistortion` with fixed parameters; `None` skips a step.

    Works on float32 (H, W, 3) images in `image_format` ("BGR" or "RGB") and never clips, so
    values may leave [0, 255] as in the official code. Points and boxes are unchanged.
    """

    def __init__(
        self,
        brightness_delta=None,
        contrast_alpha=None,
        contrast_first=False,
        saturation_scale=None,
        hue_delta=None,
        channel_order=None,
        image_format="BGR",
    ):
        super().__init__()
        if image_format not in _TO_HSV:
            raise ValueError(
                f"PhotometricDistortion needs a BGR or RGB image, got {image_format!r}"
            )
        self._set_attributes(locals())

    def apply_image(self, img):
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"PhotometricDistortion needs an (H, W, 3) image, got {img.shape}")
        img = img.astype(np.float32, copy=True)
        if self.brightness_delta is not None:
            img += self.brightness_delta
        if self.contrast_first and self.contrast_alpha is not None:
            img *= self.contrast_alpha
        if self.saturation_scale is not None or self.hue_delta is not None:
            to_hsv, from_hsv = _TO_HSV[self.image_format]
            img = cv2.cvtColor(img, to_hsv)  # float32: H in [0, 360), S in [0, 1]
            if self.saturation_scale is not None:
                img[..., 1] *= self.saturation_scale
            if self.hue_delta is not None:
                hue = img[..., 0]
                hue += self.hue_delta
                hue[hue > 360] -= 360
                hue[hue < 0] += 360
            img = cv2.cvtColor(img, from_hsv)
        if not self.contrast_first and self.contrast_alpha is not None:
            img *= self.contrast_alpha
        if self.channel_order is not None:
            img = np.ascontiguousarray(img[..., list(self.channel_order)])
        return img

    def apply_coords(self, coords):
        return coords


class PhotometricDistortion(T.Augmentation):
    """Samples `PhotometricDistortionTransform` like mmdet 2.25: every step has p = 0.5, a coin
    puts the contrast step first or last, and the channels are permuted with p = 0.5."""

    def __init__(
        self,
        brightness_delta=32.0,
        contrast_range=(0.5, 1.5),
        saturation_range=(0.5, 1.5),
        hue_delta=18.0,
        image_format="BGR",
    ):
        super().__init__()
        if image_format not in _TO_HSV:
            raise ValueError(
                f"PhotometricDistortion needs a BGR or RGB image, got {image_format!r}"
            )
        self._init(locals())

    def get_transform(self, image):
        # The draw order follows mmdet so that the same numpy seed samples the same distortion.
        rand = np.random
        brightness = contrast = saturation = hue = order = None
        if rand.randint(2):
            brightness = rand.uniform(-self.brightness_delta, self.brightness_delta)
        contrast_first = rand.randint(2) == 1
        if contrast_first and rand.randint(2):
            contrast = rand.uniform(*self.contrast_range)
        if rand.randint(2):
            saturation = rand.uniform(*self.saturation_range)
        if rand.randint(2):
            hue = rand.uniform(-self.hue_delta, self.hue_delta)
        if not contrast_first and rand.randint(2):
            contrast = rand.uniform(*self.contrast_range)
        if rand.randint(2):
            order = tuple(int(i) for i in rand.permutation(3))
        return PhotometricDistortionTransform(
            brightness, contrast, contrast_first, saturation, hue, order, self.image_format
        )


class AffineWarpTransform(Transform):
    """Warps an image by a 3x3 matrix acting on continuous pixel coordinates (x, y, 1).

    The output keeps the input size (h, w). Images use `cv2.warpPerspective` with bilinear
    interpolation and a constant `border_value` (one value per channel, in the image's channel
    order). Boxes become the axis-aligned box of their warped corners (not clipped here).
    """

    def __init__(self, matrix, h, w, border_value=0.0):
        super().__init__()
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.shape != (3, 3):
            raise ValueError(f"AffineWarpTransform needs a (3, 3) matrix, got {matrix.shape}")
        self._set_attributes(locals())

    def apply_image(self, img):
        # cv2 works on pixel indices (index = continuous - 0.5): conjugate by that shift.
        shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
        matrix = np.linalg.inv(shift) @ self.matrix @ shift
        border = self.border_value
        border = tuple(float(b) for b in border) if np.ndim(border) else float(border)
        out = cv2.warpPerspective(
            img, matrix, (self.w, self.h), flags=cv2.INTER_LINEAR, borderValue=border
        )
        return out[..., None] if img.ndim == 3 and out.ndim == 2 else out

    def apply_coords(self, coords):
        """coords: (N, 2) continuous pixel xy."""
        homogeneous = np.concatenate([coords, np.ones((len(coords), 1))], axis=1)
        warped = homogeneous @ self.matrix.T
        return (warped[:, :2] / warped[:, 2:3]).astype(coords.dtype, copy=False)


class RandomAffine(T.Augmentation):
    """opera `KeypointRandomAffine`: a rotation by U(-max_rotate_degree, max_rotate_degree)
    about the image centre, optionally with x/y shear by U(-max_shear_degree, max_shear_degree);
    no translation or scaling. M = T(c) . Shear . R . T(-c), c = (W/2, H/2)."""

    def __init__(self, max_rotate_degree=30.0, max_shear_degree=0.0, border_value=0.0):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        theta = math.radians(np.random.uniform(-self.max_rotate_degree, self.max_rotate_degree))
        shear_x = math.radians(np.random.uniform(-self.max_shear_degree, self.max_shear_degree))
        shear_y = math.radians(np.random.uniform(-self.max_shear_degree, self.max_shear_degree))
        cos, sin = math.cos(theta), math.sin(theta)
        rotation = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
        shear = np.array([[1.0, math.tan(shear_x), 0.0], [math.tan(shear_y), 1.0, 0.0], [0, 0, 1]])
        to_centre = np.array([[1.0, 0.0, w / 2], [0.0, 1.0, h / 2], [0.0, 0.0, 1.0]])
        from_centre = np.array([[1.0, 0.0, -w / 2], [0.0, 1.0, -h / 2], [0.0, 0.0, 1.0]])
        matrix = to_centre @ shear @ rotation @ from_centre
        return AffineWarpTransform(matrix, h, w, self.border_value)


class CV2ResizeTransform(Transform):
    """Resize (h, w) -> (new_h, new_w) with OpenCV bilinear interpolation (mmcv `imresize`).

    Unlike Detectron2's PIL-based `ResizeTransform`, float images keep values outside
    [0, 255]. Continuous coordinates scale by (new_w / w, new_h / h).
    """

    def __init__(self, h, w, new_h, new_w):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        if img.shape[:2] != (self.h, self.w):
            raise ValueError(
                f"CV2ResizeTransform expects a {(self.h, self.w)} image, got {img.shape}"
            )
        out = cv2.resize(img, (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR)
        return out[..., None] if img.ndim == 3 and out.ndim == 2 else out

    def apply_coords(self, coords):
        """coords: (N, 2) continuous pixel xy."""
        coords = np.array(coords, copy=True)
        coords[:, 0] *= self.new_w / self.w
        coords[:, 1] *= self.new_h / self.h
        return coords

    def inverse(self):
        return CV2ResizeTransform(self.new_h, self.new_w, self.h, self.w)


def rescale_size(h, w, short_edge, max_size):
    """mmcv `imrescale` output size (new_h, new_w): the largest factor that keeps the short side
    <= short_edge and the long side <= max_size, rounded as int(x * factor + 0.5)."""
    factor = min(max_size / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


class RescaleShortEdge(T.Augmentation):
    """Keep-ratio resize to a sampled short side, long side capped (mmdet `Resize`).

    `sample_style="range"`: the short side is a uniform integer in [short_edge_length[0],
    short_edge_length[1]] inclusive; "choice": one of `short_edge_length`.
    """

    def __init__(self, short_edge_length, max_size, sample_style="range"):
        super().__init__()
        if sample_style not in ("range", "choice"):
            raise ValueError(f"sample_style must be 'range' or 'choice', got {sample_style!r}")
        if isinstance(short_edge_length, int):
            short_edge_length = (short_edge_length, short_edge_length)
        short_edge_length = tuple(int(s) for s in short_edge_length)
        if sample_style == "range" and len(short_edge_length) != 2:
            raise ValueError(f"'range' needs (min, max) short edges, got {short_edge_length}")
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        if self.sample_style == "range":
            short = np.random.randint(self.short_edge_length[0], self.short_edge_length[1] + 1)
        else:
            short = self.short_edge_length[np.random.randint(len(self.short_edge_length))]
        new_h, new_w = rescale_size(h, w, short, self.max_size)
        return CV2ResizeTransform(h, w, new_h, new_w)


class RandomChoice(T.Augmentation):
    """mmdet `AutoAugment`: apply one of `policies` (each a list of augmentations), chosen
    uniformly. Returns the chosen policy's `TransformList`."""

    def __init__(self, policies):
        super().__init__()
        if not policies:
            raise ValueError("RandomChoice needs at least one policy")
        self.policies = [T.AugmentationList(list(p)) for p in policies]

    def __call__(self, aug_input):
        return self.policies[np.random.randint(len(self.policies))](aug_input)

    def __repr__(self):
        return f"RandomChoice(policies={self.policies})"


def build_petr_augmentation(cfg, is_train=True):
    """The official training augmentation list: photometric distortion, affine, flip, then the
    two resize/crop policies. Test images go through the front door instead
    (`petr.data.preprocess.PETRPreprocessor`), the one resize every inference route shares."""
    if not is_train:
        raise ValueError(
            "build_petr_augmentation is for training; test images go through "
            "petr.data.preprocess.PETRPreprocessor"
        )
    p = cfg.INPUT.PETR
    augs = []
    if p.PHOTOMETRIC:
        augs.append(PhotometricDistortion(image_format=cfg.INPUT.FORMAT))
    if p.ROTATION_DEGREES > 0 or p.SHEAR_DEGREES > 0:
        # The border is the mean pixel, which normalises to 0 (MODEL.PIXEL_MEAN is in FORMAT order).
        augs.append(RandomAffine(p.ROTATION_DEGREES, p.SHEAR_DEGREES, list(cfg.MODEL.PIXEL_MEAN)))
    if p.FLIP_PROB > 0:
        augs.append(T.RandomFlip(prob=p.FLIP_PROB, horizontal=True, vertical=False))
    resize = RescaleShortEdge(
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    )
    if not cfg.INPUT.CROP.ENABLED:
        return augs + [resize]
    if cfg.INPUT.CROP.TYPE != "absolute_range":
        raise ValueError(
            f"PETR supports INPUT.CROP.TYPE 'absolute_range', got {cfg.INPUT.CROP.TYPE!r}"
        )
    crop_policy = [
        RescaleShortEdge(p.CROP_MIN_SIZE_TRAIN, p.CROP_MAX_SIZE_TRAIN, "choice"),
        T.RandomCrop("absolute_range", tuple(cfg.INPUT.CROP.SIZE)),
        resize,
    ]
    return augs + [RandomChoice([[resize], crop_policy])]
