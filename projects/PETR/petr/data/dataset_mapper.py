"""Dataset mapper for PETR: Detectron2 dataset dicts -> model inputs.

Follows the official training pipeline (hikvision-research/opera, `configs/_base_/datasets/
coco_keypoint.py`) step by step, including its keypoint bookkeeping. Keypoints are (x, y, v) in
pixels, Detectron2's continuous convention (`load_coco_json` adds 0.5 to COCO's pixel indices).
"""

import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances, Keypoints
from detectron2.utils.logger import log_first_n

from .bad_images import BAD_IMAGES_KEY, UNREADABLE_KEY
from .image_io import read_image
from .metadata import keypoint_spec
from .preprocess import PETRPreprocessor
from .transforms import (
    AffineWarpTransform,
    CV2ResizeTransform,
    PhotometricDistortionTransform,
    build_petr_augmentation,
)

__all__ = ["PETRDatasetMapper", "transform_pose_targets"]

_NO_TARGET_CHANGE = (PhotometricDistortionTransform, T.NoOpTransform)
# Consecutive failed reads in one worker after which the images are not bad files but a wrong
# path (e.g. image_root): stop instead of redrawing forever.
MAX_CONSECUTIVE_BAD_READS = 50


def _clip_boxes(boxes, h, w):
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    return boxes


def _invalidate_outside(keypoints, h, w):
    """Joints outside [0, w] x [0, h] or with v < 0.1 become (0, 0, 0). keypoints: (N, K, 3)."""
    x, y, v = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]
    invalid = (x < 0) | (y < 0) | (x > w) | (y > h) | (v < 0.1)
    keypoints[invalid] = 0.0
    return keypoints


def transform_pose_targets(targets, tfm, image_hw, keypoint_hflip_indices=None):
    """Apply one transform to the pose targets with the official per-step rules.

    Args:
        targets: dict with "boxes" (N, 4) xyxy, "keypoints" (N, K, 3) (x, y, v), "areas" (N,),
            float64 numpy arrays in pixels of the image *before* `tfm`.
        tfm: one fvcore `Transform` of the PETR pipeline.
        image_hw: (h, w) of the image before `tfm`.
        keypoint_hflip_indices: (K,) flipped index of each joint; needed for a flip.
    Returns:
        (targets, (h, w) after `tfm`), or None when the official code would resample the image:
        the affine warp or the crop removed every person.
    """
    h, w = image_hw
    if isinstance(tfm, _NO_TARGET_CHANGE):
        return targets, (h, w)
    boxes, areas = targets["boxes"], targets["areas"]
    kpts = targets["keypoints"].copy()  # edited in place below
    if isinstance(tfm, T.HFlipTransform):
        boxes = tfm.apply_box(boxes)
        visible = kpts[..., 2] > 0  # invisible (0, 0, 0) joints are only swapped
        kpts[..., 0] = np.where(visible, w - kpts[..., 0], kpts[..., 0])
        if kpts.shape[1]:
            if keypoint_hflip_indices is None:
                raise ValueError("A horizontal flip needs keypoint_hflip_indices (the flip map)")
            kpts = kpts[:, keypoint_hflip_indices]
        kpts[..., 0] = kpts[..., 0].clip(0, w)
    elif isinstance(tfm, CV2ResizeTransform):
        h, w = tfm.new_h, tfm.new_w
        scale_x, scale_y = tfm.new_w / tfm.w, tfm.new_h / tfm.h
        boxes = _clip_boxes(boxes * [scale_x, scale_y, scale_x, scale_y], h, w)
        kpts[..., 0] = (kpts[..., 0] * scale_x).clip(0, w)
        kpts[..., 1] = (kpts[..., 1] * scale_y).clip(0, h)
        areas = areas * (scale_x * scale_y)
    elif isinstance(tfm, AffineWarpTransform):
        # Areas are not rotated, as in the official code.
        boxes = _clip_boxes(tfm.apply_box(boxes), h, w)
        kpts[..., :2] = tfm.apply_coords(kpts[..., :2].reshape(-1, 2)).reshape(
            kpts.shape[:2] + (2,)
        )
        kpts = _invalidate_outside(kpts, h, w)
        keep = (kpts[..., 2] > 0).any(axis=1)
        if len(keep) and not keep.any():
            return None
        boxes, kpts, areas = boxes[keep], kpts[keep], areas[keep]
    elif isinstance(tfm, T.CropTransform):
        h, w = tfm.h, tfm.w
        boxes = _clip_boxes(boxes - [tfm.x0, tfm.y0, tfm.x0, tfm.y0], h, w)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, kpts, areas = boxes[keep], kpts[keep], areas[keep]
        # A crop that overlaps no box is a negative sample (mmdet allow_negative_crop=True);
        # one whose boxes keep no joint is resampled.
        if len(kpts):
            kpts[..., :2] -= [tfm.x0, tfm.y0]
            kpts = _invalidate_outside(kpts, h, w)
            keep = (kpts[..., 2] > 0).any(axis=1)
            if not keep.any():
                return None
            boxes, kpts, areas = boxes[keep], kpts[keep], areas[keep]
    else:
        raise TypeError(f"transform_pose_targets has no rule for {type(tfm).__name__}")
    return {"boxes": boxes, "keypoints": kpts, "areas": areas}, (h, w)


class PETRDatasetMapper:
    """Maps a Detectron2 dataset dict to PETR's input.

    Training output: "image" float32 (3, H, W) tensor in INPUT.FORMAT channel order, unnormalised
    and unclipped (the photometric distortion leaves [0, 255]; the model normalises), and
    "instances" with `gt_keypoints` (Keypoints (G, K, 3), pixels of the augmented image),
    `gt_boxes` (Boxes xyxy, pixels), `gt_classes` (zeros) and `gt_areas` (float, pixels^2,
    the json "area" scaled by the resizes). Crowd and 0-keypoint people are skipped; an image
    without people is a negative sample. Returns None (Detectron2 then resamples another image)
    when the official code would: the affine warp or a crop removed every person.

    Test output: "image" uint8 (3, H, W) from the front door (`PETRPreprocessor`: short side
    MIN_SIZE_TEST, long side at most MAX_SIZE_TEST); annotations are dropped. "height"/"width"
    stay the original size.

    An image that cannot be read (missing, truncated, undecodable): in training the mapper
    returns None (another image is drawn) and attaches (file_name, reason) to the next sample it
    returns, under `bad_images.BAD_IMAGES_KEY`; in inference it returns the dict without "image"
    and with the reason under `bad_images.UNREADABLE_KEY` (see petr.data.bad_images).
    """

    @configurable
    def __init__(
        self,
        is_train,
        *,
        augmentations=(),
        image_format,
        num_keypoints=None,
        keypoint_hflip_indices=None,
        preprocessor: PETRPreprocessor | None = None,
    ):
        """Training: `augmentations` (the official pipeline) and `num_keypoints`. Test:
        `preprocessor`, the front door shared by every inference route."""
        if is_train and num_keypoints is None:
            raise ValueError("PETRDatasetMapper needs num_keypoints in training")
        if not is_train and preprocessor is None:
            raise ValueError("PETRDatasetMapper needs the front door (preprocessor) at test time")
        if keypoint_hflip_indices is not None and len(keypoint_hflip_indices) != num_keypoints:
            raise ValueError(
                f"keypoint_hflip_indices has {len(keypoint_hflip_indices)} entries for "
                f"{num_keypoints} keypoints"
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_keypoints = num_keypoints
        self.keypoint_hflip_indices = keypoint_hflip_indices
        self.preprocessor = preprocessor
        self._bad_reads = []  # failed reads not yet reported on a returned sample
        self._consecutive_bad = 0
        steps = self.augmentations if is_train else preprocessor
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(f"[PETRDatasetMapper] {mode}: {steps}")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        ret = {"is_train": is_train, "image_format": cfg.INPUT.FORMAT}
        if not is_train:
            ret["preprocessor"] = PETRPreprocessor(cfg)
        else:
            ret["augmentations"] = build_petr_augmentation(cfg, is_train)
            flip = cfg.INPUT.PETR.FLIP_PROB > 0
            spec = keypoint_spec(
                cfg.DATASETS.TRAIN,
                default_num_keypoints=cfg.MODEL.PETR.NUM_KEYPOINTS,
                flip_key="INPUT.PETR.FLIP_PROB" if flip else None,
            )
            ret["num_keypoints"] = spec.num_keypoints
            if flip:
                ret["keypoint_hflip_indices"] = list(spec.flip_indices)
        return ret

    def _read_image(self, dataset_dict):
        """The image, or None after recording why it cannot be read."""
        file_name = dataset_dict["file_name"]
        try:
            # PIL raises OSError (missing, truncated), ValueError or SyntaxError (undecodable)
            image = read_image(file_name, format=self.image_format)
        except (OSError, ValueError, SyntaxError) as e:
            return self._bad_read(file_name, f"{type(e).__name__}: {e}")
        utils.check_image_size(dataset_dict, image)  # a wrong json is an error, not a bad file
        self._consecutive_bad = 0
        return image

    def _bad_read(self, file_name, reason):
        self._bad_reads.append((file_name, reason))
        self._consecutive_bad += 1
        if self._consecutive_bad >= MAX_CONSECUTIVE_BAD_READS:
            raise OSError(
                f"The last {self._consecutive_bad} image reads all failed; first: "
                f"{self._bad_reads[0][0]} ({self._bad_reads[0][1]}). Check DATASETS and the "
                "dataset's image_root"
            )
        return None

    def _load_targets(self, dataset_dict, image_hw):
        """Parse and filter the annotations (spec 3.1) into float64 arrays (see
        `transform_pose_targets`)."""
        h, w = image_hw
        num_k = self.num_keypoints
        boxes, kpts, areas = [], [], []
        for i, anno in enumerate(dataset_dict.get("annotations", [])):
            raw = anno.get("keypoints")
            kp = np.asarray(raw if raw is not None else np.zeros(3 * num_k), dtype=np.float64)
            if kp.size != 3 * num_k:
                raise ValueError(
                    f"Annotation {anno.get('id', f'#{i}')} of {dataset_dict['file_name']!r} has "
                    f"{kp.size} keypoint values; the metadata has {num_k} keypoints "
                    f"({3 * num_k} values)"
                )
            kp = kp.reshape(num_k, 3)
            kp[kp[:, 2] <= 0] = 0.0  # load_coco_json moved unlabelled (0, 0) joints to (0.5, 0.5)
            num_visible = anno.get("num_keypoints", int((kp[:, 2] > 0).sum()))
            if anno.get("iscrowd", 0) or num_visible == 0:
                continue
            box = BoxMode.convert(list(anno["bbox"]), anno["bbox_mode"], BoxMode.XYXY_ABS)
            box = np.asarray(box, dtype=np.float64)
            bw, bh = box[2] - box[0], box[3] - box[1]
            inter_w = max(0.0, min(box[2], w) - max(box[0], 0.0))
            inter_h = max(0.0, min(box[3], h) - max(box[1], 0.0))
            if "area" in anno:
                area = float(anno["area"])
            else:
                log_first_n(logging.WARNING, "Annotations have no 'area'; using the box area", n=1)
                area = float(bw * bh)
            if inter_w * inter_h == 0 or area <= 0 or bw < 1 or bh < 1:
                continue
            boxes.append(box)
            kpts.append(kp)
            areas.append(area)
        return {
            "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            "keypoints": np.asarray(kpts, dtype=np.float64).reshape(-1, num_k, 3),
            "areas": np.asarray(areas, dtype=np.float64).reshape(-1),
        }

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read_image(dataset_dict)
        if image is None:
            if self.is_train:
                return None  # MapDataset draws another image
            dataset_dict.pop("annotations", None)
            dataset_dict[UNREADABLE_KEY] = self._bad_reads.pop()[1]
            return dataset_dict
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            # the front door, as every inference route (uint8, as the official test pipeline)
            dataset_dict["image"] = self.preprocessor(image)["image"]
            return dataset_dict
        targets = self._load_targets(dataset_dict, image.shape[:2])
        aug_input = T.AugInput(image.astype(np.float32))  # the official to_float32=True
        transforms = self.augmentations(aug_input)
        image_hw = image.shape[:2]
        for tfm in transforms.transforms:
            result = transform_pose_targets(targets, tfm, image_hw, self.keypoint_hflip_indices)
            if result is None:
                return None
            targets, image_hw = result
        image = aug_input.image
        assert image.shape[:2] == tuple(image_hw), (image.shape, image_hw)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict["instances"] = self._to_instances(targets, image_hw)
        if self._bad_reads:
            dataset_dict[BAD_IMAGES_KEY], self._bad_reads = self._bad_reads, []
        return dataset_dict

    @staticmethod
    def _to_instances(targets, image_hw):
        n = len(targets["boxes"])
        instances = Instances(tuple(image_hw))
        instances.gt_boxes = Boxes(torch.as_tensor(targets["boxes"], dtype=torch.float32))
        instances.gt_classes = torch.zeros(n, dtype=torch.int64)
        instances.gt_keypoints = Keypoints(
            torch.as_tensor(targets["keypoints"], dtype=torch.float32)
        )
        instances.gt_areas = torch.as_tensor(targets["areas"], dtype=torch.float32)
        return instances
