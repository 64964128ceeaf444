"""Gaussian heatmap targets: the official radius, peaks, border crops and overlaps."""

import math

import pytest
import torch
from petr_testing import K

from petr.modeling.heatmap_target import build_heatmap_targets, gaussian_radius, heatmap_radius


def test_gaussian_radius_values():
    # 10 x 10 cells, overlap 0.9: a3 = 3.6, b3 = -36, c3 = -10; the third (smallest) root
    # without the 1/(2a) factor is (b3 + sqrt(b3^2 - 4 a3 c3)) / 2 = (-36 + sqrt(1296 + 144)) / 2.
    r = gaussian_radius(torch.tensor(10.0), torch.tensor(10.0))
    assert r.item() == pytest.approx((-36 + math.sqrt(1440)) / 2, rel=1e-6)
    boxes = torch.tensor([[0.0, 0.0, 80.0, 80.0], [0.0, 0.0, 800.0, 800.0], [5.0, 5.0, 5.0, 5.0]])
    assert heatmap_radius(boxes).tolist() == [0, 3, 0]  # floor(0.97) = 0; clamp at 3; empty box


def test_heatmap_target_peak_radius_border_crop_and_max():
    s2 = 2 * (7 / 6) ** 2  # radius 3: diameter 7, sigma 7/6
    kp = torch.zeros(3, K, 3)
    kp[0, 0] = torch.tensor([83.0, 53.0, 2.0])  # cell (floor(83/8), floor(53/8)) = (10, 6)
    kp[1, 0] = torch.tensor([0.0, 0.0, 2.0])  # top-left corner: cropped gaussian
    kp[1, 1] = torch.tensor([50.0, 60.0, 0.0])  # invisible: nothing drawn
    kp[1, 2] = torch.tensor([26.0, 90.0, 2.0])  # cell (3, 11): two people overlap on joint 2
    kp[2, 2] = torch.tensor([39.9, 95.0, 2.0])  # cell (4, 11)
    boxes = torch.tensor([[0.0, 0.0, 800.0, 800.0]]).repeat(3, 1)  # radius clamped to 3
    hm = build_heatmap_targets([kp], [boxes], (12, 16))
    assert hm.shape == (1, K, 12, 16)
    assert hm[0, 0, 6, 10] == 1.0 and hm[0, 2, 11, 3] == 1.0 and hm[0, 2, 11, 4] == 1.0
    assert int((hm == 1).sum()) == 4  # one peak per visible joint
    assert hm[0, 1].sum() == 0
    # The 7x7 support around (10, 6) and nothing outside it.
    assert (hm[0, 0, 3:10, 7:14] > 0).all()
    assert hm[0, 0, 6, 14] == 0 and hm[0, 0, 10, 10] == 0
    assert hm[0, 0, 6, 11].item() == pytest.approx(math.exp(-1 / s2), rel=1e-6)
    # Corner: only the 4x4 quarter inside the map.
    assert hm[0, 0, 0, 0] == 1.0
    assert hm[0, 0, 3, 3].item() == pytest.approx(math.exp(-18 / s2), rel=1e-5)
    assert hm[0, 0, 0, 4] == 0 and hm[0, 0, 4, 0] == 0
    # Bottom border crop (rows 12+ are off the map) and elementwise max of overlapping people.
    assert hm[0, 2, 11, 5].item() == pytest.approx(math.exp(-1 / s2), rel=1e-6)
    assert hm[0, 2, 8, 2].item() == pytest.approx(math.exp(-(1 + 9) / s2), rel=1e-5)


def test_small_person_gives_single_pixel_peak():
    kp = torch.zeros(1, K, 3)
    kp[0, 4] = torch.tensor([17.0, 9.0, 1.0])  # v = 1 counts as visible
    hm = build_heatmap_targets([kp], [torch.tensor([[0.0, 0.0, 40.0, 40.0]])], (6, 6))
    assert hm.sum() == 1.0 and hm[0, 4, 1, 2] == 1.0
