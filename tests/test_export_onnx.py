"""ONNX export (tools/export_onnx.py, petr.export): one graph for every size and batch, whose
onnxruntime results reproduce Detectron2 inference of the same weights; unsupported cases fail
clearly."""

import contextlib
import io
import os
import re

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from petr_testing import load_cfg, load_tool, shrink_cfg

from petr.export import (
    PETRONNXWrapper,
    compare_predictions,
    export_petr_onnx,
    onnx_wrapper,
    run_onnxruntime,
)

H, W = 128, 160
# Scores are sigmoids in (0, 1): float32 kernels that differ between runtimes (GEMM, conv,
# GridSample accumulation order) move them by ~1e-7; 1e-4 leaves room for other CPUs without
# hiding a wrong op. Keypoints are sigmoid(logit) * W with W ~ 160 px; the same kernel noise
# moves them by ~1e-4 px, while any wrong sampling or refinement step moves them by pixels.
SCORE_ATOL = 1e-4
KPT_ATOL_PX = 1e-2


def _perturbed_model(config="petr_R50.yaml", *opts):
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


def _images(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]


def _padded(images, fill=0.0):
    """The graph's input: images padded bottom/right with `fill`, and their sizes."""
    sizes = [tuple(im.shape[-2:]) for im in images]
    batch = torch.full((len(images), 3, max(h for h, _ in sizes), max(w for _, w in sizes)), fill)
    for i, (im, (h, w)) in enumerate(zip(images, sizes)):
        batch[i, :, :h, :w] = im
    return batch, torch.tensor(sizes, dtype=torch.int64)


def _detectron2_predictions(model, images):
    """The model's own inference, through the back door (compiled attention when built)."""
    with torch.no_grad():
        out = [r["instances"] for r in model([{"image": im} for im in images])]
    return {
        "scores": np.stack([i.scores.numpy() for i in out]),
        "keypoints": np.stack([i.pred_keypoints.numpy() for i in out]),
        "boxes": np.stack([i.pred_boxes.tensor.numpy() for i in out]),
    }


def _wrapper_predictions(wrapper, image, sizes):
    with onnx_wrapper.deform_attn_backend("reference"), torch.no_grad():
        outs = wrapper(image, sizes)
    return {k: v.numpy() for k, v in zip(onnx_wrapper.OUTPUT_NAMES, outs)}


def _assert_close(d):
    assert d["compared"] >= 3, d  # most ranks had untied scores, so keypoints were compared
    assert d["scores"] < SCORE_ATOL and d["keypoints"] < KPT_ATOL_PX and d["boxes"] < KPT_ATOL_PX


def test_wrapper_on_a_padded_batch_equals_detectron2_inference():
    """The graph's computation (front door from a size tensor, predict, tensor back door) on a
    padded batch of 2 images of different sizes equals the per-image Instances of forward."""
    _, model = _perturbed_model()
    images = _images([(H, W), (96, 176)], seed=1)
    got = _wrapper_predictions(PETRONNXWrapper(model), *_padded(images))
    N, K = model.detections_per_image, model.num_keypoints
    assert got["scores"].shape == (2, N) and got["keypoints"].shape == (2, N, K, 3)
    _assert_close(compare_predictions(_detectron2_predictions(model, images), got))
    # the second image's poses lie inside its own 96x176 input, not the 128x176 padded batch
    assert got["keypoints"][1, ..., 1].max() <= 96
    # the joint scores (heatmap branch) are an output of the graph too
    joint = got["keypoints"][..., 2]
    assert ((joint > 0) & (joint < 1)).all()
    # whatever the caller pads with, the network sees the front door's zero padding
    other = _wrapper_predictions(PETRONNXWrapper(model), *_padded(images, fill=255.0))
    for name in onnx_wrapper.OUTPUT_NAMES:
        np.testing.assert_array_equal(other[name], got[name])


def test_oks_nms_zeroes_exactly_the_scores_postprocess_drops(monkeypatch):
    from petr.modeling.structures import PETRPredictions

    _, model = _perturbed_model("petr_R50.yaml", "MODEL.PETR.OKS_NMS_THRESH_TEST", 0.5)
    N, K = model.detections_per_image, model.num_keypoints
    g = torch.Generator().manual_seed(2)
    base = torch.rand(2, N, K, 2, generator=g) * 0.3 + 0.2
    # near-duplicates of the first pose in image 0 (ranks 1, 3) and of rank 1 in image 1 (rank 4)
    base[0, 1] = base[0, 0] + 0.002
    base[0, 3] = base[0, 0] - 0.003
    base[1, 4] = base[1, 1] + 0.001
    fixed = PETRPredictions(torch.linspace(0.9, 0.1, N).repeat(2, 1), base)
    monkeypatch.setattr(model, "predict", lambda images: fixed)
    images = _images([(H, W), (112, 144)], seed=2)
    got = _wrapper_predictions(PETRONNXWrapper(model), *_padded(images))
    dropped = np.zeros((2, N), bool)
    dropped[0, [1, 3]] = dropped[1, 4] = True
    np.testing.assert_array_equal(got["scores"] == 0, dropped)
    with torch.no_grad():
        kept = [r["instances"] for r in model([{"image": im} for im in images])]
    for b, inst in enumerate(kept):
        alive = got["scores"][b] > 0
        np.testing.assert_allclose(got["scores"][b][alive], inst.scores.numpy(), atol=1e-6)
        np.testing.assert_allclose(
            got["keypoints"][b][alive], inst.pred_keypoints.numpy(), atol=KPT_ATOL_PX
        )


def test_unsupported_export_requests_raise(tmp_path, capsys):
    from petr.modeling.transformer import attention

    _, model = _perturbed_model()
    dispatcher = attention.ms_deform_attn
    with pytest.raises(ValueError, match="opset 15.*GridSample.*>= 16"):
        export_petr_onnx(model, str(tmp_path / "a.onnx"), H, W, opset=15)
    with pytest.raises(SystemExit):
        load_tool("export_onnx").main(["--config-file", "unused.yaml", "--opset", "15"])
    assert "GridSample" in capsys.readouterr().err
    if onnx_wrapper.DYNAMIC_EXPORT:
        with pytest.raises(ValueError, match="Export size 48x160: H and W must be >= 65"):
            export_petr_onnx(model, str(tmp_path / "c.onnx"), 48, W)
    # 96x128 gives 256 encoder tokens, fewer than 400 proposals: the model refuses it
    _, greedy = _perturbed_model("petr_R50.yaml", "MODEL.PETR.NUM_QUERIES", 400)
    with pytest.raises(ValueError, match="encoder tokens.*NUM_QUERIES=400"):
        export_petr_onnx(greedy, str(tmp_path / "b.onnx"), 96, 128)
    assert attention.ms_deform_attn is dispatcher  # restored even though the export failed


def test_export_traces_the_reference_attention_with_dynamic_shapes(monkeypatch, tmp_path):
    """The exporter sees the reference deformable attention, and on torch >= 2.6 a dynamic
    batch, height and width (the export itself is the slow test's business)."""
    from petr.layers import ms_deform_attn_backend

    _, model = _perturbed_model()
    seen, auto = {}, ms_deform_attn_backend("cpu")

    def fake_export(module, args, path, **kwargs):
        seen.update(kwargs, backend=ms_deform_attn_backend("cpu"), shapes=[a.shape for a in args])

    monkeypatch.setattr(torch.onnx, "export", fake_export)
    export_petr_onnx(model, str(tmp_path / "m.onnx"), H, W, max_size=512, max_batch=8)
    assert seen["backend"] == "reference" and ms_deform_attn_backend("cpu") == auto
    # two images of different sizes for torch.export; the tracer freezes the one it sees
    B = 2 if onnx_wrapper.DYNAMIC_EXPORT else 1
    assert seen["shapes"] == [(B, 3, H, W), (B, 2)]
    assert seen["input_names"] == ["image", "image_sizes"]
    if onnx_wrapper.DYNAMIC_EXPORT:
        dims = seen["dynamic_shapes"]
        assert (
            seen["dynamo"] and set(dims["image"]) == {0, 2, 3} and set(dims["image_sizes"]) == {0}
        )
        assert dims["image"][0] is dims["image_sizes"][0]  # one batch dimension
        assert (dims["image"][2].min, dims["image"][2].max, dims["image"][0].max) == (65, 512, 8)


def test_compare_predictions_ignores_order_of_tied_poses_only():
    kpts = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)
    ref = {"scores": np.array([0.9, 0.5, 0.5, 0.1]), "keypoints": kpts, "boxes": kpts[:, :, :2]}
    swapped = {k: v[[0, 2, 1, 3]] for k, v in ref.items()}  # the two 0.5 poses trade places
    d = compare_predictions(ref, swapped)
    assert d == {"scores": 0.0, "compared": 2, "keypoints": 0.0, "boxes": 0.0}
    moved = {k: v.copy() for k, v in ref.items()}
    moved["keypoints"][3, 1, 0] += 0.5  # an untied pose that moved half a pixel
    assert compare_predictions(ref, moved)["keypoints"] == pytest.approx(0.5)
    batch = compare_predictions({k: v[None].repeat(2, 0) for k, v in ref.items()},
                                {k: np.stack([ref[k], moved[k]]) for k in ref})  # fmt: skip
    assert batch["keypoints"] == pytest.approx(0.5) and batch["compared"] == 4
    with pytest.raises(ValueError, match="keypoints: shapes differ"):
        compare_predictions(ref, {**ref, "keypoints": kpts[:3]})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The CLI's dynamic export (minutes of CPU on 2 cores) with --verify, of a shrunk random
    model saved with its config. Returns (cfg, model, config file, onnx path, stdout)."""
    tmp = tmp_path_factory.mktemp("onnx")
    cfg, model = _perturbed_model()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 112, 192  # the predictors' test resize
    weights, config, path = tmp / "w.pth", tmp / "cfg.yaml", tmp / "petr.onnx"
    torch.save({"model": model.state_dict()}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    config.write_text(cfg.dump())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = load_tool("export_onnx").main(
            ["--config-file", str(config), "--output", str(path), "--verify", "--max-size", "640"]
            + ["--height", str(H), "--width", str(W)]
        )
    assert rc == 0 and os.path.getsize(path) > 0
    return cfg, model, str(config), str(path), out.getvalue()


@pytest.mark.slow
@pytest.mark.skipif(
    not onnx_wrapper.DYNAMIC_EXPORT,
    reason="torch < 2.6: the TorchScript tracer exports one fixed size and batch 1, not the "
    "dynamic graph this test checks (tests/test_quantize.py exports a fixed graph there)",
)
def test_cli_exports_one_graph_for_every_size_and_batch(exported):
    """--verify passes at 3 other sizes and on a padded batch; onnxruntime then matches
    Detectron2 inference at yet other sizes and batch sizes."""
    _, model, _, path, stdout = exported
    lines = re.findall(r"verify (.*) \(onnx.*scores (\S+), keypoints (\S+) px, boxes (\S+) px "
                       r"\((\d+) poses", stdout)  # fmt: skip
    assert len(lines) == (4 if onnx_wrapper.DYNAMIC_EXPORT else 1), stdout
    for sizes, s, k, b, n in lines:
        assert float(s) < SCORE_ATOL and float(k) < KPT_ATOL_PX and float(b) < KPT_ATOL_PX, sizes
        assert int(n) >= 3
    if not onnx_wrapper.DYNAMIC_EXPORT:
        with pytest.raises(Exception, match="[Ii]nvalid dimensions"):
            run_onnxruntime(path, torch.zeros(2, 3, H - 32, W))
        return
    for sizes in ([(96, 200)], [(144, 112), (100, 160), (130, 130)]):
        images = _images(sizes, seed=3)
        got = run_onnxruntime(path, *_padded(images))
        _assert_close(compare_predictions(_detectron2_predictions(model, images), got))


def _innermost_broadcast_run(shapes):
    """Elements in the run of trailing axes right of the rightmost axis that an elementwise op
    broadcasts (None: no broadcast; 1: one operand is constant over each run, which onnxruntime
    handles as a scalar; a symbolic axis counts as long)."""
    rank = max(len(s) for s in shapes)
    shapes = [[1] * (rank - len(s)) + list(s) for s in shapes if len(s)]
    for axis in range(rank - 1, -1, -1):
        dims = [s[axis] for s in shapes]
        if 1 in dims and any(d != 1 for d in dims):
            tail = [max(s[a] for s in shapes) if all(isinstance(s[a], int) for s in shapes)
                    else 10**6 for a in range(axis + 1, rank)]  # fmt: skip
            return int(np.prod(tail))
    return None


@pytest.mark.slow
@pytest.mark.skipif(
    not onnx_wrapper.DYNAMIC_EXPORT,
    reason="the floor stack exports a fixed graph through the tracer; this checks the dynamic "
    "graph that tools/benchmark.py --backends times (and the export fixture is not built there)",
)
def test_exported_broadcasts_suit_onnxruntime(exported):
    """onnxruntime walks a broadcast whose operand varies within a short innermost run element
    pair by element pair: the sampling-location arithmetic (6-D, per attention layer) took
    8-10 ms per op for the toy model's encoder that way (onnxruntime's profile, 1 thread). Its
    operands are expanded first, so every 6-D elementwise op runs over at least L * P * 2
    elements; masked_fill's mask is expanded to its data's shape (Where)."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load(exported[3], load_external_data=False))
    graph = graph.graph
    known = {v.name: v.type.tensor_type.shape for v in [*graph.value_info, *graph.input]}
    known_dims = {i.name: list(i.dims) for i in graph.initializer}

    def shape(name):
        if name in known_dims:
            return known_dims[name]
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in known[name].dim]

    six_d = where = 0
    for node in graph.node:
        if node.op_type in ("Add", "Sub", "Mul", "Div"):
            shapes = [shape(i) for i in node.input]
            if max(len(s) for s in shapes) == 6:
                six_d += 1
                run = _innermost_broadcast_run(shapes)
                assert run in (None, 1) or run >= 8, (node.name, shapes)
        elif node.op_type == "Where":
            cond, data = shape(node.input[0]), shape(node.input[2])
            if len(data) == 3:  # (B, tokens, C) masked_fill
                where += 1
                assert cond[-1] == data[-1], (node.name, cond, data)
    assert six_d >= 8 and where >= 2  # every attention layer's arithmetic was looked at


def _assert_same_instances(got, want):
    assert got.image_size == want.image_size and len(got) == len(want)
    np.testing.assert_allclose(got.scores.numpy(), want.scores.numpy(), atol=SCORE_ATOL)
    s = want.scores.numpy()
    untied = (np.abs(s[:, None] - s[None]) + np.diag(np.full(len(s), np.inf))).min(1) > SCORE_ATOL
    assert untied.sum() >= 3
    for name in ("pred_keypoints", "pred_boxes"):
        a, b = (np.asarray(getattr(i, name).tensor if name == "pred_boxes" else getattr(i, name))
                for i in (got, want))  # fmt: skip
        np.testing.assert_allclose(a[untied], b[untied], rtol=0, atol=KPT_ATOL_PX)


@pytest.mark.slow
@pytest.mark.skipif(not onnx_wrapper.DYNAMIC_EXPORT, reason="the floor stack's graph is fixed")
def test_onnx_predictor_and_demo_match_petr_predictor(exported, tmp_path):
    """PETRONNXPredictor (front door, onnxruntime, model-free back door) returns the Instances
    of PETRPredictor on an image and on every frame of a short video; demo --onnx draws."""
    import cv2

    from petr.demo.predictor import PETRPredictor
    from petr.export import PETRONNXPredictor

    cfg, _, config, path, _ = exported
    onnx_predictor, predictor = PETRONNXPredictor(cfg, path), PETRPredictor(cfg)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    _assert_same_instances(onnx_predictor(image)["instances"], predictor(image)["instances"])
    video_path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(video_path, cv2.VideoWriter_fourcc(*"MJPG"), 5, (240, 180))
    for _ in range(3):
        writer.write(rng.integers(0, 256, (180, 240, 3), dtype=np.uint8))
    writer.release()
    video, frames = cv2.VideoCapture(video_path), 0
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frames += 1
        got, want = onnx_predictor(frame)["instances"], predictor(frame)["instances"]
        _assert_same_instances(got, want)
    assert frames == 3
    out = tmp_path / "drawn"
    argv = ["--config-file", config, "--onnx", path, "--video-input", video_path]
    assert load_tool("demo").main(argv + ["--output", str(out) + os.sep]) == 0
    assert os.path.getsize(out / "clip.mp4") > 0
    cv2.imwrite(str(tmp_path / "person.png"), image)
    argv = ["--config-file", config, "--onnx", path, "--input", str(tmp_path / "person.png")]
    assert load_tool("demo").main(argv + ["--output", str(out / "person.png")]) == 0
    assert cv2.imread(str(out / "person.png")).shape == image.shape


@pytest.mark.slow
@pytest.mark.skipif(not onnx_wrapper.DYNAMIC_EXPORT, reason="the floor stack's graph is fixed")
def test_backends_benchmark_times_the_exported_graph_against_eager_pytorch(exported, monkeypatch):
    """benchmark --backends: onnxruntime runs the computation eager PyTorch runs (same scores on
    the same input), and its memory is measured in a process that never imports torch."""
    import shutil

    import petr.export
    from petr.benchmark.backends import run_backends

    _, _, config, path, _ = exported
    exports = []  # the export itself is test_cli_exports_one_graph_for_every_size_and_batch's

    def reuse_export(model, out, height, width):
        exports.append((height, width))
        assert os.path.basename(out) == os.path.basename(path)  # the weights file's name follows
        for suffix in ("", ".data"):  # the exporter keeps the weights in petr.onnx.data
            if os.path.exists(path + suffix):
                shutil.copy(path + suffix, out + suffix)

    monkeypatch.setattr(petr.export, "export_petr_onnx", reuse_export)
    spec = dict(config_file=config, opts=[], height=H, width=W, warmup=1, iters=2, threads=1)
    result = run_backends(spec)
    assert exports == [(H, W)]
    ort, pt = result["onnxruntime"], result["torch"]
    assert ort["max_score_diff"] < SCORE_ATOL
    assert not ort["torch_imported"] and pt["torch_imported"]
    for r in (ort, pt):
        assert 0 < r["ms_min"] <= r["ms"]
        assert r["peak_rss_mib"] > r["import_rss_mib"] > 0
    tool = load_tool("benchmark")
    args = tool.build_parser().parse_args(
        ["--config-file", config, "--height", str(H), "--width", str(W), "--threads", "1"]
    )
    rows = [ln.split("|")[1:-1] for ln in tool.format_backends(args, result).splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["torch", "onnxruntime"]
    speed, mem = float(rows[1][4]), float(rows[1][6])
    assert speed == pytest.approx(pt["ms"] / ort["ms"], abs=0.01)
    assert mem == pytest.approx(ort["peak_rss_mib"] / pt["peak_rss_mib"], abs=0.01)
