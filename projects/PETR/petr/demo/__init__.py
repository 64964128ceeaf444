"""Inference on images and videos with visualisation, as Detectron2's demo/predictor.py."""

from .predictor import PETRPredictor, VisualizationDemo, draw_poses

__all__ = ["PETRPredictor", "VisualizationDemo", "draw_poses"]
