"""Dataset checks at load time, so that bad data stops a run before its first step, not when a
bad sample is first drawn hours in.

`check_annotations` looks at every annotation of a dataset once, in one vectorised pass (COCO
train2017's ~260k person annotations take about a second), and gives each one a reason code:
- malformed (the pipeline cannot use it, so it is dropped from its image): category_id outside
  thing_classes; keypoints other than 3K numbers (an empty list is "no keypoints" unless
  num_keypoints says otherwise); a non-finite keypoint; a visibility other than 0, 1, 2; a bbox
  that is not 4 finite numbers;
- an invalid box (w < 1, h < 1, no overlap with the json's image size, or area <= 0): the
  official instance filter (mmdet `_parse_ann_info`) drops these persons in the mapper, so they
  are kept here (the official image rule counts them) but counted, a person with visible
  keypoints under a reason of its own.
`check_image_sizes` compares the image files' sizes (headers only, after EXIF orientation, as
Detectron2's reader sees them) with the json's width and height.
An `AnnotationReport` counts and names the offenders (reason, count, first 5 file/annotation
ids) and refuses a dataset whose bad share exceeds DATALOADER.PETR.MAX_BAD_ANNOTATION_SHARE.
"""

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = [
    "DROPPED_REASONS",
    "REASONS",
    "AnnotationReport",
    "BadAnnotationError",
    "check_annotations",
    "check_dataset",
    "check_image_sizes",
    "drop_size_mismatches",
    "set_training_reports",
    "take_training_reports",
]

logger = logging.getLogger(__name__)

OK = 0
REASONS = {
    1: "category_id not in thing_classes",
    2: "keypoints: not 3K values",
    3: "keypoints: non-finite value",
    4: "keypoints: visibility not 0, 1 or 2",
    5: "bbox: not 4 finite numbers",
    6: "person with visible keypoints dropped for its invalid box",
    7: "invalid box (w or h < 1, outside the image, or area <= 0)",
}
DROPPED_REASONS = frozenset({1, 2, 3, 4, 5})  # dropped at load; 6, 7 by the mapper (official)
IMAGE_SIZE_REASON = "image file size differs from the json's width/height"


class BadAnnotationError(ValueError):
    """A dataset has more bad annotations than DATALOADER.PETR.MAX_BAD_ANNOTATION_SHARE."""


@dataclass
class AnnotationReport:
    """What the checks of one dataset found. `offenders[reason]` lists the first 5 offenders as
    "file_name#annotation_id" (images: the file name); `counts[reason]` counts all of them.
    `total`: annotations checked; `bad`: the malformed ones and those in refused images (what
    MAX_BAD_ANNOTATION_SHARE limits; invalid boxes, which the official instance filter drops, are
    counted and named but not bad)."""

    dataset: str
    source: str  # the json file, or the dataset name without one
    total: int = 0
    bad: int = 0
    counts: dict = field(default_factory=dict)
    offenders: dict = field(default_factory=dict)

    def add(self, reason: str, names, count: int, bad_annotations: int):
        """Count `count` offenders under `reason` (`names`: some of them, in order) and
        `bad_annotations` bad annotations."""
        self.counts[reason] = self.counts.get(reason, 0) + count
        shown = self.offenders.setdefault(reason, [])
        shown += list(names)[: 5 - len(shown)]
        self.bad += bad_annotations

    def add_codes(self, codes, name_of, bad_codes):
        """Count the reason codes of `check_annotations` (`name_of(i)`: the name of annotation
        i); those in `bad_codes` count as bad."""
        self.total += len(codes)
        for code in np.unique(codes[codes != OK]):
            where = np.flatnonzero(codes == code)
            bad = len(where) if int(code) in bad_codes else 0
            self.add(REASONS[int(code)], map(name_of, where[:5]), len(where), bad)

    @property
    def share(self) -> float:
        return self.bad / self.total if self.total else 0.0

    def table(self) -> str:
        rows = [f"{'reason':<62} {'count':>8}  first offenders (file#annotation id)"]
        for reason, count in self.counts.items():
            rows.append(f"{reason:<62} {count:>8}  {', '.join(self.offenders[reason])}")
        return "\n".join(rows)

    def log(self):
        if not self.counts:
            logger.info(f"Dataset {self.dataset!r}: all {self.total} annotations pass the checks")
            return
        logger.warning(
            f"Dataset {self.dataset!r} ({self.source}), {self.total} annotations: {self.bad} "
            f"({100 * self.share:.3g}%) are malformed or in an image of another size and are "
            "dropped now; invalid boxes are dropped by the official instance filter when their "
            f"image is drawn:\n{self.table()}"
        )

    def check_share(self, max_share: float):
        if not 0 <= max_share <= 1:
            raise ValueError(
                f"DATALOADER.PETR.MAX_BAD_ANNOTATION_SHARE must be in [0, 1]: {max_share}"
            )
        if self.share <= max_share:
            return
        first = "; ".join(f"{r}: {', '.join(self.offenders[r])}" for r in self.counts)
        raise BadAnnotationError(
            f"{self.source} (dataset {self.dataset!r}): {self.bad} of {self.total} annotations "
            f"({100 * self.share:.3g}%) are bad, more than DATALOADER.PETR."
            f"MAX_BAD_ANNOTATION_SHARE = {max_share:g}. First offenders: {first}"
        )


def _numbers(values, width):
    """values: list of lists -> ((N, width) float64 array, (N,) bool: row was numeric)."""
    try:
        return np.array(values, dtype=np.float64).reshape(-1, width), np.ones(len(values), bool)
    except (TypeError, ValueError):  # a None or a string somewhere: find the rows one by one
        out, ok = np.zeros((len(values), width)), np.ones(len(values), bool)
        for i, v in enumerate(values):
            try:
                out[i] = np.asarray(v, dtype=np.float64)
            except (TypeError, ValueError):
                ok[i] = False
        return out, ok


def check_annotations(annotations, image_wh, num_keypoints: int, num_classes=None):
    """Reason codes (keys of `REASONS`, 0 = fine) of `annotations`, dicts in Detectron2's
    format (or COCO json's: "bbox" XYWH when there is no "bbox_mode").

    image_wh: (N, 2) json width and height of each annotation's image. num_classes: the
    number of thing_classes (None: categories are not checked). Returns an (N,) int8 array.
    """
    n, k3 = len(annotations), 3 * num_keypoints
    codes = np.zeros(n, np.int8)
    if n == 0:
        return codes

    def flag(mask, code):
        codes[(codes == OK) & mask] = code

    get = [a.get for a in annotations]
    if num_classes is not None:
        cats = [g("category_id") for g in get]
        is_int = np.array([isinstance(c, (int, np.integer)) for c in cats])
        cat = np.array([c if ok else -1 for c, ok in zip(cats, is_int)], dtype=np.int64)
        flag(~is_int | (cat < 0) | (cat >= num_classes), 1)
    kpts = [g("keypoints") or () for g in get]
    lengths = np.fromiter(map(len, kpts), np.int64, n)
    stated = _floats([g("num_keypoints") for g in get])  # NaN: not given
    flag((lengths != k3) & ((lengths != 0) | (stated > 0)), 2)
    full = np.flatnonzero(lengths == k3)
    values, numeric = _numbers([kpts[i] for i in full], k3)
    finite = numeric & np.isfinite(values).all(axis=1)
    flag(_mask(n, full[~finite]), 3)
    vis = values[:, 2::3]
    flag(_mask(n, full[finite & ~np.isin(vis, (0, 1, 2)).all(axis=1)]), 4)

    boxes, box_ok = _numbers([_box4(g("bbox")) for g in get], 4)
    box_ok &= np.isfinite(boxes).all(axis=1)
    flag(~box_ok, 5)
    modes = [g("bbox_mode", BoxMode.XYWH_ABS) for g in get]
    xyxy = boxes.copy()
    for mode in set(modes):
        rows = np.array([m == mode for m in modes])
        xyxy[rows] = BoxMode.convert(boxes[rows], mode, BoxMode.XYXY_ABS)
    w, h = np.asarray(image_wh, dtype=np.float64).reshape(n, 2).T
    inter_w = np.minimum(xyxy[:, 2], w) - np.maximum(xyxy[:, 0], 0)
    inter_h = np.minimum(xyxy[:, 3], h) - np.maximum(xyxy[:, 1], 0)
    box_area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    area = _floats([g("area") for g in get])
    area = np.where(np.isnan(area), box_area, area)  # as the mapper: no "area" -> the box area
    invalid = (
        (inter_w <= 0) | (inter_h <= 0) | ~(area > 0)
        | (xyxy[:, 2] - xyxy[:, 0] < 1) | (xyxy[:, 3] - xyxy[:, 1] < 1)
    )  # fmt: skip
    # The mapper's count of visible joints: num_keypoints when given, else the visibilities.
    visible = np.zeros(n, bool)
    visible[full[finite]] = (vis[finite] > 0).any(axis=1)
    visible = np.where(np.isnan(stated), visible, stated > 0)
    crowd = np.array([bool(g("iscrowd", 0)) for g in get])
    flag(invalid & visible & ~crowd, 6)
    flag(invalid, 7)
    return codes

    def flag(mask, code):
        codes[(codes == OK) & mask] = code

    get = [a.get for a in annotations]
    if num_classes is not None:
        cats = np.array([g("category_id", -1) for g in get], dtype=object)
        is_int = np.array([isinstance(c, (int, np.integer)) for c in cats])
        cat = np.where(is_int, cats, -1).astype(np.int64)
        flag(~is_int | (cat < 0) | (cat >= num_classes), 1)
    kpts = [g("keypoints") or () for g in get]
    lengths = np.fromiter(map(len, kpts), np.int64, n)
    stated = np.array([g("num_keypoints", 0) or 0 for g in get], dtype=np.float64)
    flag((lengths != k3) & ((lengths != 0) | (stated > 0)), 2)
    full = np.flatnonzero(lengths == k3)
    values, numeric = _numbers([kpts[i] for i in full], k3)
    finite = numeric & np.isfinite(values).all(axis=1)
    flag(np.isin(np.arange(n), full[~finite]), 3)
    vis = values[:, 2::3]
    bad_vis = finite & ~np.isin(vis, (0, 1, 2)).all(axis=1)
    flag(np.isin(np.arange(n), full[bad_vis]), 4)

    boxes, box_ok = _numbers([_box4(g("bbox")) for g in get], 4)
    box_ok &= np.isfinite(boxes).all(axis=1)
    flag(~box_ok, 5)
    modes = [g("bbox_mode", BoxMode.XYWH_ABS) for g in get]
    xyxy = boxes.copy()
    for mode in set(modes):
        rows = np.array([m == mode for m in modes])
        xyxy[rows] = BoxMode.convert(boxes[rows], mode, BoxMode.XYXY_ABS)
    w, h = np.asarray(image_wh, dtype=np.float64).reshape(n, 2).T
    inter_w = np.minimum(xyxy[:, 2], w) - np.maximum(xyxy[:, 0], 0)
    inter_h = np.minimum(xyxy[:, 3], h) - np.maximum(xyxy[:, 1], 0)
    box_area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    area = np.array([g("area", np.nan) for g in get], dtype=np.float64)
    area = np.where(np.isnan(area), box_area, area)  # as the mapper: no "area" -> the box area
    invalid = (
        (inter_w <= 0) | (inter_h <= 0) | (area <= 0)
        | (xyxy[:, 2] - xyxy[:, 0] < 1) | (xyxy[:, 3] - xyxy[:, 1] < 1)
    )  # fmt: skip
    visible = np.zeros(n, bool)
    visible[full[finite]] = (vis[finite] > 0).any(axis=1)
    crowd = np.array([bool(g("iscrowd", 0)) for g in get])
    flag(invalid & visible & ~crowd & (stated != 0), 6)
    flag(invalid, 7)
    return codes


def _mask(n, indices):
    mask = np.zeros(n, bool)
    mask[indices] = True
    return mask


def _floats(values):
    """(N,) float64; None, missing or non-numbers become NaN."""
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
            out[i] = v
    return out


def _box4(box):
    ok = isinstance(box, (list, tuple, np.ndarray)) and len(box) == 4
    return box if ok else (None,) * 4


def annotation_name(record, anno):
    return f"{os.path.basename(str(record.get('file_name', record.get('image_id'))))}#" + str(
        anno.get("id", "?")
    )


def _image_wh(path):
    """(w, h) of an image file as Detectron2's reader returns it (EXIF orientations 5-8 swap
    the sides), from its header; None when it cannot be read (left to the readers' handling)."""
    try:
        with PathManager.open(path, "rb") as f, Image.open(f) as image:
            w, h = image.size
            try:
                orientation = image.getexif().get(0x0112)
            except Exception:  # as Detectron2: a broken EXIF block means no orientation
                orientation = None
    except (OSError, ValueError, SyntaxError):
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def check_image_sizes(records, num_threads: int = 8):
    """Records (dicts with "file_name", "width", "height") whose image file has another size;
    unreadable files are not reported here (bad_images handles them)."""
    with ThreadPoolExecutor(num_threads) as pool:
        sizes = list(pool.map(_image_wh, [r["file_name"] for r in records]))
    return [
        (r, s)
        for r, s in zip(records, sizes)
        if s is not None and s != (r.get("width", s[0]), r.get("height", s[1]))
    ]


def check_dataset(records, dataset_name: str, num_keypoints: int, metadata):
    """Check the annotations of Detectron2 dataset dicts (`check_annotations`) and drop the
    malformed ones. Returns (records with the malformed annotations removed, its report).
    Annotations of another thing class than "person" (when there is one) are checked only
    for their category id."""
    classes = list(metadata.get("thing_classes", None) or [])
    person = classes.index("person") if "person" in classes else None
    flat = [(r, a) for r in records for a in r.get("annotations", ())]
    annos = [a for _, a in flat]
    codes = check_annotations(
        annos,
        [(r.get("width", np.inf), r.get("height", np.inf)) for r, _ in flat],
        num_keypoints,
        num_classes=len(classes) or None,
    )
    if person is not None:
        others = np.array([a.get("category_id") != person for a in annos], bool)
        codes[others & (codes > 1)] = OK
    report = AnnotationReport(dataset_name, metadata.get("json_file", None) or dataset_name)
    report.add_codes(codes, lambda i: annotation_name(*flat[i]), DROPPED_REASONS)
    if not np.isin(codes, list(DROPPED_REASONS)).any():
        return records, report
    drop = {id(flat[i][1]) for i in np.flatnonzero(np.isin(codes, list(DROPPED_REASONS)))}
    records = [
        {**r, "annotations": [a for a in r["annotations"] if id(a) not in drop]}
        if any(id(a) in drop for a in r.get("annotations", ()))
        else r
        for r in records
    ]
    return records, report


def drop_size_mismatches(records, report: AnnotationReport):
    """`records` without those whose image file has another size than the json says (counted
    in `report`: the image, and its annotations as bad)."""
    wrong = check_image_sizes(records)
    if not wrong:
        return records
    names = [f"{r['file_name']} (file {s[0]}x{s[1]}, json {r['width']}x{r['height']})"
             for r, s in wrong]  # fmt: skip
    num_annos = sum(len(r.get("annotations", ())) for r, _ in wrong)
    report.add(IMAGE_SIZE_REASON, names, len(wrong), num_annos)
    ids = {id(r) for r, _ in wrong}
    return [r for r in records if id(r) not in ids]


# The reports of the latest training set built in this process (petr_train_dataset_dicts),
# until the training loader's BadImageMonitor takes them into the event storage.
_pending_training_reports = []


def set_training_reports(reports):
    _pending_training_reports[:] = list(reports)


def take_training_reports():
    reports = list(_pending_training_reports)
    _pending_training_reports.clear()
    return reports
