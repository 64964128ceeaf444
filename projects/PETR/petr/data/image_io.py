"""The one image reader of training, evaluation, test-time augmentation and the demo.

Detectron2's `read_image` with one fix: PIL opens 16-bit grayscale PNGs in mode "I;16" (or "I"),
which `Image.convert("RGB")` clips to 255, so every pixel became white. Such images are scaled
to 8 bits (v * 255 / 65535) first. 8-bit images, 16-bit colour PNGs (PIL already reduces them to
8-bit RGB) and every other mode take Detectron2's path unchanged, EXIF orientation included.
"""

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["read_image"]

# PIL modes of one channel with more than 8 bits per pixel ("I" is 32-bit signed, what some PIL
# versions give 16-bit PNGs; its values are taken in the 16-bit range).
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.rint(values.clip(0, 65535) * (255 / 65535)).astype(np.uint8), "L")


def read_image(file_name, format=None) -> np.ndarray:
    """`detectron2.data.detection_utils.read_image` (same arguments, EXIF orientation, output
    (H, W, C) uint8 in `format`, same exceptions for missing or undecodable files), reading
    16-bit grayscale images as 8-bit ones."""
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        # Detectron2's own EXIF handling (it works around a Pillow bug of ImageOps.exif_transpose)
        image = utils._apply_exif_orientation(image)
        if image.mode in _HIGH_DEPTH_MODES:
            image = _to_8bit(image)
        return utils.convert_PIL_to_numpy(image, format)
