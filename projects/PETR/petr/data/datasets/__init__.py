"""Datasets PETR registers on import (CrowdPose, the toy dataset) and COCO sigmas."""
