"""The acceptance test: the official opera_tiny checkpoint, converted with our converter and loaded
through MODEL.WEIGHTS, reproduces the official outputs and training losses.

Fixture: tests/data/opera_tiny/ (a copy of shared/reference/opera_tiny; see its README).
"""

import os

import pytest
import torch
from petr_testing import OPERA_TINY, opera_tiny_model

from petr.checkpoint.opera_converter import convert_opera_checkpoint
from petr.data.synthetic import make_instances
from petr.modeling.criterion import opera_loss_key


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("opera_tiny") / "petr_tiny_d2.pth")
    convert_opera_checkpoint(os.path.join(OPERA_TINY, "opera_tiny_petr.pth"), dst)
    return dst


@pytest.fixture(scope="module")
def io():
    return torch.load(os.path.join(OPERA_TINY, "opera_tiny_io.pt"))


def test_every_stage_matches_the_official_outputs(converted, io):
    model = opera_tiny_model(converted).eval()
    image = {"image": io["image_rgb"].permute(2, 0, 1)}  # its own size: no resize, no padding
    with torch.no_grad():
        enc = model.encode(model.preprocess_image([image]))
        proposals = model.proposals(enc)
        _, logits, kpts = model.pose_decoder(enc, proposals["reference_points"])
        result = model([image])[0]["instances"]
    close = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(proposals["enc_logits"][0, :, 0], io["enc_logits"], **close)
    torch.testing.assert_close(logits[:, 0, :, 0], io["pose_logits"], **close)
    torch.testing.assert_close(kpts[:, 0], io["pose_kpts"], **close)
    torch.testing.assert_close(result.scores, io["scores"], **close)
    torch.testing.assert_close(result.pred_keypoints[..., :2], io["keypoints"], rtol=0, atol=1e-3)
    torch.testing.assert_close(result.pred_boxes.tensor, io["boxes"], rtol=0, atol=1e-3)
    # the joint scores are the official heatmap branch's (see below), not part of the fixture
    assert ((result.pred_keypoints[..., 2] > 0) & (result.pred_keypoints[..., 2] < 1)).all()


def test_joint_scores_come_from_the_official_heatmap_weights(converted, io):
    """The confidences read the converted heatmap branch: each is the sigmoid of its joint's
    heatmap logit, bilinearly interpolated (by hand here) at the joint, and they move when
    those weights move while the poses (scores, keypoints) do not."""
    model = opera_tiny_model(converted).eval()
    image = {"image": io["image_rgb"].permute(2, 0, 1)}  # its own size: no resize, no padding
    H, W = io["image_rgb"].shape[:2]
    with torch.no_grad():
        enc = model.encode(model.preprocess_image([image]))
        logits = model.heatmap_head(enc)[0][0].double()  # (K, H0, W0)
        result = model([image])[0]["instances"]
        head = model.heatmap_head.predictor
        head.bias += 1.0
        moved = model([image])[0]["instances"]
        head.bias -= 1.0
    conf = result.pred_keypoints[..., 2].double()  # (N, K)
    K, h0, w0 = logits.shape
    # cell centres at (i + 0.5) / size of the map; beyond the outer centres, the border value
    xy = (result.pred_keypoints[..., :2].double() - model.output_pixel_offset) / torch.tensor(
        [W, H]
    )
    x = (xy[..., 0] * w0 - 0.5).clamp(0, w0 - 1)
    y = (xy[..., 1] * h0 - 0.5).clamp(0, h0 - 1)
    x0, y0 = x.floor().long(), y.floor().long()
    x1, y1 = (x0 + 1).clamp(max=w0 - 1), (y0 + 1).clamp(max=h0 - 1)
    fx, fy = x - x0, y - y0
    k = torch.arange(K)[None]
    at = lambda yy, xx: logits[k, yy, xx]  # noqa: E731
    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    torch.testing.assert_close(conf, (top * (1 - fy) + bottom * fy).sigmoid(), rtol=0, atol=1e-5)
    assert (moved.pred_keypoints[..., 2] > result.pred_keypoints[..., 2]).all()
    torch.testing.assert_close(moved.scores, io["scores"], rtol=0, atol=1e-5)
    torch.testing.assert_close(moved.pred_keypoints[..., :2], io["keypoints"], rtol=0, atol=1e-3)


def test_training_losses_match_the_official_values(converted):
    model = opera_tiny_model(converted).train()
    fixture = torch.load(os.path.join(OPERA_TINY, "opera_tiny_train_batch.pt"))
    batch = [
        {"image": img.permute(2, 0, 1), "instances": make_instances(kp, ar, img.shape[:2])}
        for img, kp, ar in zip(fixture["images_rgb"], fixture["keypoints"], fixture["areas"])
    ]
    losses = model(batch)
    official = {opera_loss_key(k): v for k, v in fixture["losses"].items()}
    assert set(losses) == set(official)
    for key, value in official.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-4), key
    # and the losses train: every trainable parameter gets a finite gradient
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
