"""tools/benchmark.py on a shrunk config: the table has one row per requested measurement with
positive numbers (no timing assertions: CI machines vary)."""

import contextlib
import io
import os

import pytest
from petr_testing import REPO_ROOT, load_cfg, load_tool, shrink_cfg

H, W = 96, 128


def _load_tool():
    return load_tool("benchmark")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    cfg = shrink_cfg(load_cfg("petr_R50.yaml"))
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    path = tmp_path_factory.mktemp("bench") / "tiny.yaml"
    path.write_text(cfg.dump())
    return str(path)


def _run(config, *extra):
    out = io.StringIO()
    argv = ["--config-file", config, "--height", str(H), "--width", str(W)]
    argv += ["--warmup", "1", "--iters", "2", "--devices", "cpu", *extra]
    with contextlib.redirect_stdout(out):
        rc = _load_tool().main(argv)
    return rc, out.getvalue()


def _rows(text):
    """Table rows as lists of cells, header and separator excluded."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| mode | device | precision |")
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def _check_row(row, mode, precision, batch):
    mode_, device, precision_, batch_, size, ms_iter, it_s, ms_img, img_s, mem, attn = row
    expected = (mode, "cpu", precision, str(batch), f"{H}x{W}")
    assert (mode_, device, precision_, batch_, size) == expected
    ms, ms_min = ms_iter.replace("(", "").replace(")", "").split()
    assert 0 < float(ms_min) <= float(ms)
    assert float(it_s) > 0 and float(ms_img) > 0 and float(img_s) > 0
    assert float(img_s) == pytest.approx(batch * float(it_s), rel=0.01)
    assert float(mem) >= 0  # RSS growth of the timed runs; 0 MiB is possible at this size
    assert attn in ("compiled", "reference")


def test_inference_table(tiny_config):
    rc, out = _run(tiny_config, "--precisions", "fp32")
    assert rc == 0, out
    rows = _rows(out)
    assert len(rows) == 1
    _check_row(rows[0], "inference", "fp32", 1)
    assert "CPU threads:" in out
    assert "paper:" not in out  # the shrunk model is not the paper's R50


def test_training_table_with_batch(tiny_config):
    rc, out = _run(tiny_config, "--precisions", "fp32", "--train", "--batch-size", "2")
    assert rc == 0, out
    rows = _rows(out)
    assert len(rows) == 1
    _check_row(rows[0], "train", "fp32", 2)


@pytest.mark.slow  # four models in two processes
def test_bf16_rows_carry_the_fp32_baseline_of_the_same_process(tiny_config):
    # bf16 runs through the model's TEST.AMP, alternating with an fp32 copy; Keypoint R-CNN
    # under the same autocast; the compiled bf16 model against the fp32 eager one
    extra = ["--compile", "--compile-backend", "eager", "--compare", "keypoint_rcnn"]
    rc, out = _run(tiny_config, "--precisions", "fp32", "bf16", *extra, "--kpt-boxes", "3")
    assert rc == 0, out
    fp32, bf16 = _rows(out)
    assert len(fp32) == len(bf16) == 21
    for row, precision in ((fp32, "fp32"), (bf16, "bf16")):
        _check_row(row[:11], "inference", precision, 1)
        eager_ms, compiled_ms = float(row[5].split()[0]), float(row[11].split()[0])
        base_ms, eager_x, compiled_x = float(row[18].split()[0]), float(row[19]), float(row[20])
        assert eager_x == pytest.approx(base_ms / eager_ms, rel=0.02, abs=0.006)
        assert compiled_x == pytest.approx(base_ms / compiled_ms, rel=0.02, abs=0.006)
    assert fp32[18] == fp32[5] and fp32[19] == "1.00"  # an fp32 row is its own baseline


def test_failed_measurement_is_reported_in_the_table(tiny_config):
    # 96x128 gives 256 encoder tokens, fewer than 400 proposals: the model refuses the input
    opts = ["--opts", "MODEL.PETR.NUM_QUERIES", "400"]
    rc, out = _run(tiny_config, "--precisions", "fp32", *opts)
    assert rc == 1
    (row,) = _rows(out)
    assert "failed: ValueError" in row[5] and "NUM_QUERIES" in row[5]


def test_paper_note_names_the_backbone():
    note = _load_tool().paper_note
    r50 = os.path.join(REPO_ROOT, "configs", "petr_R50.yaml")
    assert "89 ms on V100 for R50" in note(r50, [])
    assert "133 ms" in note(os.path.join(REPO_ROOT, "configs", "petr_SwinL.yaml"), [])
    assert note(r50, ["MODEL.PETR.HIDDEN_DIM", "64"]) == ""


def test_bad_arguments_exit_with_a_message(tiny_config, capsys):
    tool = _load_tool()
    with pytest.raises(SystemExit):
        tool.main(["--config-file", tiny_config, "--iters", "0"])
    assert "--iters >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--config-file", tiny_config, "--devices", "cpu", "--precisions", "fp16"])
    assert "fp16 autocast is benchmarked on CUDA only" in capsys.readouterr().err


def test_compiled_and_keypoint_rcnn_columns_and_stages(tiny_config):
    # backend "eager": dynamo traces the model (the code path of --compile) without inductor's
    # code generation, which would take a minute here
    extra = ["--precisions", "fp32", "--compile", "--compile-backend", "eager"]
    rc, out = _run(
        tiny_config, *extra, "--compare", "keypoint_rcnn", "--kpt-boxes", "7", "--stages"
    )
    assert rc == 0, out
    main, stages = out.split("Eager time per stage")
    (row,) = _rows(main)
    _check_row(row[:11], "inference", "fp32", 1)
    compiled, compile_s, speedup, krcnn, boxes, ratio, compiled_ratio = row[11:]
    eager_ms = float(row[5].split()[0])
    compiled_ms = float(compiled.split()[0])
    krcnn_ms = float(krcnn.split()[0])
    assert float(compile_s) > 0 and compiled_ms > 0 and krcnn_ms > 0
    assert float(speedup) == pytest.approx(
        eager_ms / compiled_ms, rel=0.02, abs=0.006
    )  # 2 decimals
    assert float(ratio) == pytest.approx(eager_ms / krcnn_ms, rel=0.02, abs=0.006)  # 2 decimals
    assert float(compiled_ratio) == pytest.approx(
        compiled_ms / krcnn_ms, rel=0.02, abs=0.006
    )  # 2 decimals
    assert boxes == "7"  # Keypoint R-CNN's keypoint head ran on 7 person boxes
    stage_lines = [ln for ln in stages.splitlines() if ln.startswith("| ")]
    assert stage_lines[0].startswith("| device | precision | backbone | neck | encoder |")
    cells = [float(c) for c in stage_lines[1].strip("|").split("|")[2:]]
    assert len(cells) == 7 and all(c > 0 for c in cells[:6])
    assert sum(cells) == pytest.approx(eager_ms, abs=0.5)  # stages + rest = the forward


def test_joint_scores_column_times_the_same_model_without_them(tiny_config):
    rc, out = _run(tiny_config, "--precisions", "fp32", "--compare", "joint_scores")
    assert rc == 0, out
    assert "JOINT_SCORES none ms/iter (min) | x none |" in out
    (row,) = _rows(out)
    _check_row(row[:11], "inference", "fp32", 1)
    none, ratio = row[11:]
    eager_ms, none_ms = float(row[5].split()[0]), float(none.split()[0])
    assert none_ms > 0 and float(ratio) == pytest.approx(eager_ms / none_ms, rel=0.01, abs=2e-3)


def test_compare_refuses_training(tiny_config, capsys):
    with pytest.raises(SystemExit):
        _load_tool().main(["--config-file", tiny_config, "--train", "--compare", "keypoint_rcnn"])
    assert "inference only" in capsys.readouterr().err


def test_compile_key_in_the_config_adds_the_compiled_column(tiny_config):
    opts = ["--opts", "MODEL.PETR.COMPILE.ENABLED", "True"]
    rc, out = _run(tiny_config, "--precisions", "fp32", "--compile-backend", "eager", *opts)
    assert rc == 0, out
    (row,) = _rows(out)
    assert len(row) == 14 and float(row[11].split()[0]) > 0  # compiled ms/iter


def test_backends_refuse_what_they_do_not_time(tiny_config, capsys):
    tool = _load_tool()
    for extra, message in [
        (["--train"], "fp32 inference only"),
        (["--precisions", "bf16"], "CPU in fp32"),
        (["--batch-size", "2"], "--batch-size 1"),
        (["--threads", "0"], "--threads must be >= 1"),
    ]:
        with pytest.raises(SystemExit):
            tool.main(["--config-file", tiny_config, "--backends", "onnxruntime", *extra])
        assert message in capsys.readouterr().err, extra
