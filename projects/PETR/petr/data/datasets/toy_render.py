"""Procedural renderer for the toy keypoint dataset: stick figures with COCO's 17 joints.

Each person is a front-facing articulated figure (torso polygon, thick limbs ending in hands and
feet, a large cartoon head with eyes, nose, ears and hair), so the person's left side is on the
image right of the body axis, as for a person facing the camera. That chirality is what makes
horizontal-flip augmentation with the COCO flip map label-consistent; the per-limb colours
(warm = left, cool = right) let a model follow each arm and leg back to its shoulder or hip when
limbs cross.

All coordinates are pixel indices (x right, y down) of the rendered image, as in COCO json, where
Detectron2's loader later adds 0.5. Only numpy and OpenCV are used, so rendering is cheap.

Joint angles follow loose human statistics (arms mostly hanging or reaching out, sometimes raised;
elbows and knees mostly near straight) rather than a uniform spread: a 15-minute CPU model learns
the common poses first, as a real one does.
"""

import functools
import math
from typing import NamedTuple

import cv2
import numpy as np

NUM_KEYPOINTS = 17
# COCO joint order: 0 nose, 1/2 eyes, 3/4 ears, 5/6 shoulders, 7/8 elbows, 9/10 wrists,
# 11/12 hips, 13/14 knees, 15/16 ankles (odd = left, even = right).
NOSE, L_EYE, R_EYE, L_EAR, R_EAR = 0, 1, 2, 3, 4
L_SHOULDER, R_SHOULDER, L_HIP, R_HIP = 5, 6, 11, 12

# Limb segments (joint a, joint b, RGB colour, thickness as a fraction of person height).
# Left limbs are warm, right limbs cool; upper and lower segments differ so joints show.
LIMBS = (
    (5, 7, (230, 40, 40), 0.050),  # left upper arm: red
    (7, 9, (250, 150, 30), 0.042),  # left forearm: orange
    (6, 8, (40, 80, 230), 0.050),  # right upper arm: blue
    (8, 10, (40, 200, 230), 0.042),  # right forearm: cyan
    (11, 13, (200, 30, 160), 0.065),  # left thigh: magenta
    (13, 15, (250, 120, 190), 0.052),  # left shin: pink
    (12, 14, (30, 150, 60), 0.065),  # right thigh: green
    (14, 16, (160, 230, 60), 0.052),  # right shin: lime
)
_LEGS, _ARMS = LIMBS[4:], LIMBS[:4]
_SKIN_TONES = ((255, 220, 180), (230, 185, 140), (190, 140, 100), (140, 95, 60), (95, 65, 45))
EYE_RGB = (20, 20, 30)
_NOSE_RGB = (170, 70, 60)

# Body proportions as fractions of the person height (ankles to head top is about 1).
_TORSO, _NECK, _HEAD_R = 0.30, 0.115, 0.10  # a cartoon head: face joints stay legible
_SHOULDER_HALF, _HIP_HALF = 0.115, 0.075
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.17, 0.155, 0.245, 0.235

_TILE = 768  # side of the cached noise field (px)

# People per image: 0..4 with these probabilities (crowded images give more supervision per
# second of a CPU training step than mostly empty ones).
_COUNT_PROBS = (0.05, 0.15, 0.25, 0.3, 0.25)
AREA_TO_BOX = 0.55


def _rgb_to_bgr(rgb):
    return (int(rgb[2]), int(rgb[1]), int(rgb[0]))


def _jitter(rng, rgb, amount):
    return tuple(
        min(255, max(0, int(c) + int(d))) for c, d in zip(rgb, rng.integers(-amount, amount + 1, 3))
    )


def _clamp(value, limit):
    return float(min(limit, max(-limit, value)))


class Pose(NamedTuple):
    """One figure in image pixels: `joints` (17, 2) xy in COCO order, `head_center` (2,) xy,
    `head_radius` and `height` (ankles to head top) in pixels, `head_roll` (rad, clockwise in the
    image), and `face_visible` (17,) bool, False for face joints turned away by the head's yaw."""

    joints: np.ndarray
    head_center: np.ndarray
    head_radius: float
    height: float
    head_roll: float
    face_visible: np.ndarray


def sample_pose(rng, height, center, lean):
    """Sample a `Pose` with random joint angles within human-like limits.

    Args:
        height: person height in pixels (ankles to head top).
        center: (x, y) pixel position of the hip centre.
        lean: torso angle from vertical in radians (positive leans to the image right).
    """
    prop = rng.uniform(0.9, 1.1, 8)  # per-person proportions, symmetric left/right
    width = rng.uniform(0.55, 1.0)  # torso turned away from the camera narrows the shoulders
    # Body frame: +x is the person's left (image right when upright), +y is up.
    j = np.zeros((NUM_KEYPOINTS, 2))
    shoulder_c = np.array([0.0, _TORSO * prop[0]])
    j[L_HIP], j[R_HIP] = (np.array([s * _HIP_HALF * prop[1] * width, 0.0]) for s in (1, -1))
    j[L_SHOULDER], j[R_SHOULDER] = (
        shoulder_c + [s * _SHOULDER_HALF * prop[2] * width, 0.0] for s in (1, -1)
    )
    for side, sh, el, wr, hip, kn, an in ((1, 5, 7, 9, 11, 13, 15), (-1, 6, 8, 10, 12, 14, 16)):
        # Angles from straight down, positive away from the body; lengths foreshortened.
        # Arms mostly hang or reach sideways, sometimes rise; elbows bend up to ~100 degrees.
        up = rng.uniform(-0.3, 1.3) if rng.random() < 0.7 else rng.uniform(1.3, 2.9)
        fore = up + _clamp(rng.normal(0.0, 0.8), 1.8)
        thigh = rng.uniform(-0.2, 0.9)
        shin = thigh + _clamp(rng.normal(0.0, 0.5), 1.2)
        short = rng.uniform(0.65, 1.0, 4)
        for a, b, ang, length in (
            (sh, el, up, _UPPER_ARM * prop[3] * short[0]),
            (el, wr, fore, _FOREARM * prop[4] * short[1]),
            (hip, kn, thigh, _THIGH * prop[5] * short[2]),
            (kn, an, shin, _SHIN * prop[6] * short[3]),
        ):
            j[b] = j[a] + length * np.array([side * math.sin(ang), -math.cos(ang)])

    # Head: a sphere seen from the front; yaw turns the face, roll tilts it with the neck.
    roll = _clamp(rng.normal(0.0, 0.15), 0.4)
    head_c = shoulder_c + _NECK * prop[7] * np.array([math.sin(roll), math.cos(roll)])
    yaw_sign = rng.choice([-1.0, 1.0])
    yaw = _clamp(yaw_sign * math.acos(width) * rng.uniform(0.5, 1.2) + rng.normal(0, 0.2), 1.0)
    face_vis = np.ones(NUM_KEYPOINTS, bool)
    # (joint, azimuth from the facing direction, height on the head, radius factor, min depth)
    for k, azimuth, elev, rad, min_depth in (
        (NOSE, 0.0, -0.15, 1.1, 0.0),
        (L_EYE, 0.42, 0.18, 1.0, 0.15),
        (R_EYE, -0.42, 0.18, 1.0, 0.15),
        (L_EAR, 1.7, 0.0, 1.0, -0.35),
        (R_EAR, -1.7, 0.0, 1.0, -0.35),
    ):
        theta = yaw + azimuth
        local = np.array([rad * math.sin(theta), elev]) * _HEAD_R
        cos_r, sin_r = math.cos(roll), math.sin(roll)
        j[k] = head_c + [cos_r * local[0] + sin_r * local[1], -sin_r * local[0] + cos_r * local[1]]
        face_vis[k] = math.cos(theta) > min_depth

    # Body frame -> image: scale, rotate by the lean, flip y, translate to the hip centre.
    cos_l, sin_l = math.cos(lean), math.sin(lean)
    rot = np.array([[cos_l, sin_l], [-sin_l, cos_l]])  # body (x, y-up) -> image (x, y-down)
    rot[1] *= -1.0

    def to_img(p):
        return np.asarray(p) @ rot.T * height + np.asarray(center)

    return Pose(to_img(j), to_img(head_c), _HEAD_R * height, height, roll + lean, face_vis)


class _Canvas:
    """The colour image plus an owner map: which layer (person id, or 255) is on top per pixel."""

    def __init__(self, image):
        self.image = image
        self.owner = np.zeros(image.shape[:2], np.uint8)  # 0 = background or clutter

    def draw(self, owner_id, fn, bgr, mask=None):
        """Call `fn(img, colour, line_type)` on the image and on the owner map (and `mask`)."""
        fn(self.image, bgr, cv2.LINE_AA)
        fn(self.owner, owner_id, cv2.LINE_8)
        if mask is not None:
            fn(mask, 255, cv2.LINE_8)


_SHIFT = 4  # OpenCV fixed-point bits: draw at sub-pixel positions
_ONE = 1 << _SHIFT


def _pt(p):
    return (int(round(p[0] * _ONE)), int(round(p[1] * _ONE)))


# Shape factories: each returns `fn(img, colour, line_type)` for `_Canvas.draw` (pixels in).
def _circle(center, radius):
    r = max(1, int(round(radius * _ONE)))
    return lambda im, c, lt: cv2.circle(im, _pt(center), r, c, -1, lt, _SHIFT)


def _line(a, b, thickness):
    t = max(2, int(round(thickness)))
    return lambda im, c, lt: cv2.line(im, _pt(a), _pt(b), c, t, lt, _SHIFT)


def _poly(points):
    pts = np.array([_pt(p) for p in points], np.int32)
    return lambda im, c, lt: cv2.fillPoly(im, [pts], c, lt, _SHIFT)


def _ellipse(center, axes, angle=0.0, start=0.0, end=360.0, thickness=-1):
    """Filled ellipse, or an arc of `thickness` px from `start` to `end` degrees (clockwise)."""
    ax = tuple(max(1, int(round(a * _ONE))) for a in axes)
    return lambda im, c, lt: cv2.ellipse(
        im, _pt(center), ax, angle, start, end, c, thickness, lt, _SHIFT
    )


def draw_person(canvas, owner_id, rng, pose):
    """Draw one `Pose`; returns its silhouette mask (H, W) uint8 (255 inside)."""
    joints, head_c, head_r, height, roll, face_vis = pose
    mask = np.zeros(canvas.owner.shape, np.uint8)
    # A per-person colour shift shared by all limbs, plus a small per-limb one.
    rgb = np.array([limb[2] for limb in LIMBS]) + rng.integers(-20, 21, 3)
    rgb = np.clip(rgb + rng.integers(-8, 9, (len(LIMBS), 3)), 0, 255)
    limb_bgr = {(a, b): _rgb_to_bgr(c) for (a, b, _, _), c in zip(LIMBS, rgb)}

    def limbs(group):
        for a, b, _, frac in group:
            canvas.draw(owner_id, _line(joints[a], joints[b], frac * height), limb_bgr[a, b], mask)

    limbs(_LEGS)
    shoe = _rgb_to_bgr(_jitter(rng, (45, 35, 30), 20))
    for k in (15, 16):  # feet end the shins, so ankles are blob centres rather than line ends
        canvas.draw(owner_id, _circle(joints[k], 0.042 * height), shoe, mask)
    shirt = _rgb_to_bgr(rng.integers(0, 256, 3))
    torso = joints[[L_SHOULDER, R_SHOULDER, R_HIP, L_HIP]]
    canvas.draw(owner_id, _poly(torso), shirt, mask)
    for a, b in ((0, 1), (1, 2), (2, 3), (3, 0)):  # round the torso corners
        canvas.draw(owner_id, _line(torso[a], torso[b], 0.04 * height), shirt, mask)
    skin = _rgb_to_bgr(_jitter(rng, _SKIN_TONES[rng.integers(len(_SKIN_TONES))], 10))
    neck_base = joints[[L_SHOULDER, R_SHOULDER]].mean(0)
    canvas.draw(owner_id, _line(neck_base, head_c, 0.045 * height), skin, mask)
    ear_bgr = tuple(int(c * 0.85) for c in skin)
    for k in (3, 4):  # ears first, so the head disc covers their inner half
        if face_vis[k]:
            canvas.draw(owner_id, _circle(joints[k], 0.28 * head_r), ear_bgr, mask)
    canvas.draw(owner_id, _circle(head_c, head_r), skin, mask)
    hair = _rgb_to_bgr(_jitter(rng, (60, 40, 25), 25))
    top = -90.0 + math.degrees(roll)  # cv2 angle (clockwise from +x) of the head top
    t = max(1, int(round(0.3 * head_r)))
    arc = _ellipse(head_c, (head_r - t / 2,) * 2, 0.0, top - 70, top + 70, t)
    canvas.draw(owner_id, arc, hair, mask)
    for k in (1, 2):  # eyes: a white with a dark pupil, the joint at its centre
        if face_vis[k]:
            canvas.draw(owner_id, _circle(joints[k], 0.3 * head_r), (245, 245, 245))
            canvas.draw(owner_id, _circle(joints[k], 0.16 * head_r), _rgb_to_bgr(EYE_RGB))
    if face_vis[0]:
        canvas.draw(owner_id, _circle(joints[0], 0.22 * head_r), _rgb_to_bgr(_NOSE_RGB))
    limbs(_ARMS)  # arms in front of the torso and head
    for k in (9, 10):  # hands, likewise
        canvas.draw(owner_id, _circle(joints[k], 0.04 * height), skin, mask)
    return mask


def render_background(rng, height, width):
    """Random background (H, W, 3) uint8 BGR: a gradient, smooth noise or a flat colour."""
    kind = rng.integers(3)
    if kind == 0:
        c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xx * math.cos(ang) + yy * math.sin(ang)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        img = c0 + t[..., None] * (c1 - c0)
    elif kind == 1:
        grid = rng.uniform(0, 255, (rng.integers(2, 9), rng.integers(2, 9), 3)).astype(np.float32)
        img = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    else:
        img = np.broadcast_to(rng.uniform(0, 255, 3).astype(np.float32), (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _random_shape(rng, canvas, owner_id, center, size, bgr):
    kind = rng.integers(3)
    if kind == 0:
        half = rng.uniform(0.3, 1.0, 2) * size / 2
        pts = [center + half * s for s in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        fn = _poly(pts)
    elif kind == 1:
        fn = _ellipse(center, rng.uniform(0.2, 0.5, 2) * size, rng.uniform(0, 180))
    else:
        fn = _poly(center + rng.uniform(-0.5, 0.5, (3, 2)) * size)
    canvas.draw(owner_id, fn, bgr)


def draw_clutter(rng, canvas):
    """Background clutter: random shapes, thin lines and a few limb-coloured sticks."""
    h, w = canvas.owner.shape
    for _ in range(rng.integers(0, 6)):
        center = rng.uniform([0, 0], [w, h])
        _random_shape(rng, canvas, 0, center, rng.uniform(10, 0.4 * min(h, w)),
                      _rgb_to_bgr(rng.integers(0, 256, 3)))  # fmt: skip
    for _ in range(rng.integers(0, 4)):
        a, b = rng.uniform([0, 0], [w, h], (2, 2))
        canvas.draw(0, _line(a, b, rng.uniform(1, 4)), _rgb_to_bgr(rng.integers(0, 256, 3)))
    if rng.random() < 0.2:  # distractors: a lone limb-coloured stick is not a person
        for _ in range(rng.integers(1, 3)):
            a = rng.uniform([0, 0], [w, h])
            b = a + rng.uniform(-40, 40, 2)
            rgb = LIMBS[rng.integers(len(LIMBS))][2]
            canvas.draw(0, _line(a, b, rng.uniform(3, 9)), _rgb_to_bgr(_jitter(rng, rgb, 20)))


def _in_frame(joints, height, width):
    x, y = joints[:, 0], joints[:, 1]
    return (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)


def _overlap(a, b):
    """Intersection over the smaller of two xyxy boxes: 1 when one contains the other."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / max(smaller, 1e-6)


def _place_people(rng, count, height, width):
    """Sample up to `count` poses with >= 3 joints in frame and limited mutual overlap.

    People are at least 110 px tall: at the toy's test scale that keeps joints a few feature
    cells (stride 8) apart, the resolution a 15-minute model can localise."""
    placed, boxes = [], []
    for _ in range(count):
        for _try in range(10):
            person_h = math.exp(rng.uniform(math.log(110), math.log(0.95 * min(height, width))))
            center = rng.uniform([-0.05 * width, 0.15 * height], [1.05 * width, 0.95 * height])
            lean = _clamp(rng.normal(0.0, 0.25), 0.8)
            pose = sample_pose(rng, person_h, center, lean)
            box = (*pose.joints.min(0), *pose.joints.max(0))
            if _in_frame(pose.joints, height, width).sum() >= 3 and all(
                _overlap(box, other) <= 0.4 for other in boxes
            ):
                placed.append(pose)
                boxes.append(box)
                break
    return placed


@functools.lru_cache(maxsize=1)
def _noise_tile():
    # Pixel noise is cropped from one fixed field: drawing fresh noise dominated the run time.
    return np.random.default_rng(0).standard_normal((_TILE, _TILE, 3), dtype=np.float32)


def _noise(rng, height, width):
    """Unit Gaussian pixel noise (H, W, 3) float32, deterministic given `rng`."""
    if height > _TILE or width > _TILE:
        return rng.standard_normal((height, width, 3), dtype=np.float32)
    y, x = rng.integers(0, _TILE - height + 1), rng.integers(0, _TILE - width + 1)
    return _noise_tile()[y : y + height, x : x + width]


def render_image(rng, height, width):
    """Render one image with its people.

    Returns:
        image (H, W, 3) uint8 BGR, and a list with one dict per person, in drawing order:
        "keypoints" (17, 3) float64 as COCO (x, y pixel indices, v in {0, 1, 2}; v=0 joints are
        out of frame and all zero, v=1 joints are hidden by an occluder, another person or the
        head's own yaw), "bbox" [x, y, w, h] of the silhouette clipped to the image (pixels),
        "area" the OKS scale: 0.55 x the box area (at least the silhouette's pixel count).
    """
    canvas = _Canvas(render_background(rng, height, width))
    draw_clutter(rng, canvas)
    count = rng.choice(len(_COUNT_PROBS), p=_COUNT_PROBS)
    people = _place_people(rng, count, height, width)
    masks = [draw_person(canvas, i + 1, rng, pose) for i, pose in enumerate(people)]
    if people and rng.random() < 0.3:  # occluders over random joints -> v=1
        for _ in range(rng.integers(1, 3)):
            pose = people[rng.integers(len(people))]
            center = pose.joints[rng.integers(NUM_KEYPOINTS)] + rng.normal(0, 0.05 * pose.height, 2)
            _random_shape(rng, canvas, 255, center, rng.uniform(0.2, 0.5) * pose.height,
                          _rgb_to_bgr(rng.integers(0, 256, 3)))  # fmt: skip
    img = canvas.image
    if rng.random() < 0.2:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    img = np.clip(img + _noise(rng, height, width) * rng.uniform(1.0, 8.0), 0, 255).astype(np.uint8)

    annotations = []
    for i, (pose, mask) in enumerate(zip(people, masks)):
        joints, face_vis = pose.joints, pose.face_visible
        inside = _in_frame(joints, height, width)
        xi = np.clip(np.rint(joints[:, 0]).astype(int), 0, width - 1)
        yi = np.clip(np.rint(joints[:, 1]).astype(int), 0, height - 1)
        on_top = canvas.owner[yi, xi] == i + 1
        vis = np.where(inside, np.where(on_top & face_vis, 2, 1), 0)
        kpts = np.concatenate([joints * (vis[:, None] > 0), vis[:, None]], axis=1)
        bbox = [float(v) for v in cv2.boundingRect(mask)]  # x, y, w, h of the silhouette
        # The OKS scale: a stick figure's silhouette is far thinner than a person's segment, so use
        # COCO's typical segment-to-box ratio for people (~0.55) instead of the pixel count.
        area = max(AREA_TO_BOX * bbox[2] * bbox[3], float(cv2.countNonZero(mask)))
        annotations.append({"keypoints": kpts, "bbox": bbox, "area": area})
    return img, annotations
