"""Toy keypoint dataset `petr_toy_train` / `petr_toy_val`: procedurally drawn stick figures.

Small enough to train PETR on a laptop CPU, yet with COCO's 17 joints, flip map and OKS sigmas,
varied pose, scale, count (0-4 people, some images empty), occlusion and clutter; see
`toy_render.py` for how images are drawn.

Images (JPEG) and COCO json are generated deterministically on first use into
`$PETR_TOY_CACHE` (default `$DETECTRON2_DATASETS/petr_toy`, with `DETECTRON2_DATASETS` defaulting
to `datasets`), one folder per split whose name carries a hash of the generation spec, so a
changed spec never reads a stale cache. A file lock serialises generation between processes
(e.g. 2-process DDP) and each split is built in a temporary folder renamed into place, so a
reader never sees a half-written split. Sizes: `PETR_TOY_NUM_TRAIN` / `PETR_TOY_NUM_VAL` or the
arguments of `register_toy_datasets`.
"""

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import (
    COCO_PERSON_KEYPOINT_FLIP_MAP,
    COCO_PERSON_KEYPOINT_NAMES,
    KEYPOINT_CONNECTION_RULES,
)

from ..metadata import COCO_OKS_SIGMAS
from .custom import load_coco_keypoint_json, register_coco_keypoint_dataset
from .toy_render import render_image

try:
    import fcntl
except ImportError:  # Windows: no lock; the atomic rename below still keeps the cache sound
    fcntl = None

__all__ = [
    "ToySpec",
    "default_root",
    "ensure_split",
    "ensure_toy_dataset",
    "generate_split",
    "register_toy_datasets",
    "register_toy_split",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 7  # bump when rendering changes, so old caches are not reused
DEFAULT_NUM_IMAGES = {"train": 2000, "val": 200}
_SIZE_ENV = {"train": "PETR_TOY_NUM_TRAIN", "val": "PETR_TOY_NUM_VAL"}
_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ToySpec:
    """Everything that determines a split's bytes; image sides are drawn in [min_side, max_side]."""

    split: str
    num_images: int
    seed: int = 0
    min_side: int = 192
    max_side: int = 320
    jpeg_quality: int = 92
    version: int = GENERATOR_VERSION

    def __post_init__(self):
        if not isinstance(self.num_images, int) or self.num_images < 1:
            raise ValueError(f"toy split {self.split!r}: num_images must be an int >= 1, "
                             f"got {self.num_images!r}")  # fmt: skip
        if not 32 <= self.min_side <= self.max_side:
            raise ValueError(f"toy split {self.split!r}: need 32 <= min_side <= max_side, got "
                             f"{self.min_side}, {self.max_side}")  # fmt: skip

    @property
    def key(self):
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]

    def folder(self, root):
        return os.path.join(root, f"petr_toy_{self.split}_{self.key}")

    @property
    def json_name(self):
        return f"petr_toy_{self.split}.json"

    def paths(self, root):
        """(json_file, image_root) of this split under `root`."""
        folder = self.folder(root)
        return os.path.join(folder, self.json_name), os.path.join(folder, "images")


def default_root():
    """Cache folder: $PETR_TOY_CACHE, else $DETECTRON2_DATASETS/petr_toy (default datasets/)."""
    if os.environ.get("PETR_TOY_CACHE"):
        return os.environ["PETR_TOY_CACHE"]
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "petr_toy")


def _file_name(index):
    return f"{index:06d}.jpg"


def _category():
    names = list(COCO_PERSON_KEYPOINT_NAMES)
    skeleton = [[names.index(a) + 1, names.index(b) + 1] for a, b, _ in KEYPOINT_CONNECTION_RULES]
    return {"id": 1, "name": "person", "supercategory": "person", "keypoints": names,
            "skeleton": skeleton}  # fmt: skip


def generate_split(spec, out_dir):
    """Render `spec` into `out_dir` (images/, the COCO json, the manifest written last).

    Returns the number of person annotations. Keypoints are COCO pixel indices, boxes
    [x, y, w, h] pixels, area = the OKS scale (0.55 x box area).
    """
    json_file = os.path.join(out_dir, spec.json_name)
    image_root = os.path.join(out_dir, "images")
    os.makedirs(image_root, exist_ok=True)
    split_id = zlib.crc32(spec.split.encode())
    images, annotations = [], []
    for index in range(spec.num_images):
        rng = np.random.default_rng([spec.seed, split_id, index])
        h, w = (int(s) for s in rng.integers(spec.min_side, spec.max_side + 1, 2))
        img, people = render_image(rng, h, w)
        path = os.path.join(image_root, _file_name(index))
        if not cv2.imwrite(path, img, [cv2.IMWRITE_JPEG_QUALITY, spec.jpeg_quality]):
            raise OSError(f"could not write toy image {path}")
        images.append({"id": index + 1, "file_name": _file_name(index), "height": h, "width": w})
        for person in people:
            kpts = person["keypoints"]
            flat = [v for x, y, vis in kpts for v in (round(x, 2), round(y, 2), int(vis))]
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": 1,
                "iscrowd": 0, "bbox": [round(v, 2) for v in person["bbox"]],
                "area": round(person["area"], 1), "keypoints": flat,
                "num_keypoints": int((kpts[:, 2] > 0).sum()),
            })  # fmt: skip
    coco = {
        "info": {"description": "PETR toy keypoint dataset", "spec": asdict(spec)},
        "images": images,
        "annotations": annotations,
        "categories": [_category()],
    }
    with open(json_file, "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    with open(os.path.join(out_dir, _MANIFEST), "w") as f:
        json.dump({"spec": asdict(spec), "key": spec.key, "num_people": len(annotations)}, f)
    return len(annotations)


def _is_complete(spec, folder):
    try:
        with open(os.path.join(folder, _MANIFEST)) as f:
            manifest = json.load(f)
        present = set(os.listdir(os.path.join(folder, "images")))
    except (OSError, ValueError):
        return False
    return (
        manifest.get("spec") == asdict(spec)
        and os.path.isfile(os.path.join(folder, spec.json_name))
        and all(_file_name(i) in present for i in range(spec.num_images))
    )


@contextlib.contextmanager
def _file_lock(path):
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes or we die
        yield


def ensure_split(spec, root):
    """Generate `spec` under `root` unless a complete cache exists; returns (json, image_root)."""
    folder = spec.folder(root)
    if not _is_complete(spec, folder):
        os.makedirs(root, exist_ok=True)
        with _file_lock(folder + ".lock"):
            if not _is_complete(spec, folder):  # another process may have built it meanwhile
                _build(spec, root, folder)
    return spec.paths(root)


def _build(spec, root, folder):
    name = os.path.basename(folder)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root)
    try:
        logger.info(f"Generating toy split {name} under {root} (first use) ...")
        start = time.perf_counter()
        num_people = generate_split(spec, tmp)
        logger.info(f"Generated toy split {name}: {spec.num_images} images, {num_people} people "
                    f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
        if os.path.exists(folder):  # incomplete leftover (e.g. files deleted by hand)
            trash = tempfile.mkdtemp(prefix=f".{name}.old-", dir=root)
            os.rename(folder, os.path.join(trash, "old"))
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_complete(spec, folder):  # lost a race without a lock: keep the winner's
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_REGISTERED = {}  # dataset name -> (root, ToySpec)


def ensure_toy_dataset(name):
    """Make sure registered toy dataset `name` exists on disk; returns (json_file, image_root).

    Call this before building a COCOEvaluator if the dataset was never loaded in this process.
    """
    if name not in _REGISTERED:
        raise KeyError(f"{name!r} is not a registered toy dataset; known: {sorted(_REGISTERED)}")
    root, spec = _REGISTERED[name]
    return ensure_split(spec, root)


def _load_toy(name):
    json_file, image_root = ensure_toy_dataset(name)
    return load_coco_keypoint_json(json_file, image_root, name)  # keeps "area", the OKS scale


def register_toy_split(name, split, num_images, root=None, seed=0):
    """Register dataset `name` (lazy: generated on `DatasetCatalog.get`); replaces an old entry."""
    spec = ToySpec(split=split, num_images=num_images, seed=seed)
    root = os.path.abspath(root if root is not None else default_root())
    json_file, image_root = spec.paths(root)
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog.list():
            catalog.remove(name)
    register_coco_keypoint_dataset(
        name,
        json_file,
        image_root,
        COCO_PERSON_KEYPOINT_NAMES,
        COCO_PERSON_KEYPOINT_FLIP_MAP,
        COCO_OKS_SIGMAS,
        KEYPOINT_CONNECTION_RULES,
        thing_classes=["person"],
    )
    DatasetCatalog.remove(name)  # swap in the loader that generates the split on first use
    DatasetCatalog.register(name, functools.partial(_load_toy, name))
    _REGISTERED[name] = (root, spec)


def _size_from_env(split):
    var = _SIZE_ENV[split]
    value = os.environ.get(var)
    if not value:
        return DEFAULT_NUM_IMAGES[split]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${var} must be an integer number of images, got {value!r}") from None


def register_toy_datasets(root=None, num_train=None, num_val=None):
    """Register `petr_toy_train` and `petr_toy_val` (sizes: args, else env, else 2000 / 200)."""
    sizes = {"train": num_train, "val": num_val}
    # Resolve every size before registering anything, so a bad value changes nothing.
    sizes = {split: _size_from_env(split) if n is None else n for split, n in sizes.items()}
    specs = {split: ToySpec(split=split, num_images=n) for split, n in sizes.items()}
    for split, spec in specs.items():
        register_toy_split(f"petr_toy_{split}", split, spec.num_images, root=root)


register_toy_datasets()
