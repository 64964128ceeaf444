"""MODEL.PETR.COMPILE: the trainer (training and --eval-only) and the demo predictor compile the
model in place, and the compiled model keeps official parity (tests/data/opera_tiny)."""

import os

import pytest
import torch
from petr_testing import OPERA_TINY, opera_tiny_cfg, opera_tiny_model

from petr.checkpoint.opera_converter import convert_opera_checkpoint
from petr.engine import PETRTrainer
from petr.modeling.compile import compile_model


def _is_compiled(model):
    return getattr(model, "_compiled_call_impl", None) is not None


def test_compile_is_off_by_default_and_on_when_asked():
    cfg = opera_tiny_cfg()
    assert not _is_compiled(PETRTrainer.build_model(cfg))
    cfg.MODEL.PETR.COMPILE.ENABLED = True
    model = PETRTrainer.build_model(cfg)
    assert _is_compiled(model)
    assert type(model).__name__ == "PETR"  # compiled in place: same class and state-dict keys
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())


def test_unknown_compile_mode_is_rejected():
    cfg = opera_tiny_cfg()
    cfg.MODEL.PETR.COMPILE.ENABLED = True
    cfg.MODEL.PETR.COMPILE.MODE = "fastest"
    with pytest.raises(ValueError, match="MODEL.PETR.COMPILE.MODE='fastest'.*max-autotune"):
        PETRTrainer.build_model(cfg)


@pytest.mark.parametrize("has_custom_op", [True, False])
def test_dynamic_compile_is_asked_only_where_torch_can_honour_it(monkeypatch, has_custom_op):
    """torch < 2.4 compiles one graph per size whatever DYNAMIC says (see modeling/compile.py)."""
    import petr.modeling.compile as compile_module

    asked = {}
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(model, "compile", lambda **kwargs: asked.update(kwargs))
    monkeypatch.setattr(compile_module, "HAS_CUSTOM_OP", has_custom_op)
    cfg = opera_tiny_cfg()
    cfg.MODEL.PETR.COMPILE.ENABLED = True
    assert compile_model(model, cfg) is model
    assert asked == {"mode": "default", "dynamic": has_custom_op}
    cfg.MODEL.PETR.COMPILE.DYNAMIC = False
    compile_model(model, cfg)
    assert asked["dynamic"] is False


@pytest.mark.slow
def test_compiled_model_matches_the_official_outputs(tmp_path):
    weights = str(tmp_path / "petr_tiny_d2.pth")
    convert_opera_checkpoint(os.path.join(OPERA_TINY, "opera_tiny_petr.pth"), weights)
    io = torch.load(os.path.join(OPERA_TINY, "opera_tiny_io.pt"))
    model = opera_tiny_model(weights).eval()
    cfg = opera_tiny_cfg()
    cfg.MODEL.PETR.COMPILE.ENABLED = True
    compile_model(model, cfg)
    image = {"image": io["image_rgb"].permute(2, 0, 1)}
    torch._dynamo.reset()
    with torch.no_grad():
        result = model([image])[0]["instances"]
    torch.testing.assert_close(result.scores, io["scores"], rtol=0, atol=1e-5)
    torch.testing.assert_close(result.pred_keypoints[..., :2], io["keypoints"], rtol=0, atol=1e-3)
    torch.testing.assert_close(result.pred_boxes.tensor, io["boxes"], rtol=0, atol=1e-3)


def test_demo_predictor_honours_the_key(tmp_path):
    from petr.demo.predictor import PETRPredictor

    cfg = opera_tiny_cfg()
    assert not _is_compiled(PETRPredictor(cfg).model)
    cfg.MODEL.PETR.COMPILE.ENABLED = True
    assert _is_compiled(PETRPredictor(cfg).model)
