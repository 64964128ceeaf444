"""TEST.AMP: reduced-precision inference (torch.autocast) in the model's inference path.

Tolerances come from the official opera_tiny fixture (tests/data/opera_tiny, 192x256 image) on
CPU in bfloat16, measured with the stage inputs held at their float32 values (so that a
reordered top-k cannot hide or fake a difference):
  encoder memory, max |diff| / max |fp32|        0.026   -> tolerance 0.05
  pose decoder keypoints, last layer             0.88 px -> 1.25 px (bf16 sampling: 1.6 px)
  pose decoder scores (sigmoid)                  5e-4    -> 2e-3
  joint decoder keypoints                        0.16 px -> 0.5 px
  end to end, sorted scores of the top 10        0.0029  -> 0.01
End to end, keypoints are not compared rank by rank: the fixture's random weights give nearly
tied encoder scores (top 30 of 1020 tokens), bf16 reorders a few proposals, and query i pairs
its learned embedding with proposal i (the official design), so a reordered proposal yields
another pose (up to 165 px apart on this fixture).
"""

import os

import pytest
import torch
from detectron2.modeling import build_model
from petr_testing import OPERA_TINY, load_cfg, opera_tiny_cfg, opera_tiny_model, shrink_cfg

from petr.checkpoint.opera_converter import convert_opera_checkpoint
from petr.config import inference_autocast_dtype
from petr.export import PETRONNXWrapper
from petr.modeling.transformer import attention

W = 256  # the fixture image's width: normalised x -> pixels


@pytest.fixture(scope="module")
def tiny():
    """(the opera_tiny model in eval mode, its input dict)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        dst = os.path.join(d, "petr_tiny_d2.pth")
        convert_opera_checkpoint(os.path.join(OPERA_TINY, "opera_tiny_petr.pth"), dst)
        model = opera_tiny_model(dst).eval()
    io = torch.load(os.path.join(OPERA_TINY, "opera_tiny_io.pt"))
    return model, {"image": io["image_rgb"].permute(2, 0, 1)}


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_config_keys_and_errors():
    cfg = opera_tiny_cfg()
    assert cfg.TEST.AMP.ENABLED is False and inference_autocast_dtype(cfg) is None
    assert build_model(cfg).autocast_dtype is None
    cfg.TEST.AMP.ENABLED = True
    assert inference_autocast_dtype(cfg) is torch.bfloat16
    cfg.TEST.AMP.DTYPE = "float16"
    with pytest.raises(ValueError, match="TEST.AMP.DTYPE=float16 needs CUDA"):
        build_model(cfg)
    cfg.TEST.AMP.DTYPE = "float8"
    with pytest.raises(ValueError, match="TEST.AMP.DTYPE='float8'"):
        inference_autocast_dtype(cfg)


def test_float16_model_moved_to_cpu_is_an_error_naming_the_key(tiny):
    model, image = tiny
    model.autocast_dtype = torch.float16  # e.g. built for CUDA, then moved to the CPU
    try:
        with pytest.raises(ValueError, match="TEST.AMP.DTYPE=float16 needs CUDA"):
            model([image])
    finally:
        model.autocast_dtype = None


def test_fp32_default_is_plain_predict(tiny):
    """TEST.AMP off: forward gives exactly what `predict` gives outside any autocast."""
    model, image = tiny
    assert model.autocast_dtype is None
    with torch.no_grad():
        images = model.preprocess_image([image])
        expected = model.predict(images)
        got, _ = model([image], do_postprocess=False)
    assert torch.equal(got.scores, expected.scores)
    assert torch.equal(got.keypoints, expected.keypoints)


def test_bf16_end_to_end_is_float32_and_close_in_score(tiny):
    model, image = tiny
    with torch.no_grad():
        ref = model([image])[0]["instances"]
        model.autocast_dtype = torch.bfloat16
        try:
            out = model([image])[0]["instances"]
        finally:
            model.autocast_dtype = None
    assert out.scores.dtype == out.pred_keypoints.dtype == torch.float32
    assert out.pred_boxes.tensor.dtype == torch.float32
    assert len(out) == len(ref)
    # scores are sorted: compare as sorted lists (ranks may swap between near ties)
    assert (out.scores - ref.scores).abs().max() <= 0.01


def test_bf16_stage_deviations_on_the_official_fixture(tiny):
    model, image = tiny
    with torch.no_grad():
        images = model.preprocess_image([image])
        enc = model.encode(images)
        with _bf16():
            enc_b = model.encode(images)
        rel = (enc.memory - enc_b.memory.float()).abs().max() / enc.memory.abs().max()
        assert rel <= 0.05
        ref_points = model.proposals(enc)["reference_points"]
        _, logits, kpts = model.pose_decoder(enc, ref_points)
        with _bf16():
            _, logits_b, kpts_b = model.pose_decoder(enc, ref_points)
        assert (kpts[-1] - kpts_b[-1].float()).abs().max() * W <= 1.25
        assert (logits[-1].sigmoid() - logits_b[-1].float().sigmoid()).abs().max() <= 2e-3
        top = kpts[-1][0, :10]
        joint = model.joint_decoder(enc, top, [10])[-1]
        with _bf16():
            joint_b = model.joint_decoder(enc, top, [10])[-1]
        assert (joint - joint_b.float()).abs().max() * W <= 0.5


def test_deformable_attention_samples_in_float32_under_autocast(tiny, monkeypatch):
    model, image = tiny
    dtypes = set()
    op = attention.ms_deform_attn

    def recording(value, shapes, starts, locations, weights):
        dtypes.update({value.dtype, locations.dtype, weights.dtype})
        return op(value, shapes, starts, locations, weights)

    monkeypatch.setattr(attention, "ms_deform_attn", recording)
    model.autocast_dtype = torch.bfloat16
    try:
        with torch.no_grad():
            model([image])
    finally:
        model.autocast_dtype = None
    assert dtypes == {torch.float32}


def test_onnx_wrapper_stays_float32():
    """The export calls `predict` itself: a model built with TEST.AMP still exports float32."""
    cfg = shrink_cfg(load_cfg("petr_R50.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (1, 3, 96, 128)).float()
    sizes = torch.tensor([[96, 128]])
    wrapper = PETRONNXWrapper(model).eval()
    with torch.no_grad():
        ref = wrapper(image, sizes)
        model.autocast_dtype = torch.bfloat16
        out = wrapper(image, sizes)
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
