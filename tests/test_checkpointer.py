"""PETRCheckpointer (MODEL.WEIGHTS): official opera checkpoints converted in memory, loading that
runs no code from the file on every torch, and clear errors for files that cannot be loaded."""

import os
import pickle
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from petr_testing import OPERA_TINY, captured_log, load_tool, opera_tiny_cfg

from petr.checkpoint.checkpointer import CheckpointError, PETRCheckpointer
from petr.demo.predictor import PETRPredictor
from petr.engine import PETRTrainer, build_petr_optimizer
from petr.utils.compat import torch_load

RAW = os.path.join(OPERA_TINY, "opera_tiny_petr.pth")


@pytest.fixture(scope="module")
def io():
    return torch.load(os.path.join(OPERA_TINY, "opera_tiny_io.pt"), weights_only=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("conv") / "tiny_d2.pth")
    assert load_tool("convert_opera_checkpoint").main([RAW, dst]) == 0
    return dst


def _outputs(model, io):
    with torch.no_grad():
        inst = model.eval()([{"image": io["image_rgb"].permute(2, 0, 1)}])[0]["instances"]
    return inst.scores, inst.pred_keypoints, inst.pred_boxes.tensor


def test_raw_official_checkpoint_as_model_weights_equals_the_converter(converted, io):
    via_tool = build_model(opera_tiny_cfg())
    PETRCheckpointer(via_tool).load(converted)
    direct = build_model(opera_tiny_cfg())
    with captured_log("fvcore") as messages:
        PETRCheckpointer(direct).load(RAW)
    (note,) = [m for m in messages if "official opera PETR checkpoint" in m]
    assert "ResNet-50" in note and "converted it in memory (496 tensors)" in note
    a, b = via_tool.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(_outputs(via_tool, io), _outputs(direct, io)):
        assert torch.equal(x, y)
    # and they are the official outputs (tests/test_opera_parity.py checks every stage)
    torch.testing.assert_close(_outputs(direct, io)[0], io["scores"], rtol=0, atol=1e-5)


def test_trainer_eval_only_and_demo_predictor_take_the_raw_checkpoint(converted, io, tmp_path):
    cfg = opera_tiny_cfg()
    cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR = RAW, str(tmp_path)
    reference = build_model(opera_tiny_cfg())
    PETRCheckpointer(reference).load(converted)
    model = PETRTrainer.build_model(cfg)
    PETRCheckpointer.from_config(cfg, model, str(tmp_path)).resume_or_load(RAW, resume=False)
    for x, y in zip(_outputs(reference, io), _outputs(model, io)):
        assert torch.equal(x, y)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 192, 256  # the fixture's own size
    predictor = PETRPredictor(cfg)
    out = predictor(io["image_rgb"].numpy()[:, :, ::-1].copy())["instances"]  # BGR in
    torch.testing.assert_close(out.scores, _outputs(reference, io)[0], rtol=0, atol=0)


def test_unreadable_files_name_the_path(tmp_path):
    model = build_model(opera_tiny_cfg())
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(RAW, "rb").read()[:5000])
    for path in (garbage, truncated):
        with pytest.raises(CheckpointError, match=f"{path}: not a readable PyTorch checkpoint"):
            PETRCheckpointer(model).load(str(path))
    with pytest.raises(CheckpointError, match="missing.pth: no such file"):
        PETRCheckpointer(model).load(str(tmp_path / "missing.pth"))


def test_a_checkpoint_filling_less_than_half_names_file_config_and_what_is_missing(tmp_path):
    cfg = opera_tiny_cfg()
    model = build_model(cfg)
    sd = model.state_dict()
    path = tmp_path / "neck_only.pth"
    torch.save({"model": {k: v for k, v in sd.items() if k.startswith("neck.")}}, path)
    with pytest.raises(CheckpointError) as err:
        PETRCheckpointer.from_config(cfg, model, config_file="tiny.yaml").load(str(path))
    message = str(err.value)
    assert f"Checkpoint {path} fills only" in message and "config tiny.yaml" in message
    assert "MODEL.BACKBONE.NAME build_resnet_backbone" in message
    assert "backbone.res4.*.conv1.weight (6)" in message  # missing tensors, grouped
    assert "MODEL.PETR.ALLOW_PARTIAL_WEIGHTS" in message
    cfg.MODEL.PETR.ALLOW_PARTIAL_WEIGHTS = True
    PETRCheckpointer.from_config(cfg, model).load(str(path))  # asked for: a warning only
    assert torch.equal(model.state_dict()["neck.convs.0.weight"], sd["neck.convs.0.weight"])


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # would create a file when unpickled


def test_our_training_checkpoints_load_and_foreign_code_never_runs(tmp_path):
    cfg = opera_tiny_cfg()
    cfg.SOLVER.MAX_ITER = 10
    model = build_model(cfg)
    optimizer = build_petr_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    ckpt = PETRCheckpointer(model, str(tmp_path), optimizer=optimizer, scheduler=scheduler)
    ckpt.save("model_0000001", iteration=1, seed=np.int64(3))
    fresh = build_model(cfg)
    opt2 = build_petr_optimizer(cfg, fresh)
    sched2 = build_lr_scheduler(cfg, opt2)
    extra = PETRCheckpointer(fresh, str(tmp_path), optimizer=opt2, scheduler=sched2).load(
        str(tmp_path / "model_0000001.pth")
    )
    assert extra["iteration"] == 1
    assert sched2.state_dict() == scheduler.state_dict()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": model.state_dict(), "payload": _RunsCode(str(marker))}, evil)
    PETRCheckpointer(build_model(cfg)).load(str(evil))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch_load(str(evil))  # without placeholders the unknown global is refused
    assert not marker.exists()
    loaded = torch_load(str(evil), placeholders=True)
    assert type(loaded["payload"]).__name__ == "open" and not marker.exists()


@pytest.mark.parametrize("zipfile", [True, False])
def test_classes_that_are_not_installed_become_placeholders(tmp_path, zipfile):
    # Official checkpoints may pickle mmcv objects in `meta`, in either file format.
    fake = type(sys)("mmcv_not_installed_here")

    class Hooks:
        pass

    Hooks.__module__, Hooks.__qualname__ = fake.__name__, "Hooks"
    fake.Hooks = Hooks
    sys.modules[fake.__name__] = fake
    hooks = Hooks()
    hooks.last_ckpt = "epoch_100.pth"
    path = tmp_path / "meta.pth"
    try:
        torch.save({"state_dict": {"x": torch.ones(2)}, "meta": {"hooks": hooks, "epoch": 100}},
                   path, _use_new_zipfile_serialization=zipfile)  # fmt: skip
    finally:
        del sys.modules[fake.__name__]
    loaded = torch_load(str(path), placeholders=True)
    assert torch.equal(loaded["state_dict"]["x"], torch.ones(2)) and loaded["meta"]["epoch"] == 100
    assert repr(loaded["meta"]["hooks"]) == "<placeholder mmcv_not_installed_here.Hooks>"
