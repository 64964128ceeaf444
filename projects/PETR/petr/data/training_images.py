"""Which images PETR trains on: the official rule (hikvision-research/opera, through mmdet 2.x
`CocoDataset._filter_imgs` with `filter_empty_gt=True`, `min_size=32`).

An image is kept when
- at least one annotation of the person category refers to it; any annotation counts: crowd,
  0-keypoint and invalid-box (zero area, outside the image) persons included, because mmdet
  looks only at which image ids the category's annotations name; and
- min(width, height) >= min_size, with width and height as the json's image entry gives them.

Kept images whose persons are all crowd, keypoint-less or invalid train as negatives: the dataset
mapper's instance filter (spec 3.1, `PETRDatasetMapper._load_targets`) drops those annotations.
Annotations of other categories are dropped here, as mmdet's instance filter drops them.

Before the rule, each dataset goes through Detectron2's `get_detection_dataset_dicts` (unknown
names, thing_classes consistency, the class histogram) and PETR's load-time checks
(petr.data.annotation_checks: malformed annotations dropped, invalid boxes counted, images whose
file size differs from the json dropped; the whole is refused above
DATALOADER.PETR.MAX_BAD_ANNOTATION_SHARE).
"""

import logging

from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.data.detection_utils import check_metadata_consistency

from .annotation_checks import check_dataset, drop_size_mismatches, set_training_reports
from .metadata import keypoint_spec

__all__ = ["IMAGE_FILTERS", "filter_training_images", "petr_train_dataset_dicts"]

IMAGE_FILTERS = ("official", "none")
logger = logging.getLogger(__name__)


def _person_class(metadata):
    """Contiguous id of the person class, or None when every annotation is a person (a
    keypoint dataset whose classes do not include "person")."""
    classes = list(metadata.get("thing_classes", None) or [])
    return classes.index("person") if "person" in classes else None


def _has_person_with_keypoints(record):
    for anno in record["annotations"]:
        num = anno.get("num_keypoints")
        if num is None:
            num = sum(v > 0 for v in anno.get("keypoints", [])[2::3])
        if not anno.get("iscrowd", 0) and num > 0:
            return True
    return False


def filter_training_images(dataset_dicts, dataset_name, min_size=32):
    """The official training-image rule (module docstring) on Detectron2 dataset dicts of
    `dataset_name`. Returns the kept dicts (copies whose "annotations" hold only persons), in
    their order, and logs how many each part of the rule removed."""
    person = _person_class(MetadataCatalog.get(dataset_name))
    kept, no_person, small = [], 0, 0
    for record in dataset_dicts:
        annos = record.get("annotations", [])
        if person is not None:
            annos = [a for a in annos if a.get("category_id") == person]
        if not annos:
            no_person += 1
        elif min(record["width"], record["height"]) < min_size:
            small += 1
        else:
            kept.append({**record, "annotations": annos})
    negatives = sum(not _has_person_with_keypoints(r) for r in kept)
    logger.info(
        f"Training images of {dataset_name!r} (official rule): kept {len(kept)} of "
        f"{len(dataset_dicts)}; removed {no_person} without a person annotation and {small} "
        f"with a side < {min_size} px; {negatives} kept images have no non-crowd person with "
        "keypoints and train as negatives"
    )
    return kept


def petr_train_dataset_dicts(cfg):
    """The dataset dicts of cfg.DATASETS.TRAIN after the load-time checks (module docstring),
    DATALOADER.PETR.IMAGE_FILTER ("official": `filter_training_images`; "none": every image)
    and, when set, Detectron2's DATALOADER.FILTER_EMPTY_ANNOTATIONS (drop images without a
    non-crowd annotation)."""
    rule = cfg.DATALOADER.PETR.IMAGE_FILTER
    if rule not in IMAGE_FILTERS:
        raise ValueError(f"DATALOADER.PETR.IMAGE_FILTER must be one of {IMAGE_FILTERS}: {rule!r}")
    names = [cfg.DATASETS.TRAIN] if isinstance(cfg.DATASETS.TRAIN, str) else cfg.DATASETS.TRAIN
    if not names:
        raise ValueError("DATASETS.TRAIN is empty")
    num_k = keypoint_spec(names, default_num_keypoints=cfg.MODEL.PETR.NUM_KEYPOINTS).num_keypoints
    try:
        check_metadata_consistency("thing_classes", names)
    except AttributeError:  # datasets without class names, as get_detection_dataset_dicts
        pass
    dicts, reports = [], []
    for name in names:
        records = get_detection_dataset_dicts(name, filter_empty=False)
        records, report = check_dataset(records, name, num_k, MetadataCatalog.get(name))
        if rule == "official":
            records = filter_training_images(records, name, cfg.DATALOADER.PETR.MIN_IMAGE_SIZE)
        if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            records = filter_images_with_only_crowd_annotations(records)
        if cfg.DATALOADER.PETR.CHECK_IMAGE_SIZES:
            records = drop_size_mismatches(records, report)
        report.log()
        report.check_share(cfg.DATALOADER.PETR.MAX_BAD_ANNOTATION_SHARE)
        reports.append(report)
        if not records:
            raise ValueError(f"Dataset {name!r} has no training image left after the filters")
        dicts += records
    set_training_reports(reports)
    return dicts
