"""Builds every shipped config and runs training steps and inference on CPU."""

import pytest
import torch
from detectron2.modeling import build_model
from petr_testing import load_cfg, shrink_cfg

from petr.data.synthetic import random_person_batch

CONFIGS = [
    "petr_R50.yaml",
    "petr_R101.yaml",
    "petr_SwinL.yaml",
    "petr_SwinL_crowdpose.yaml",
]


def _tiny_model(config="petr_R50.yaml", **overrides):
    cfg = shrink_cfg(load_cfg(config))
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    for k, v in overrides.items():
        setattr(cfg.MODEL.PETR, k, v)
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_builds_at_full_size(config):
    cfg = load_cfg(config)
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    cfg.MODEL.DEVICE = "meta"  # full-size shapes without allocating 200M parameters
    with torch.device("meta"):
        model = build_model(cfg)
    K = 14 if "crowdpose" in config else 17
    assert model.num_keypoints == K
    assert len(model.pose_decoder.layers) == cfg.MODEL.PETR.POSE_DEC_LAYERS
    assert len(model.joint_decoder.layers) == cfg.MODEL.PETR.JOINT_DEC_LAYERS
    # the pose attention samples one point per keypoint: 8 heads x 4 levels x K x 2 offsets
    assert model.pose_decoder.layers[0].cross_attn.sampling_offsets.out_features == 8 * 4 * K * 2


@pytest.mark.parametrize("config", CONFIGS)
def test_training_step_reaches_every_parameter(config):
    model = _tiny_model(config).train()
    K = model.num_keypoints
    batch = random_person_batch(K, [(96, 128), (80, 112)], [3, 0], seed=1)
    losses = model(batch)
    Ld, Lj = len(model.pose_decoder.layers), len(model.joint_decoder.layers)
    assert len(losses) == 2 + 3 * Ld + 2 * Lj + 1
    for name, value in losses.items():
        assert torch.isfinite(value), name
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    nonfinite = [n for n, p in model.named_parameters() if p.grad is not None
                 and not torch.isfinite(p.grad).all()]  # fmt: skip
    assert not nonfinite


def test_batch_without_people_trains_as_negatives():
    model = _tiny_model().train()
    batch = random_person_batch(17, [(96, 128), (96, 96)], [0, 0], seed=2)
    losses = model(batch)
    # no positives: only the classification and heatmap terms can be non-zero
    for name, value in losses.items():
        assert torch.isfinite(value), name
        if "cls" not in name and name != "loss_hm":
            assert value.item() == 0.0, name
    assert losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_inference_unpadded_and_padded_batch():
    model = _tiny_model().eval()
    big = random_person_batch(17, [(112, 144)], [0], seed=3)[0]
    small = random_person_batch(17, [(80, 96)], [0], seed=4)[0]
    for x in (big, small):
        del x["instances"]
    # the original image was twice as large: predictions come back in its pixels
    big["height"], big["width"] = 224, 288
    with torch.no_grad():
        alone = model([big])[0]["instances"]
        both = model([big, small])
    assert alone.image_size == (224, 288)
    assert len(alone) == model.detections_per_image
    kpts = alone.pred_keypoints
    assert kpts.shape == (5, 17, 3)
    assert (kpts[..., 0] >= 0).all() and (kpts[..., 0] <= 288).all()
    assert (kpts[..., 1] >= 0).all() and (kpts[..., 1] <= 224).all()
    assert ((kpts[..., 2] > 0) & (kpts[..., 2] < 1)).all()  # MODEL.PETR.JOINT_SCORES heatmap
    boxes = alone.pred_boxes.tensor
    assert torch.equal(boxes[:, 0], kpts[..., 0].amin(1))
    assert torch.equal(boxes[:, 3], kpts[..., 1].amax(1))
    assert (alone.scores[:-1] >= alone.scores[1:]).all()
    # the largest image is not padded in the batch, so its result must not change
    torch.testing.assert_close(both[0]["instances"].pred_keypoints, kpts, rtol=0, atol=1e-4)
    torch.testing.assert_close(both[0]["instances"].scores, alone.scores, rtol=0, atol=1e-6)
    padded = both[1]["instances"]
    assert padded.image_size == (80, 96)
    assert (padded.pred_keypoints[..., 0] <= 96).all()
    assert (padded.pred_keypoints[..., 1] <= 80).all()


def test_wrong_keypoint_count_is_reported():
    model = _tiny_model().train()
    batch = random_person_batch(14, [(96, 128)], [2], seed=5)
    batch[0]["file_name"] = "crowd.jpg"
    with pytest.raises(ValueError, match="crowd.jpg.*14 keypoints.*17"):
        model(batch)


def test_every_process_joins_the_same_collectives(monkeypatch):
    """Loss normalisers are averaged across processes: a process whose images have no people must
    make exactly the same all_reduce calls as one with people, or DDP training deadlocks."""
    from petr.modeling import losses as losses_module

    calls = []
    monkeypatch.setattr(losses_module, "reduce_mean", lambda v: calls.append(1) or v)
    model = _tiny_model().train()
    counts = []
    for people in ([3, 1], [0, 0]):
        calls.clear()
        model(random_person_batch(17, [(96, 128), (80, 112)], people, seed=6))
        counts.append(len(calls))
    assert counts[0] == counts[1] > 0
