"""Checks of a TEST dataset's ground truth before inference runs (`preflight_ground_truth`).

Without them, a json with no annotations ends the evaluation in a bare StopIteration from
Detectron2's COCOEvaluator, and one malformed keypoint list in a broadcast error from
pycocotools, both after the whole inference. Here:
- no annotation, or another number of keypoints than the dataset's metadata (the json's
  categories, or every annotation's list): an error naming the dataset and the json;
- an image file whose size differs from the json: an error naming the files (the mapper would
  stop at it during inference);
- malformed annotations (petr.data.annotation_checks: keypoints other than 3K finite numbers,
  visibilities other than 0/1/2, a bbox that is not 4 finite numbers) are removed from the
  ground truth the evaluator scores against, counted and named in the log, as training drops
  them; more than DATALOADER.PETR.MAX_BAD_ANNOTATION_SHARE of them is an error. Invalid boxes
  stay: COCO's evaluation has its own rules for them.
"""

import json
import logging
import os

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict
from detectron2.utils.file_io import PathManager

from ..data.annotation_checks import (
    DROPPED_REASONS,
    AnnotationReport,
    check_annotations,
    check_image_sizes,
)

__all__ = ["preflight_ground_truth"]

logger = logging.getLogger(__name__)
_DROPPED_FOR_EVALUATION = DROPPED_REASONS - {1}  # category ids are the json's own here


def _load(dataset_name, meta):
    json_file = meta.get("json_file", None)
    if not json_file:
        return convert_to_coco_dict(dataset_name), dataset_name
    with PathManager.open(json_file) as f:
        return json.load(f), json_file


def preflight_ground_truth(
    dataset_name: str, num_keypoints: int, max_share: float = 0.01, check_sizes: bool = True
):
    """Check the ground truth of `dataset_name` (module docstring). Returns None when the
    evaluator may read it as it is, else the COCO-format dict without the malformed
    annotations, for the evaluator to score against."""
    meta = MetadataCatalog.get(dataset_name)
    data, source = _load(dataset_name, meta)
    where = f"TEST dataset {dataset_name!r} ({source})"
    annos = data.get("annotations") or []
    if not annos:
        raise ValueError(
            f"{where} has no annotations: there is no ground truth to evaluate against (set "
            "DATASETS.TEST to a dataset with keypoint annotations, or () to skip evaluation)"
        )
    for cat in data.get("categories", []):
        names = cat.get("keypoints")
        if names is not None and len(names) != num_keypoints:
            raise ValueError(
                f"{where}: category {cat.get('name')!r} has {len(names)} keypoints, the "
                f"dataset's metadata {num_keypoints}: evaluate on a json with the model's joints"
            )
    lengths = {len(a.get("keypoints") or ()) for a in annos} - {0}
    if len(lengths) == 1 and lengths != {3 * num_keypoints}:
        (n,) = lengths
        raise ValueError(
            f"{where}: every annotation has {n} keypoint values ({n / 3:g} keypoints), the "
            f"dataset's metadata {num_keypoints} ({3 * num_keypoints} values)"
        )
    images = {img.get("id"): img for img in data.get("images", [])}
    if check_sizes:
        _check_image_sizes(where, images.values(), meta.get("image_root", None))

    def image_of(a):
        return images.get(a.get("image_id"), {})

    wh = [(image_of(a).get("width", np.inf), image_of(a).get("height", np.inf)) for a in annos]
    codes = check_annotations(annos, wh, num_keypoints)
    report = AnnotationReport(dataset_name, source)
    report.add_codes(
        codes,
        lambda i: f"{image_of(annos[i]).get('file_name', '?')}#{annos[i].get('id', '?')}",
        _DROPPED_FOR_EVALUATION,
    )
    report.check_share(max_share)
    drop = np.isin(codes, list(_DROPPED_FOR_EVALUATION))
    if not drop.any():
        return None
    logger.warning(
        f"{where}: the evaluator scores against the json without {int(drop.sum())} malformed "
        f"annotations:\n{report.table()}"
    )
    return {**data, "annotations": [a for a, d in zip(annos, drop) if not d]}


def _check_image_sizes(where, images, image_root):
    records = [
        {**img, "file_name": os.path.join(image_root or "", img.get("file_name", ""))}
        for img in images
    ]
    wrong = check_image_sizes([r for r in records if "width" in r and "height" in r])
    if wrong:
        listed = "; ".join(
            f"{r['file_name']} (file {w}x{h}, json {r['width']}x{r['height']})"
            for r, (w, h) in wrong[:5]
        )
        raise ValueError(
            f"{where}: {len(wrong)} image files have another size than the json: {listed}"
        )
