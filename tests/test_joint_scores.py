"""Per-joint confidences (MODEL.PETR.JOINT_SCORES): the heatmap sampling, the poses they leave
untouched, COCO keypoint AP that ignores them, and their ROC AUC (petr.evaluation)."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from petr_testing import load_tool, opera_tiny_cfg

from petr.data.datasets.toy import register_toy_split
from petr.data.metadata import COCO_OKS_SIGMAS
from petr.evaluation.joint_confidence import JointConfidenceEvaluator, match_by_oks, roc_auc
from petr.modeling.transformer.encoder import PETRTransformerEncoder
from petr.modeling.transformer.heatmap import PETRHeatmapHead

SIGMAS = torch.tensor(COCO_OKS_SIGMAS, dtype=torch.float64)


def test_roc_auc_is_the_rank_statistic():
    # 4 positive-negative pairs, 3 ordered right: 0.75 (the classic example)
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5, 0.9], [1, 0, 1]) == pytest.approx(0.75)  # a tie counts half
    assert roc_auc([0.2, 0.1], [1, 0]) == 1.0 and roc_auc([0.2, 0.1], [0, 1]) == 0.0
    assert np.isnan(roc_auc([0.2, 0.1], [1, 1]))


def test_matching_is_greedy_by_score_and_oks_thresholded():
    g = torch.Generator().manual_seed(0)
    gt_xy = torch.rand(2, 17, 2, generator=g) * 40 + torch.tensor([[[0.0]], [[200.0]]])
    gt = torch.cat([gt_xy, torch.full((2, 17, 1), 2.0)], -1).double()
    areas = torch.tensor([1600.0, 1600.0], dtype=torch.float64)
    preds = torch.stack([gt_xy[0] + 1, gt_xy[0], gt_xy[1] + 30]).double()  # dup, best, far
    scores = torch.tensor([0.9, 0.5, 0.8])
    # the higher-scoring duplicate takes person 0; the exact copy finds no one left
    assert match_by_oks(preds, scores, gt, areas, SIGMAS, 0.5) == [(0, 0)]
    assert match_by_oks(preds, scores, gt, areas, SIGMAS, 0.0) == [(0, 0), (2, 1)]
    unlabelled = gt.clone()
    unlabelled[0, :, 2] = 0  # a person without a labelled joint is never matched, even at 0
    assert match_by_oks(preds, scores, unlabelled, areas, SIGMAS, 0.0) == [(0, 1)]


def test_joint_scores_sample_each_joints_own_channel_bilinearly():
    head = PETRHeatmapHead(
        dim=8, num_heads=1, ffn_dim=8, dropout=0.0, num_layers=1, num_points=1, num_keypoints=3
    )
    B, K, h0, w0 = 2, 3, 6, 10
    i, j = torch.meshgrid(torch.arange(float(h0)), torch.arange(float(w0)), indexing="ij")
    logits = torch.stack([k + 0.1 * i + 0.01 * j for k in range(K)])  # linear: exact bilinear
    head.forward = lambda enc: (logits.expand(B, -1, -1, -1), None)
    # image 1 is padded: its valid part is half the map's width and 2/3 of its height
    ratios = torch.tensor([[[1.0, 1.0]], [[0.5, 2 / 3]]])  # (B, L=1, 2) (w, h)
    enc = SimpleNamespace(valid_ratios=ratios, spatial_shapes=((h0, w0),))
    kpts = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.6, 0.3]]).expand(B, 1, K, 2)  # (B, 1, K, 2)
    got = head.joint_scores(enc, kpts, full_map=True)
    assert got.shape == (B, 1, K)
    for b in range(B):
        for k in range(K):
            x = kpts[b, 0, k, 0] * ratios[b, 0, 0] * w0 - 0.5  # cell coordinates
            y = kpts[b, 0, k, 1] * ratios[b, 0, 1] * h0 - 0.5
            expected = torch.sigmoid(k + 0.1 * y + 0.01 * x)
            assert got[b, 0, k].item() == pytest.approx(expected.item(), abs=1e-6)
    # joints off the image read the border cell, as the back door clamps them onto it
    off = torch.tensor([[[[-0.3, 0.5], [1.4, 0.5], [0.5, 2.0]]]])
    edge = torch.tensor([[[[0.0, 0.5], [1.0, 0.5], [0.5, 1.0]]]])
    enc = SimpleNamespace(valid_ratios=ratios[:1], spatial_shapes=((h0, w0),))
    head.forward = lambda enc: (logits[None], None)
    torch.testing.assert_close(
        head.joint_scores(enc, off, full_map=True), head.joint_scores(enc, edge, full_map=True)
    )


@pytest.mark.parametrize("num_layers", [1, 2])
def test_joint_scores_at_the_cells_equal_the_full_map(num_layers):
    """The cheap path (the last layer's query side at the 4 cells around each joint) against
    the full stride-8 map, on a random head: a padded batch, joints inside, on the border, off
    the image and on padded cells' neighbours."""
    torch.manual_seed(num_layers)
    C, K = 16, 5
    head = PETRHeatmapHead(
        dim=C, num_heads=2, ffn_dim=32, dropout=0.0, num_layers=num_layers, num_points=3,
        num_keypoints=K,
    ).eval()  # fmt: skip
    for p in head.parameters():  # a trained-looking head: offsets and weights far from init
        p.data.add_(0.3 * torch.randn_like(p))
    encoder = PETRTransformerEncoder(
        dim=C, num_heads=2, ffn_dim=32, dropout=0.0, num_layers=1, num_levels=2, num_points=2
    ).eval()  # fmt: skip
    B, sizes = 2, ((7, 11), (4, 6))
    feats = [torch.randn(B, C, h, w) for h, w in sizes]
    masks = [torch.zeros(B, h, w, dtype=torch.bool) for h, w in sizes]
    masks[0][1, 5:] = True  # image 1 valid on 5 x 8 of the 7 x 11 stride-8 map
    masks[0][1, :, 8:] = True
    masks[1][1, 3:] = True
    masks[1][1, :, 4:] = True
    kpts = torch.rand(B, 6, K, 2) * 1.4 - 0.2  # some off the image
    kpts[:, 0] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.5, 1.0]])
    with torch.no_grad():
        enc = encoder(feats, masks, [torch.randn_like(f) for f in feats])
        full = head.joint_scores(enc, kpts, full_map=True)
        cells = head.joint_scores(enc, kpts, full_map=False)
    assert full.shape == cells.shape == (B, 6, K)
    assert (full - 0.5).abs().max() > 0.05  # a non-trivial head
    torch.testing.assert_close(cells, full, atol=1e-5, rtol=0)
    # the default runs the full map (forward) only when it has no more tokens than the cells
    calls = []
    full_map = head.forward
    head.forward = lambda enc: calls.append(1) or full_map(enc)
    with torch.no_grad():
        head.joint_scores(enc, kpts[:, :1])  # 20 cells < 77 tokens
        assert not calls
        head.joint_scores(enc, kpts)  # 120 cells > 77 tokens
        assert calls


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(opera_tiny_cfg()).eval()


def test_heatmap_scores_leave_the_poses_bit_for_bit(tiny_model):
    g = torch.Generator().manual_seed(1)
    inputs = [
        {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
        for h, w in ((96, 128), (80, 112))
    ]  # fmt: skip  (a padded batch)
    with torch.no_grad():
        heat = tiny_model(inputs)
        tiny_model.joint_scores = "none"
        try:
            none = tiny_model(inputs)
        finally:
            tiny_model.joint_scores = "heatmap"
    for a, b in zip(heat, none):
        a, b = a["instances"], b["instances"]
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_keypoints[..., :2], b.pred_keypoints[..., :2])
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert (b.pred_keypoints[..., 2] == 1).all()
        conf = a.pred_keypoints[..., 2]
        assert ((conf > 0) & (conf < 1)).all() and conf.std() > 0


def test_unknown_joint_scores_mode_names_the_key():
    cfg = opera_tiny_cfg()
    cfg.MODEL.PETR.JOINT_SCORES = "peak"
    with pytest.raises(ValueError, match="MODEL.PETR.JOINT_SCORES.*'peak'"):
        build_model(cfg)


@pytest.fixture(scope="module")
def toy_split(tmp_path_factory):
    name = "petr_test_joint_scores_toy"
    register_toy_split(name, "val", num_images=6, root=str(tmp_path_factory.mktemp("toy")))
    return name, DatasetCatalog.get(name)


def _predictions_from_ground_truth(dicts, confidence):
    """Each person's ground truth, jittered 1 px, as a prediction; the joint column from
    `confidence(v)` (v the ground-truth visibility, (N, K))."""
    g = torch.Generator().manual_seed(0)
    inputs, outputs = [], []
    for d in dicts:
        anns = [a for a in d["annotations"] if max(a["keypoints"][2::3]) > 0]
        gt = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32)
        gt = gt.view(len(anns), -1, 3)  # (N, K, 3) pixels
        inst = Instances((d["height"], d["width"]))
        xy = gt[..., :2] + torch.rand(gt[..., :2].shape, generator=g) * 2 - 1
        inst.pred_keypoints = torch.cat([xy, confidence(gt[..., 2])[..., None]], -1)
        inst.pred_boxes = Boxes(torch.cat([xy.amin(1), xy.amax(1)], -1))
        inst.scores = torch.linspace(0.9, 0.5, len(anns))
        inst.pred_classes = torch.zeros(len(anns), dtype=torch.int64)
        inputs.append({"image_id": d["image_id"]})
        outputs.append({"instances": inst})
    return inputs, outputs


def _evaluate(evaluator, inputs, outputs):
    evaluator.reset()
    evaluator.process(inputs, copy.deepcopy(outputs))
    return evaluator.evaluate()


def test_keypoint_ap_ignores_the_joint_scores(toy_split, tmp_path):
    name, dicts = toy_split
    g = torch.Generator().manual_seed(2)
    ones = _predictions_from_ground_truth(dicts, lambda v: torch.ones_like(v))
    rand = _predictions_from_ground_truth(dicts, lambda v: torch.rand(v.shape, generator=g))
    evaluator = COCOEvaluator(name, tasks=("keypoints",), output_dir=str(tmp_path),
                              use_fast_impl=False, kpt_oks_sigmas=COCO_OKS_SIGMAS)  # fmt: skip
    with_ones, with_rand = _evaluate(evaluator, *ones), _evaluate(evaluator, *rand)
    assert with_ones["keypoints"]["AP"] > 50  # a real AP, not two zeros
    assert with_ones == with_rand  # bit for bit


def test_joint_confidence_evaluator_on_known_confidences(toy_split):
    name, dicts = toy_split
    evaluator = JointConfidenceEvaluator(name)
    inputs, outputs = _predictions_from_ground_truth(dicts, lambda v: v / 2)  # 0, 0.5, 1
    report = _evaluate(evaluator, inputs, outputs)["joint_confidence"]
    people = sum(max(a["keypoints"][2::3]) > 0 for d in dicts for a in d["annotations"])
    assert report["people matched"] == people
    n = {v: sum(a["keypoints"][2::3].count(v) for d in dicts for a in d["annotations"]
                if max(a["keypoints"][2::3]) > 0) for v in (0, 1, 2)}  # fmt: skip
    assert (report["joints visible"], report["joints hidden"]) == (n[2], n[1])
    assert report["joints out of frame"] == n[0] > 0  # the toy has joints out of frame
    assert report["AUC labelled vs out of frame"] == 1.0
    assert report["AUC visible vs not"] == 1.0 and report["AUC visible vs hidden"] == 1.0
    assert report["mean confidence hidden"] == 0.5
    # reversed confidences: every pair ordered wrong
    inputs, outputs = _predictions_from_ground_truth(dicts, lambda v: 1 - v / 2)
    report = _evaluate(evaluator, inputs, outputs)["joint_confidence"]
    assert report["AUC labelled vs out of frame"] == 0.0


def test_tool_reports_every_joint_of_the_matched_people(toy_split):
    name, _ = toy_split
    tool = load_tool("joint_confidence_auc")
    cfg = opera_tiny_cfg()
    cfg.DATASETS.TEST = (name,)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 160
    torch.manual_seed(0)
    report = tool.joint_confidence_auc(cfg, name, oks_threshold=0.0)  # a random model
    joints = sum(report[f"joints {v}"] for v in ("visible", "hidden", "out of frame"))
    assert report["people matched"] >= 1 and joints == 17 * report["people matched"]
    assert 0.0 <= report["AUC labelled vs out of frame"] <= 1.0
