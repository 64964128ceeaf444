"""The procedurally generated toy keypoint dataset (petr.data.datasets.toy)."""

import copy
import json
import os
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_PERSON_KEYPOINT_NAMES
from detectron2.structures import BoxMode
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from petr.data.datasets.toy import (
    ToySpec,
    default_root,
    ensure_split,
    ensure_toy_dataset,
    generate_split,
    register_toy_datasets,
    register_toy_split,
)
from petr.data.datasets.toy_render import LIMBS, sample_pose
from petr.data.metadata import COCO_OKS_SIGMAS

SPEC = ToySpec(split="val", num_images=40)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A 40-image split generated once: (json_file, image_root, coco dict)."""
    json_file, image_root = ensure_split(SPEC, str(tmp_path_factory.mktemp("toy")))
    with open(json_file) as f:
        return json_file, image_root, json.load(f)


def _people(coco):
    """(image dict, (17, 3) keypoints, annotation) for every person."""
    images = {im["id"]: im for im in coco["images"]}
    for ann in coco["annotations"]:
        yield images[ann["image_id"]], np.array(ann["keypoints"], float).reshape(17, 3), ann


def _tree_bytes(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), folder)] = f.read()
    return out


def test_generation_is_deterministic(tmp_path):
    spec = ToySpec(split="train", num_images=5)
    generate_split(spec, str(tmp_path / "a"))
    generate_split(spec, str(tmp_path / "b"))
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert len(a) == 5 + 2 and a == b  # 5 images, json, manifest
    generate_split(ToySpec(split="train", num_images=5, seed=1), str(tmp_path / "c"))
    assert _tree_bytes(tmp_path / "c")["petr_toy_train.json"] != a["petr_toy_train.json"]


def test_annotations_are_valid_coco_keypoints(split):
    _, image_root, coco = split
    assert [c["name"] for c in coco["categories"]] == ["person"]
    assert coco["categories"][0]["keypoints"] == list(COCO_PERSON_KEYPOINT_NAMES)
    assert len(coco["images"]) == SPEC.num_images
    for im in coco["images"]:
        assert all(SPEC.min_side <= im[k] <= SPEC.max_side for k in ("height", "width"))
        img = cv2.imread(os.path.join(image_root, im["file_name"]))
        assert img.shape == (im["height"], im["width"], 3)
    ids = [ann["id"] for ann in coco["annotations"]]
    assert len(set(ids)) == len(ids)
    for im, kpts, ann in _people(coco):
        w, h = im["width"], im["height"]
        assert ann["category_id"] == 1 and ann["iscrowd"] == 0 and len(ann["keypoints"]) == 51
        v = kpts[:, 2]
        assert set(v) <= {0, 1, 2}
        assert ann["num_keypoints"] == (v > 0).sum() >= 3
        assert np.all(kpts[v == 0] == 0)  # out of frame -> (0, 0, 0)
        xy = kpts[v > 0, :2]
        assert np.all((xy >= 0) & (xy <= [w - 1, h - 1]))  # pixel indices inside the image
        bx, by, bw, bh = ann["bbox"]
        assert bx >= 0 and by >= 0 and bx + bw <= w and by + bh <= h
        centres = xy + 0.5  # pixel index -> continuous, as Detectron2 loads them
        assert np.all((centres >= [bx, by]) & (centres <= [bx + bw, by + bh]))
        assert 0 < ann["area"] <= bw * bh  # the silhouette lies inside its box


def test_split_has_variety(split):
    coco = split[2]
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=41)[1:]
    assert per_image.max() <= 4
    assert (per_image == 0).any() and (per_image >= 3).any()
    v = np.concatenate([k[:, 2] for _, k, _ in _people(coco)])
    assert (v == 0).any() and (v == 1).any() and (v == 2).mean() > 0.5
    heights = [a["bbox"][3] for a in coco["annotations"]]
    assert max(heights) > 2 * min(heights)  # people are drawn 110 px to 0.95 x the image side


def test_joint_angles_follow_loose_human_statistics():
    """Elbows and knees bend within human-like limits, mostly near straight; arms mostly hang,
    some rise above the shoulder (a uniform spread of angles was much harder to learn)."""
    rng = np.random.default_rng(0)
    poses = [sample_pose(rng, 100.0, (0.0, 0.0), 0.0) for _ in range(1000)]

    def bends(a, b, c):
        u = np.stack([p.joints[b] - p.joints[a] for p in poses])
        w = np.stack([p.joints[c] - p.joints[b] for p in poses])
        cos = (u * w).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(w, axis=1)
        return np.arccos(np.clip(cos, -1.0, 1.0))

    elbows = np.concatenate([bends(5, 7, 9), bends(6, 8, 10)])
    knees = np.concatenate([bends(11, 13, 15), bends(12, 14, 16)])
    assert elbows.max() <= 1.8 + 1e-6 and np.median(elbows) < 0.8
    assert knees.max() <= 1.2 + 1e-6 and np.median(knees) < 0.5
    raised = np.mean([p.joints[e, 1] < p.joints[s, 1] for p in poses for s, e in ((5, 7), (6, 8))])
    assert 0.1 < raised < 0.4  # y grows downwards: elbow above its shoulder


def test_people_face_the_camera_and_flip_map_swaps_sides(split):
    """Left shoulder/hip lie on the image right of the body axis, also after flip + flip map.

    This chirality is what keeps horizontal-flip augmentation label-consistent.
    """
    names = list(COCO_PERSON_KEYPOINT_NAMES)
    flip_map = MetadataCatalog.get("petr_toy_val").keypoint_flip_map
    perm = list(range(17))
    for a, b in flip_map:
        perm[names.index(a)], perm[names.index(b)] = names.index(b), names.index(a)

    def chirality(k):
        ls, rs, lh, rh = (k[names.index(n), :2] for n in
                          ("left_shoulder", "right_shoulder", "left_hip", "right_hip"))  # fmt: skip
        up, left = (ls + rs - lh - rh) / 2, (ls - rs + lh - rh) / 2
        return up[0] * left[1] - up[1] * left[0]  # > 0: left is clockwise from up (y down)

    checked = 0
    for im, kpts, _ in _people(split[2]):
        if (kpts[[5, 6, 11, 12], 2] > 0).all():
            assert chirality(kpts) > 0
            flipped = kpts.copy()
            flipped[:, 0] = im["width"] - 1 - flipped[:, 0]
            assert chirality(flipped[perm]) > 0
            checked += 1
    assert checked >= 20


def test_limbs_are_drawn_in_their_side_colour(split):
    """The pixel halfway along a visible limb has that limb's colour, not the other side's."""
    _, image_root, coco = split
    palette = np.array([rgb for _, _, rgb, _ in LIMBS], float)
    own = mirrored = total = 0
    for im, kpts, _ in _people(coco):
        img = cv2.imread(os.path.join(image_root, im["file_name"]))[:, :, ::-1].astype(float)
        for i, (a, b, _, _) in enumerate(LIMBS):
            if kpts[a, 2] == 2 and kpts[b, 2] == 2:
                x, y = np.rint((kpts[a, :2] + kpts[b, :2]) / 2).astype(int)
                nearest = np.argmin(((palette - img[y, x]) ** 2).sum(1))
                own += nearest == i
                mirrored += nearest == i ^ 2  # same segment on the other side
                total += 1
    assert total > 100
    assert own / total > 0.9 and mirrored / total < 0.05


def test_cache_is_reused_repaired_and_keyed_by_spec(tmp_path):
    spec = ToySpec(split="val", num_images=4)
    json_file, image_root = ensure_split(spec, str(tmp_path))
    image = os.path.join(image_root, "000002.jpg")
    stamps = (os.stat(json_file).st_mtime_ns, os.stat(image).st_mtime_ns)
    assert ensure_split(spec, str(tmp_path)) == (json_file, image_root)
    assert (os.stat(json_file).st_mtime_ns, os.stat(image).st_mtime_ns) == stamps
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]

    with open(image, "rb") as f:
        original = f.read()
    os.remove(image)  # an incomplete cache is rebuilt, with the same bytes
    ensure_split(spec, str(tmp_path))
    with open(image, "rb") as f:
        assert f.read() == original
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]

    other, _ = ensure_split(ToySpec(split="val", num_images=3), str(tmp_path))
    assert os.path.dirname(other) != os.path.dirname(json_file) and os.path.exists(json_file)
    with open(other) as f:
        assert len(json.load(f)["images"]) == 3


_WORKER = textwrap.dedent("""
    import logging, os, sys, time
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    from petr.data.datasets.toy import ToySpec, ensure_split
    root, me = sys.argv[1], sys.argv[2]
    open(os.path.join(root, "ready-" + me), "w").close()
    while not os.path.exists(os.path.join(root, "go")):
        time.sleep(0.01)
    ensure_split(ToySpec(split="train", num_images=30), root)
""")


def test_concurrent_processes_generate_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path), str(i)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
            assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.01)
        (tmp_path / "go").touch()  # both start generating at the same moment
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum(out.count("Generated toy split") for out in outputs) == 1, outputs
    spec = ToySpec(split="train", num_images=30)
    generate_split(spec, str(tmp_path / "reference"))
    assert _tree_bytes(spec.folder(str(tmp_path))) == _tree_bytes(tmp_path / "reference")
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_catalog_loads_lazily_with_full_metadata(tmp_path):
    name = "_toy_test_catalog"
    register_toy_split(name, "val", 6, root=str(tmp_path))
    try:
        meta = MetadataCatalog.get(name)
        assert not os.path.exists(meta.json_file)  # nothing generated before first use
        dicts = DatasetCatalog.get(name)
        assert os.path.isfile(meta.json_file) and ensure_toy_dataset(name)[0] == meta.json_file
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert len(dicts) == 6
    for d in dicts:
        assert os.path.isfile(d["file_name"]) and d["height"] > 0 and d["width"] > 0
        for ann in d["annotations"]:
            assert len(ann["keypoints"]) == 51 and ann["bbox_mode"] == BoxMode.XYWH_ABS
            assert ann["category_id"] == 0 and ann["area"] > 0
    assert sum(len(d["annotations"]) for d in dicts) > 0
    assert meta.thing_classes == ["person"] and meta.evaluator_type == "coco"
    assert meta.keypoint_names == list(COCO_PERSON_KEYPOINT_NAMES)
    assert len(meta.keypoint_flip_map) == 8 and meta.keypoint_oks_sigmas == COCO_OKS_SIGMAS
    assert len(meta.keypoint_connection_rules) > 0


def test_standard_names_are_registered_on_import():
    for name in ("petr_toy_train", "petr_toy_val"):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco" and meta.json_file.endswith(f"{name}.json")
        assert meta.image_root.startswith(os.path.abspath(default_root()))


def _coco_ap(json_file, detections):
    gt = COCO(json_file)
    ev = COCOeval(gt, gt.loadRes(detections), "keypoints")
    ev.params.kpt_oks_sigmas = np.array(COCO_OKS_SIGMAS)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[0]


def test_ground_truth_scores_ap_1_in_cocoeval(split):
    json_file, _, coco = split
    dets = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
        for a in coco["annotations"]
    ]
    assert _coco_ap(json_file, copy.deepcopy(dets)) == pytest.approx(1.0)
    # A 3-pixel error must cost AP: the areas are real OKS scales, not huge placeholders.
    for det in dets:
        det["keypoints"] = [v + 3.0 if i % 3 == 0 else v for i, v in enumerate(det["keypoints"])]
    assert _coco_ap(json_file, dets) < 0.9


def test_bad_input_raises_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="'val'.*num_images"):
        ToySpec(split="val", num_images=0)
    with pytest.raises(KeyError, match="_not_a_toy"):
        ensure_toy_dataset("_not_a_toy")
    before = MetadataCatalog.get("petr_toy_train").json_file
    monkeypatch.setenv("PETR_TOY_NUM_VAL", "lots")
    with pytest.raises(ValueError, match="PETR_TOY_NUM_VAL"):
        register_toy_datasets(root="/elsewhere", num_train=3)
    assert MetadataCatalog.get("petr_toy_train").json_file == before  # nothing was replaced


def test_default_root_follows_the_environment(monkeypatch):
    monkeypatch.setenv("PETR_TOY_CACHE", "/cache/toy")
    assert default_root() == "/cache/toy"
    monkeypatch.delenv("PETR_TOY_CACHE")
    monkeypatch.setenv("DETECTRON2_DATASETS", "/data")
    assert default_root() == os.path.join("/data", "petr_toy")
    monkeypatch.delenv("DETECTRON2_DATASETS")
    assert default_root() == os.path.join("datasets", "petr_toy")
