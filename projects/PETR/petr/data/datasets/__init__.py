"""Datasets PETR registers on import (CrowdPose, the toy dataset) and COCO sigmas."""

from . import coco, crowdpose  # noqa: F401  (registration)
from . import toy as _toy  # noqa: F401  (registration)
