"""The installed stack is one the project supports, and Detectron2's model zoo imports in it."""

import numpy as np
import torch


def test_detectron2_model_zoo_imports():
    # Detectron2 imports pkg_resources here, which setuptools 81 removed.
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml")
    assert path.endswith("keypoint_rcnn_R_50_FPN_3x.yaml")


def test_torch_and_numpy_within_the_tested_range():
    from petr.utils.compat import TORCH_VERSION

    assert (2, 3) <= TORCH_VERSION <= (2, 14), torch.__version__
    assert int(np.__version__.split(".")[0]) in (1, 2), np.__version__
