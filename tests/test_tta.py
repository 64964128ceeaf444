"""Test-time augmentation: flip mapping, soft-NMS, OKS merge and PETRWithTTA end to end (CPU)."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from petr_testing import load_cfg, shrink_cfg

from petr.data.metadata import COCO_OKS_SIGMAS, KeypointSpec
from petr.modeling.meta_arch import PETR
from petr.modeling.structures import PETRPredictions
from petr.modeling.test_time_augmentation import (
    PETRWithTTA,
    hflip_poses,
    merge_by_oks,
    soft_nms_linear,
)

COCO = "keypoints_coco_2017_val"  # Detectron2's built-in metadata: names, flip map, skeleton
# COCO order: nose, then (left, right) pairs of eyes, ears, shoulders, elbows, wrists, hips,
# knees, ankles: every odd id swaps with the next one.
COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


def test_flip_indices_come_from_the_model_and_the_test_set_must_match_it():
    cfg = shrink_cfg(load_cfg("petr_R50.yaml"))
    assert cfg.DATASETS.TEST == (COCO,) and cfg.TEST.AUG.FLIP
    assert build_model(cfg).keypoint_spec.flip_indices == tuple(COCO_FLIP)
    assert PETRWithTTA(cfg, _FixedPoses(_people(1), torch.ones(1))).flip_indices == COCO_FLIP
    model = _FixedPoses(_people(1), torch.ones(1), KeypointSpec(14, tuple(range(14)), None))
    with pytest.raises(ValueError, match=f"{COCO}.*17 keypoint_names.*model predicts 14"):
        PETRWithTTA(cfg, model)
    no_flip = _FixedPoses(_people(1), torch.ones(1), KeypointSpec(17, None, None))
    with pytest.raises(ValueError, match="TEST.AUG.FLIP needs the flip indices"):
        PETRWithTTA(cfg, no_flip)


def test_unflip_of_flipped_pose_returns_original_with_swapped_ids():
    g = torch.Generator().manual_seed(0)
    W = 64.0
    poses = torch.rand(3, 17, 3, generator=g) * W
    flipped = hflip_poses(poses, W, COCO_FLIP)
    # left eye (1) of the flipped pose is the mirrored right eye (2) of the original
    assert flipped[:, 1, 0].tolist() == pytest.approx((W - poses[:, 2, 0]).tolist())
    assert torch.equal(flipped[:, 1, 1:], poses[:, 2, 1:])
    assert flipped[:, 0, 0].tolist() == pytest.approx((W - poses[:, 0, 0]).tolist())  # nose
    assert torch.allclose(hflip_poses(flipped, W, COCO_FLIP), poses)


def test_unflip_matches_pixels_of_a_mirrored_image():
    """x' = W - x in continuous pixels: a joint at the centre of pixel column i lands on the
    centre of column W - 1 - i of the mirrored image (np.fliplr)."""
    H, W = 20, 31
    image = np.zeros((H, W), np.int64)
    cols = torch.arange(17) + 5  # one joint per column, distinct values
    rows = torch.arange(17) % H
    image[rows.numpy(), cols.numpy()] = np.arange(1, 18)
    pose = torch.stack([cols + 0.5, rows + 0.5], -1)[None].float()  # pixel centres
    mirrored = np.fliplr(image)
    on_mirror = hflip_poses(pose, W, COCO_FLIP)[0]
    for k in range(17):
        x, y = int(on_mirror[k, 0]), int(on_mirror[k, 1])
        assert mirrored[y, x] == image[int(pose[0, COCO_FLIP[k], 1]), int(pose[0, COCO_FLIP[k], 0])]


def test_soft_nms_linear_hand_example():
    boxes = torch.tensor(
        [
            [0, 0, 10, 10],  # A 0.9
            [0, 0, 10, 8],  # B 0.8: IoU(A) 0.8 -> 0.8 * 0.2 = 0.16; later IoU(D) 0.625 -> 0.06
            [20, 20, 30, 30],  # C 0.7: overlaps nothing
            [0, 0, 10, 5],  # D 0.6: IoU(A) = 0.5 is not > 0.5, no decay
            [0, 0, 10, 10],  # E 0.002: IoU(A) 1 -> 0 < min_score, dropped
        ],
        dtype=torch.float32,
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.002])
    keep, kept = soft_nms_linear(boxes, scores, iou_threshold=0.5, min_score=1e-3)
    assert keep.tolist() == [0, 2, 3, 1]
    assert kept.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.8 * 0.2 * 0.375])
    assert torch.equal(scores, torch.tensor([0.9, 0.8, 0.7, 0.6, 0.002]))  # input untouched


def test_soft_nms_empty_and_degenerate_boxes():
    keep, kept = soft_nms_linear(torch.zeros(0, 4), torch.zeros(0))
    assert keep.numel() == 0 and kept.numel() == 0
    # zero-area boxes (all joints on one point) have IoU 0 with each other: no decay, no NaN
    keep, kept = soft_nms_linear(torch.full((2, 4), 5.0), torch.tensor([0.5, 0.4]))
    assert keep.tolist() == [0, 1] and kept.tolist() == pytest.approx([0.5, 0.4])


def _people(n, K=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.arange(n, dtype=torch.float32)[:, None, None] * 300 + 100
    return centres + torch.rand(n, K, 2, generator=g) * 120 - 60  # 120 px people, far apart


SIGMAS = torch.tensor(COCO_OKS_SIGMAS)


def test_oks_merge_of_identical_views_returns_the_same_poses():
    kpts, scores = _people(3), torch.tensor([0.9, 0.5, 0.7])
    merged, merged_scores = merge_by_oks([(kpts, scores), (kpts, scores)], SIGMAS, 0.5)
    assert merged_scores.tolist() == pytest.approx([0.9, 0.7, 0.5])
    assert torch.allclose(merged, kpts[[0, 2, 1]])


def test_oks_merge_averages_a_shifted_copy_and_keeps_unmatched_poses():
    kpts = _people(2)
    shifted = kpts + torch.tensor([3.0, -1.5])
    far = _people(3, seed=1)[2:] + 400  # only in the second view
    views = [
        (kpts, torch.tensor([0.8, 0.6])),
        (torch.cat([shifted[[1, 0]], far]), torch.tensor([0.2, 0.4, 0.3])),  # other order
    ]
    merged, scores = merge_by_oks(views, SIGMAS, 0.5)
    # person 0: scores 0.8 and 0.4 -> shift weighted by 0.4 / 1.2; person 1: 0.6 and 0.2
    assert scores.tolist() == pytest.approx([0.6, 0.4, 0.3])
    assert torch.allclose(merged[0], kpts[0] + torch.tensor([3.0, -1.5]) / 3, atol=1e-4)
    assert torch.allclose(merged[1], kpts[1] + torch.tensor([3.0, -1.5]) / 4, atol=1e-4)
    assert torch.allclose(merged[2], far[0])


def test_oks_merge_keeps_poses_below_the_oks_threshold_apart():
    kpts = _people(1)
    moved = kpts + 40.0  # same size, far off: OKS well below 0.5
    merged, scores = merge_by_oks(
        [(kpts, torch.tensor([0.9])), (moved, torch.tensor([0.8]))], SIGMAS, 0.5
    )
    assert len(merged) == 2 and scores.tolist() == pytest.approx([0.9, 0.8])


def test_oks_merge_averages_joint_scores_as_the_coordinates():
    kpts = _people(2)
    conf_a, conf_b = torch.rand(2, 17, 1), torch.rand(2, 17, 1)
    views = [
        (torch.cat([kpts, conf_a], -1), torch.tensor([0.8, 0.6])),
        (torch.cat([kpts[[1, 0]], conf_b[[1, 0]]], -1), torch.tensor([0.2, 0.4])),
    ]
    merged, scores = merge_by_oks(views, SIGMAS, 0.5)
    assert merged.shape == (2, 17, 3) and scores.tolist() == pytest.approx([0.6, 0.4])
    # score-weighted: person 0 from 0.8 and 0.4, person 1 from 0.6 and 0.2
    torch.testing.assert_close(
        merged[0, :, 2], (0.8 * conf_a[0, :, 0] + 0.4 * conf_b[0, :, 0]) / 1.2
    )
    torch.testing.assert_close(
        merged[1, :, 2], (0.6 * conf_a[1, :, 0] + 0.2 * conf_b[1, :, 0]) / 0.8
    )
    torch.testing.assert_close(merged[..., :2], kpts[:2])


class _FixedPoses(nn.Module):
    """A stand-in for PETR that records its inputs and predicts fixed poses, given in pixels of
    the original image (height, width) whatever the image shows; it ends in PETR's back door."""

    input_format = "RGB"
    output_pixel_offset, oks_nms_thresh = 0.0, 0.0
    postprocess = PETR.postprocess

    def __init__(self, poses, scores, spec=None, joint_scores=None):
        super().__init__()
        self.poses, self.scores, self.inputs = poses, scores, []
        self.joint_scores = joint_scores  # (N, K) or None (MODEL.PETR.JOINT_SCORES none)
        self.keypoint_spec = spec or KeypointSpec(17, tuple(COCO_FLIP), tuple(COCO_OKS_SIGMAS))

    def forward(self, batched_inputs, do_postprocess=True):
        (x,) = batched_inputs
        self.inputs.append(x)
        size = tuple(x["image"].shape[-2:])
        scale = torch.tensor([float(x["width"]), float(x["height"])])
        joint_scores = None if self.joint_scores is None else self.joint_scores[None]
        predictions = PETRPredictions(self.scores[None], (self.poses / scale)[None], joint_scores)
        if not do_postprocess:
            return predictions, [size]
        return self.postprocess(predictions, batched_inputs, [size])


def _tta(model, **kw):
    args = dict(min_sizes=[64], max_size=200, flip=True)
    args.update(kw)
    return PETRWithTTA(model, **args).eval()


def test_flip_view_is_the_mirrored_resize_and_maps_back_with_swapped_joints():
    W, H = 90, 120
    pose = torch.stack([torch.linspace(5, 30, 17), torch.linspace(10, 100, 17)], -1)[None]
    model = _FixedPoses(pose, torch.tensor([0.9]))
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    out = _tta(model)([{"image": image, "height": H, "width": W}])[0]["instances"]
    plain, mirrored = (x["image"] for x in model.inputs)
    # mmcv rescale: factor min(200 / 120, 64 / 90); sizes int(x * f + 0.5)
    assert plain.shape == (3, 85, 64)
    assert torch.equal(mirrored, plain.flip(-1))
    resized = cv2.resize(image.permute(1, 2, 0).numpy(), (64, 85))  # cv2 bilinear, (w, h)
    assert torch.equal(plain, torch.from_numpy(resized).permute(2, 0, 1))
    # the mirrored view's pose maps back to x = W - x with left/right ids swapped; it does not
    # overlap the original (left half vs right half), so soft-NMS keeps both undecayed
    expected = pose.clone()
    expected[..., 0] = W - expected[..., 0]
    expected = expected[:, COCO_FLIP]
    assert out.image_size == (H, W)
    assert out.scores.tolist() == pytest.approx([0.9, 0.9])
    got = sorted(out.pred_keypoints[..., :2].tolist(), key=lambda p: p[0][0])
    assert torch.allclose(torch.tensor(got), torch.cat([pose, expected]))
    assert torch.equal(out.pred_keypoints[..., 2], torch.ones(2, 17))  # no joint scores: 1
    # with joint scores, the mirrored pose carries them under its swapped joint ids
    conf = torch.linspace(0.1, 0.9, 17)
    model = _FixedPoses(pose, torch.tensor([0.9]), joint_scores=conf[None])
    out = _tta(model)([{"image": image, "height": H, "width": W}])[0]["instances"]
    by_x = out.pred_keypoints[out.pred_keypoints[:, 0, 0].argsort()]
    torch.testing.assert_close(by_x[:, :, 2], torch.stack([conf, conf[COCO_FLIP]]))


def test_multi_scale_views_resize_the_original_file(tmp_path):
    H, W = 60, 80
    path = str(tmp_path / "img.png")
    cv2.imwrite(path, np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))
    model = _FixedPoses(_people(1) / 10, torch.tensor([0.7]))
    small = torch.zeros(3, 30, 40, dtype=torch.uint8)  # a pre-resized image: re-read the file
    tta = _tta(model, min_sizes=[40, 90], max_size=100, flip=False, merge="oks_average")
    out = tta([{"image": small, "file_name": path, "height": H, "width": W}])[0]["instances"]
    assert [tuple(x["image"].shape[1:]) for x in model.inputs] == [(40, 53), (75, 100)]
    assert all((x["height"], x["width"]) == (H, W) for x in model.inputs)
    assert model.inputs[0]["image"].float().std() > 10  # pixels of the file, not the zeros
    assert len(out) == 1 and out.scores.item() == pytest.approx(0.7)  # identical views merged


def test_config_and_mode_errors():
    with pytest.raises(ValueError, match="MERGE"):
        _tta(_FixedPoses(_people(1), torch.ones(1)), merge="nms")
    with pytest.raises(RuntimeError, match="eval"):
        _tta(_FixedPoses(_people(1), torch.ones(1))).train()([{"image": torch.zeros(3, 8, 8)}])
    cfg = shrink_cfg(load_cfg("petr_R50.yaml"))
    cfg.DATASETS.TEST = ("petr_test_tta_no_flip_map",)
    MetadataCatalog.get("petr_test_tta_no_flip_map").set(keypoint_names=["a", "b"])
    with pytest.raises(ValueError, match="petr_test_tta_no_flip_map"):
        PETRWithTTA(cfg, _FixedPoses(_people(1), torch.ones(1)))


@pytest.fixture(scope="module")
def tiny_petr():
    cfg = shrink_cfg(load_cfg("petr_R50.yaml"))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), (COCO,)
    cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE = (64, 96), 160
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


@pytest.mark.parametrize("merge", ["soft_nms", "oks_average"])
def test_petr_with_tta_end_to_end(tiny_petr, merge):
    cfg, model = tiny_petr
    cfg = cfg.clone()
    cfg.TEST.AUG.MERGE = merge
    tta = PETRWithTTA(cfg, model).eval()
    assert tta.min_sizes == [64, 96] and tta.flip and tta.merge == merge
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    (out,) = tta([{"image": image, "height": 100, "width": 140}])
    inst = out["instances"]
    assert inst.image_size == (100, 140)
    assert set(inst.get_fields()) == {"pred_keypoints", "pred_boxes", "scores", "pred_classes"}
    N = len(inst)
    assert 1 <= N <= cfg.TEST.DETECTIONS_PER_IMAGE
    assert inst.pred_keypoints.shape == (N, 17, 3)
    assert (inst.scores[:-1] >= inst.scores[1:]).all()
    xy = inst.pred_keypoints[..., :2]
    assert (xy >= 0).all() and (xy[..., 0] <= 140).all() and (xy[..., 1] <= 100).all()
    conf = inst.pred_keypoints[..., 2]  # MODEL.PETR.JOINT_SCORES heatmap, merged
    assert ((conf > 0) & (conf < 1)).all()


def test_symmetric_image_flip_views_agree(tiny_petr):
    """On a left-right symmetric image both views see the same pixels, so the model's raw poses
    P are equal and the flip view contributes exactly the mirrored poses of P."""
    cfg, model = tiny_petr
    cfg = cfg.clone()
    cfg.TEST.AUG.MIN_SIZES, cfg.TEST.DETECTIONS_PER_IMAGE = (64,), 100
    half = torch.randint(0, 256, (3, 64, 40), dtype=torch.uint8)
    image = torch.cat([half, half.flip(-1)], -1)  # (3, 64, 80), symmetric
    raw = model([{"image": image}])[0]["instances"].pred_keypoints  # (N, K, 3) with scores
    out = PETRWithTTA(cfg, model).eval()([{"image": image}])[0]["instances"]
    # each kept pose keeps its joint scores, swapped with the joint ids in the flip view
    candidates = torch.cat([raw, hflip_poses(raw, 80, COCO_FLIP)])  # (2N, K, 3)
    kpts = out.pred_keypoints
    dist = (kpts[:, None] - candidates[None]).abs().amax((-1, -2))  # (M, 2N)
    assert (dist.amin(1) < 1e-3).all()


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_flip_view_of_a_mirrored_image_agrees_with_the_plain_view(tiny_petr, offset):
    """The flip view of mirror(I) feeds the network the pixels of I, so once mapped back it is
    the official mirror (x' = W - x in the network's frame, here x' = 1 - x normalised) of the
    plain view of I; OUTPUT_PIXEL_OFFSET enters once, in the back door, after the merge."""
    cfg, model = tiny_petr
    cfg = cfg.clone()
    cfg.TEST.AUG.MIN_SIZES = (64,)  # the image's own size: no resampling
    image = torch.randint(0, 256, (3, 64, 80), generator=torch.Generator().manual_seed(3),
                          dtype=torch.uint8)  # fmt: skip
    mirrored = image.flip(-1)
    tta = PETRWithTTA(cfg, model).eval()
    with torch.no_grad():
        (plain, _), _ = tta.view_poses({"image": image})[0]
        _, (flip_view, _) = tta.view_poses({"image": mirrored})[0]
    torch.testing.assert_close(flip_view, hflip_poses(plain, 1.0, COCO_FLIP), rtol=0, atol=1e-6)
    without = tta([{"image": mirrored}])[0]["instances"].pred_keypoints
    model.output_pixel_offset = offset
    try:
        shifted = tta([{"image": mirrored}])[0]["instances"].pred_keypoints
    finally:
        model.output_pixel_offset = 0.0
    torch.testing.assert_close(shifted[..., :2], without[..., :2] + offset, rtol=0, atol=1e-4)
