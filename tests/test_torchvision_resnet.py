"""torchvision ResNet weights initialise the R50 config's backbone exactly."""

import subprocess
import sys

import pytest
import torch
import torchvision
from detectron2.modeling import build_model
from petr_testing import REPO_ROOT, load_cfg

from petr.checkpoint.checkpointer import PETRCheckpointer
from petr.checkpoint.torchvision_resnet import convert_torchvision_resnet


def test_converted_torchvision_resnet50_gives_the_same_features(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().eval()  # random weights: no download
    with torch.no_grad():  # non-trivial BN statistics, so a misplaced buffer shows
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    src, dst = tmp_path / "tv.pth", tmp_path / "d2.pth"
    torch.save(tv.state_dict(), src)
    tool = [sys.executable, "tools/convert_torchvision_resnet.py", str(src), str(dst)]
    proc = subprocess.run(tool, cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

    cfg = load_cfg("petr_R50.yaml")
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    cfg.MODEL.WEIGHTS = str(dst)
    model = build_model(cfg).eval()
    PETRCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    backbone_keys = {k for k in model.state_dict() if k.startswith("backbone.")}
    assert set(torch.load(dst, weights_only=True)["model"]) == backbone_keys

    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ours = model.backbone(x)
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        h = tv.layer1(h)
        for name, layer in (("res3", tv.layer2), ("res4", tv.layer3), ("res5", tv.layer4)):
            h = layer(h)
            torch.testing.assert_close(ours[name], h, rtol=1e-4, atol=1e-4)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="'head.weight'"):
        convert_torchvision_resnet({"conv1.weight": torch.zeros(64, 3, 7, 7),
                                    "head.weight": torch.zeros(1)})  # fmt: skip
