"""ONNX export (tools/export_onnx.py, petr.export): the onnxruntime graph must reproduce
Detectron2 inference of the same weights, and unsupported cases must fail clearly."""

import contextlib
import importlib
import io
import os
import re

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from petr_testing import load_cfg, load_tool, shrink_cfg

from petr.export import PETRONNXWrapper, compare_predictions, export_petr_onnx, run_onnxruntime

H, W = 128, 160
# Scores are sigmoids in (0, 1): float32 kernels that differ between runtimes (GEMM, conv,
# GridSample accumulation order) move them by ~1e-7; 1e-4 leaves room for other CPUs without
# hiding a wrong op. Keypoints are sigmoid(logit) * W with W = 160 px; the same kernel noise
# moves them by ~1e-4 px, while any wrong sampling or refinement step moves them by pixels.
SCORE_ATOL = 1e-4
KPT_ATOL_PX = 1e-2


def _load_tool():
    return load_tool("export_onnx")


def _perturbed_model(config, *opts):
    """A shrunk random model whose zero-initialised tensors (the last layer of every keypoint
    head, attention-weight and pose-offset predictors) get small random values: otherwise the
    decoders would return their reference points unchanged and those paths would go untested."""
    cfg = shrink_cfg(load_cfg(config))
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    cfg.merge_from_list(list(opts))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return cfg, model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Runs the CLI on a shrunk config with saved weights; returns (model, onnx path, stdout)."""
    tmp = tmp_path_factory.mktemp("onnx")
    cfg, model = _perturbed_model("petr_R50.yaml")
    weights, config, onnx_path = tmp / "w.pth", tmp / "cfg.yaml", tmp / "petr.onnx"
    torch.save({"model": model.state_dict()}, weights)
    config.write_text(cfg.dump())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = _load_tool().main(
            ["--config-file", str(config), "--output", str(onnx_path), "--verify"]
            + ["--height", str(H), "--width", str(W), "--opts", "MODEL.WEIGHTS", str(weights)]
        )
    assert rc == 0
    return model, str(onnx_path), out.getvalue()


def _detectron2_predictions(model, image):
    """The model's own inference (compiled deformable attention when petr._C is built)."""
    with torch.no_grad():
        inst = model([{"image": image[0]}])[0]["instances"]
    return {
        "scores": inst.scores.numpy(),
        "keypoints": inst.pred_keypoints.numpy(),
        "boxes": inst.pred_boxes.tensor.numpy(),
    }


def test_cli_reports_a_close_verification(exported):
    _, path, stdout = exported
    assert os.path.getsize(path) > 0
    m = re.search(r"scores (\S+), keypoints (\S+) px, boxes (\S+) px \((\d+) poses", stdout)
    assert m, stdout
    assert float(m[1]) < SCORE_ATOL and float(m[2]) < KPT_ATOL_PX and float(m[3]) < KPT_ATOL_PX
    assert int(m[4]) >= 3  # most ranks had untied scores, so keypoints were really compared


def test_onnx_matches_detectron2_inference(exported):
    model, path, _ = exported
    g = torch.Generator().manual_seed(7)  # not the image the CLI verified with
    image = torch.randint(0, 256, (1, 3, H, W), generator=g).float()
    ref = _detectron2_predictions(model, image)
    got = run_onnxruntime(path, image)
    N, K = model.detections_per_image, model.num_keypoints
    assert got["scores"].shape == (N,)
    assert got["keypoints"].shape == (N, K, 3)
    assert got["boxes"].shape == (N, 4)
    assert (np.diff(got["scores"]) <= 0).all()
    np.testing.assert_allclose(got["scores"], ref["scores"], rtol=0, atol=SCORE_ATOL)
    # Ranks whose scores are tied may swap; compare poses only where the order is unambiguous.
    s = ref["scores"]
    gap = np.abs(s[:, None] - s[None]) + np.diag(np.full(N, np.inf))
    untied = gap.min(1) > SCORE_ATOL
    assert untied.sum() >= 3
    np.testing.assert_allclose(
        got["keypoints"][untied], ref["keypoints"][untied], rtol=0, atol=KPT_ATOL_PX
    )
    np.testing.assert_allclose(got["boxes"][untied], ref["boxes"][untied], rtol=0, atol=KPT_ATOL_PX)
    kpts = got["keypoints"]
    assert (kpts[..., 0] >= 0).all() and (kpts[..., 0] <= W).all()
    assert (kpts[..., 1] >= 0).all() and (kpts[..., 1] <= H).all()
    # the joint scores (heatmap branch) are an output of the graph too
    assert ((kpts[..., 2] > 0) & (kpts[..., 2] < 1)).all()
    np.testing.assert_allclose(
        kpts[untied][..., 2], ref["keypoints"][untied][..., 2], rtol=0, atol=SCORE_ATOL
    )


def test_other_input_size_is_rejected_by_onnxruntime(exported):
    _, path, _ = exported
    with pytest.raises(Exception, match="[Ii]nvalid dimensions"):
        run_onnxruntime(path, torch.zeros(1, 3, H - 32, W))
    with pytest.raises(Exception, match="[Ii]nvalid dimensions"):
        run_onnxruntime(path, torch.zeros(2, 3, H, W))


def test_unsupported_export_requests_raise(exported, tmp_path, capsys):
    from petr.modeling.transformer import attention

    model, _, _ = exported
    dispatcher = attention.ms_deform_attn
    with pytest.raises(ValueError, match="opset 15.*GridSample.*>= 16"):
        export_petr_onnx(model, str(tmp_path / "a.onnx"), H, W, opset=15)
    with pytest.raises(SystemExit):
        _load_tool().main(["--config-file", "unused.yaml", "--opset", "15"])
    assert "GridSample" in capsys.readouterr().err
    # 96x128 gives 256 encoder tokens, fewer than 400 proposals: the model refuses it mid-trace
    _, greedy = _perturbed_model("petr_R50.yaml", "MODEL.PETR.NUM_QUERIES", 400)
    with pytest.raises(ValueError, match="256 encoder tokens.*NUM_QUERIES=400"):
        export_petr_onnx(greedy, str(tmp_path / "b.onnx"), 96, 128)
    assert attention.ms_deform_attn is dispatcher  # restored even though the export failed
    with pytest.raises(ValueError, match=r"\(1, 3, H, W\).*\(2, 3, 32, 32\)"):
        PETRONNXWrapper(model)(torch.zeros(2, 3, 32, 32))


def test_normalized_input_variant_matches_raw():
    cfg, model = _perturbed_model("petr_R50.yaml")
    image = torch.randint(0, 256, (1, 3, 64, 96), generator=torch.Generator().manual_seed(3))
    image = image.float()
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        raw = PETRONNXWrapper(model)(image)
        norm = PETRONNXWrapper(model, normalized_input=True)((image - mean) / std)
    for a, b in zip(raw, norm):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_compare_predictions_ignores_order_of_tied_poses_only():
    kpts = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)
    ref = {"scores": np.array([0.9, 0.5, 0.5, 0.1]), "keypoints": kpts, "boxes": kpts[:, :, :2]}
    swapped = {k: v[[0, 2, 1, 3]] for k, v in ref.items()}  # the two 0.5 poses trade places
    d = compare_predictions(ref, swapped)
    assert d == {"scores": 0.0, "compared": 2, "keypoints": 0.0, "boxes": 0.0}
    moved = {k: v.copy() for k, v in ref.items()}
    moved["keypoints"][3, 1, 0] += 0.5  # an untied pose that moved half a pixel
    assert compare_predictions(ref, moved)["keypoints"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="keypoints: shapes differ"):
        compare_predictions(ref, {**ref, "keypoints": kpts[:3]})


@pytest.mark.slow
def test_swin_crowdpose_export_matches_pytorch(tmp_path):
    _, model = _perturbed_model("petr_SwinL_crowdpose.yaml")
    path = str(tmp_path / "swin.onnx")
    export_petr_onnx(model, path, H, W)
    image = torch.randint(0, 256, (1, 3, H, W), generator=torch.Generator().manual_seed(1))
    image = image.float()
    d = compare_predictions(_detectron2_predictions(model, image), run_onnxruntime(path, image))
    assert d["compared"] >= 3
    assert d["scores"] < SCORE_ATOL and d["keypoints"] < KPT_ATOL_PX


def test_forward_export_and_tta_share_predict(monkeypatch, tmp_path):
    """PETR.predict is the one inference path; export forces the reference attention through
    petr.layers.deform_attn_backend and leaves the attention module's bindings alone."""
    msda = importlib.import_module("petr.layers.ms_deform_attn")  # the module, not the function
    from petr.modeling.meta_arch import PETR
    from petr.modeling.test_time_augmentation import PETRWithTTA
    from petr.modeling.transformer import attention

    cfg, model = _perturbed_model("petr_R50.yaml")
    calls, backends = [], []
    original = PETR.predict

    def predict(self, images):
        calls.append(tuple(images.tensor.shape))
        backends.append(msda.ms_deform_attn_backend("cpu"))
        return original(self, images)

    monkeypatch.setattr(PETR, "predict", predict)
    bound = attention.ms_deform_attn
    auto = msda.ms_deform_attn_backend("cpu")
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        model([{"image": image}])
    export_petr_onnx(model, str(tmp_path / "m.onnx"), 64, 96)
    assert attention.ms_deform_attn is bound
    # eager run + trace, both on the reference; the reference is not left switched on after
    assert calls[1:] == [(1, 3, 64, 96)] * 2 and backends[1:] == ["reference"] * 2
    assert msda.ms_deform_attn_backend("cpu") == auto
    cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE, cfg.TEST.AUG.FLIP = (64, 96), 160, False
    calls.clear()
    with torch.no_grad():
        PETRWithTTA(cfg, model).eval()([{"image": image}])
    assert len(calls) == 2  # one predict per view
