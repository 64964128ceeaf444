"""tools/toy_report.py: the learning-curve rows it reads from a run's metrics.json and logs."""

import json

import pytest
from petr_testing import load_tool


@pytest.fixture(scope="module")
def report():
    return load_tool("toy_report")


def test_curve_pairs_each_evaluation_with_the_mean_loss_before_it(report, tmp_path):
    lines = [
        {"iteration": 19, "total_loss": 10.0},
        {"iteration": 39, "total_loss": 6.0},
        {"iteration": 39, "keypoints/AP": 1.5},  # periodic evaluation after the 40th iteration
        {"iteration": 59, "total_loss": 3.0},
        {"iteration": 60, "keypoints/AP": 4.0},  # the final evaluation logs MAX_ITER
    ]
    metrics = tmp_path / "metrics.json"
    metrics.write_text("".join(json.dumps(m) + "\n" for m in lines))
    assert report.read_curve(str(metrics), max_iter=60) == [(40, 8.0, 1.5), (60, 3.0, 4.0)]


def test_logged_ap_is_the_last_copypaste_table(report, tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(
        "[d2.evaluation.testing]: copypaste: Task: keypoints\n"
        "[d2.evaluation.testing]: copypaste: AP,AP50,AP75,APm,APl\n"
        "[d2.evaluation.testing]: copypaste: 0.1000,0.5000,0.0000,0.1000,0.2000\n"
        "something else\n"
        "[d2.evaluation.testing]: copypaste: AP,AP50,AP75,APm,APl\n"
        "[d2.evaluation.testing]: copypaste: 12.5000,40.0000,3.0000,11.0000,20.0000\n"
    )
    assert report.read_logged_ap(str(log)) == 12.5
    empty = tmp_path / "empty.txt"
    empty.write_text("no evaluation here\n")
    assert report.read_logged_ap(str(empty)) is None
