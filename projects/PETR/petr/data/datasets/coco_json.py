"""Register a COCO-format keypoint json with nothing but the json: `register_coco_keypoint_json`,
behind `tools/train_net.py --dataset NAME JSON IMAGE_ROOT`.

From the json's keypoint category (the one named "person", else the only one listing
"keypoints"): the K keypoint names (`keypoints`) and the skeleton (`skeleton`, 1-based index
pairs, drawn by the demo). The flip map pairs names that differ only in left/right ("left_eye" /
"right_eye", "l_knee" / "r_knee", "hand_left" / "hand_right"), unless given. OKS sigmas: given,
else COCO's for COCO's 17 joints, CrowdPose's for its 14; any other joints need them given.
"""

import json
import logging
import re

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_PERSON_KEYPOINT_NAMES
from detectron2.utils.file_io import PathManager

from ..metadata import COCO_OKS_SIGMAS, CROWDPOSE_OKS_SIGMAS
from .crowdpose import CROWDPOSE_KEYPOINT_NAMES
from .custom import register_coco_keypoint_dataset

__all__ = ["infer_flip_map", "parse_flip_map", "register_coco_keypoint_json"]

logger = logging.getLogger(__name__)
_LEFT, _RIGHT, _CENTRE = (0, 200, 80), (255, 128, 0), (51, 153, 255)  # RGB, as CrowdPose's
_KNOWN_SIGMAS = {
    tuple(COCO_PERSON_KEYPOINT_NAMES): COCO_OKS_SIGMAS,
    tuple(CROWDPOSE_KEYPOINT_NAMES): CROWDPOSE_OKS_SIGMAS,
}
# left/right spelled as a word of a name: "left_eye", "l_knee", "hand_left", "LeftHand", ...
_SWAPS = (("left", "right"), ("Left", "Right"), ("LEFT", "RIGHT"), ("l", "r"), ("L", "R"))
_SIDE = re.compile(r"(^|[_\-\s.])(left|l)(?=$|[_\-\s.])|Left|LEFT", re.IGNORECASE)


def _mirror(name):
    def swap(m):
        word = m.group(0)
        for a, b in _SWAPS:
            if a in word:
                return word.replace(a, b)
        return word

    return _SIDE.sub(swap, name)


def infer_flip_map(names):
    """(left, right) pairs of `names` that differ only in the side word."""
    pairs = []
    for name in names:
        other = _mirror(name)
        if other != name and other in names:
            pairs.append((name, other))
    return pairs


def parse_flip_map(pairs):
    """["a:b", ...] (the --flip-map flag) -> [("a", "b"), ...]."""
    out = []
    for pair in pairs:
        a, sep, b = str(pair).partition(":")
        if not sep or not a or not b:
            raise ValueError(f"--flip-map takes LEFT:RIGHT keypoint name pairs, got {pair!r}")
        out.append((a, b))
    return out


def _keypoint_category(json_file, categories):
    with_names = [c for c in categories if c.get("keypoints")]
    persons = [c for c in with_names if c.get("name") == "person"]
    if persons or len(with_names) == 1:
        return (persons or with_names)[0]
    raise ValueError(
        f"{json_file}: no category lists its 'keypoints' names (COCO format: categories[i]"
        "['keypoints']), or several do and none is named 'person'; PETR needs the K names"
    )


def register_coco_keypoint_json(name, json_file, image_root, *, oks_sigmas=None, flip_map=None):
    """Register `json_file` (images under `image_root`) as dataset `name` (module docstring).
    oks_sigmas: K floats, flip_map: (left, right) name pairs; None: from the json's names.
    Registering the same name again with the same files does nothing."""
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("json_file", None), meta.get("image_root", None)) == (json_file, image_root):
            return
        raise ValueError(f"Dataset name {name!r} is already registered (to other files)")
    with PathManager.open(json_file) as f:
        categories = json.load(f).get("categories", [])
    cat = _keypoint_category(json_file, categories)
    names = list(cat["keypoints"])
    if oks_sigmas is None:
        oks_sigmas = _KNOWN_SIGMAS.get(tuple(names))
        if oks_sigmas is None:
            raise ValueError(
                f"{json_file} has {len(names)} keypoints that are not COCO's or CrowdPose's: "
                f"give their {len(names)} OKS sigmas (--oks-sigmas), e.g. COCO's range 0.025 "
                "(eyes) to 0.107 (hips)"
            )
    if flip_map is None:
        flip_map = infer_flip_map(names)
        logger.info(f"Dataset {name!r}: flip map from the keypoint names: {flip_map}")
    lefts, rights = {a for a, _ in flip_map}, {b for _, b in flip_map}
    rules = []
    for a, b in cat.get("skeleton") or []:
        if not (1 <= a <= len(names) and 1 <= b <= len(names)):
            raise ValueError(f"{json_file}: skeleton pair {[a, b]} is outside 1..{len(names)}")
        pair = {names[a - 1], names[b - 1]}
        colour = _LEFT if pair <= lefts else _RIGHT if pair <= rights else _CENTRE
        rules.append((names[a - 1], names[b - 1], colour))
    register_coco_keypoint_dataset(name, json_file, image_root, names, flip_map, oks_sigmas, rules)
