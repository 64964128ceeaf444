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
    assert (result.pred_keypoints[..., 2] == 1).all()


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
