"""Config keys PETR adds to Detectron2's defaults (new keys only; their defaults are the official
R50 COCO recipe). PETR's values for Detectron2's own keys live in configs/Base-PETR.yaml."""

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


def add_petr_config(cfg):
    """Add every PETR key (model, Swin backbone, data pipeline, solver, test) to `cfg`, a root
    config. Detectron2's own keys keep their defaults: Base-PETR.yaml sets PETR's values."""
    _add_model_config(cfg)
    _add_swin_config(cfg)
    _add_data_config(cfg)
    _add_solver_config(cfg)
    _add_test_config(cfg)
    for old, new, why in REMOVED_KEYS:
        cfg.register_renamed_key(old, new, message=why)


# Keys PETR no longer has: a yaml or an opt that sets one is an error naming the replacement.
REMOVED_KEYS = (
    (
        "MODEL.PETR.NUM_PROPOSALS",
        "MODEL.PETR.NUM_QUERIES",
        "query i starts from proposal i, so NUM_QUERIES sets both",
    ),
    (
        "MODEL.PETR.DETECTIONS_PER_IMAGE",
        "TEST.DETECTIONS_PER_IMAGE",
        "PETR reads Detectron2's key",
    ),
)


def get_petr_cfg(config_file=None, opts=()):
    """Detectron2's defaults + PETR's keys, then `config_file` and `opts` (KEY VALUE list).
    MODEL.DEVICE "auto" becomes "cuda" when CUDA is available, else "cpu"; any other value stays
    as given (`check_device` refuses "cuda" without CUDA when a model is built)."""
    cfg = get_cfg()
    add_petr_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE == "auto":
        import torch

        cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def check_device(cfg):
    """Raise a ValueError when MODEL.DEVICE asks for CUDA and this torch has none (instead of
    Detectron2's error from deep inside `build_model`)."""
    import torch

    device = cfg.MODEL.DEVICE
    if device == "auto":
        raise ValueError('MODEL.DEVICE "auto" is resolved by petr.get_petr_cfg; pass the config '
                         'through it, or set "cpu" / "cuda"')  # fmt: skip
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"MODEL.DEVICE is {device!r} but CUDA is not available to torch "
            f"{torch.__version__}: set MODEL.DEVICE cpu, or auto to use CUDA only when present"
        )


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


_LOSS_WEIGHTS = ("CLS", "KPT", "OKS", "HM", "KPT_REFINE", "OKS_REFINE", "ENC_CLS", "ENC_KPT")
# (key, test of the value, allowed range as the error says it); sequences: every element.
_VALUE_RULES = (
    [
        ("MODEL.PETR.NUM_QUERIES", lambda v: v >= 1, ">= 1"),
        ("MODEL.PETR.ENC_N_POINTS", lambda v: v >= 1, ">= 1"),
        ("MODEL.PETR.JOINT_DEC_N_POINTS", lambda v: v >= 1, ">= 1"),
        ("MODEL.PETR.NUM_HEADS", lambda v: v >= 1, ">= 1"),
        ("MODEL.PETR.DROPOUT", lambda v: 0 <= v < 1, "[0, 1)"),
        ("MODEL.PETR.OKS_NMS_THRESH_TEST", lambda v: 0 <= v <= 1, "[0, 1] (0: no OKS-NMS)"),
        ("TEST.DETECTIONS_PER_IMAGE", lambda v: v >= 1, ">= 1"),
        ("SOLVER.IMS_PER_BATCH", lambda v: v >= 1, ">= 1 (images per step, all GPUs together)"),
        ("INPUT.MIN_SIZE_TRAIN", lambda v: v >= 1, ">= 1 px"),
        ("INPUT.MAX_SIZE_TRAIN", lambda v: v >= 1, ">= 1 px"),
        ("INPUT.MIN_SIZE_TEST", lambda v: v >= 0, ">= 0 px (0: no resize at test)"),
        ("INPUT.MAX_SIZE_TEST", lambda v: v >= 1, ">= 1 px"),
        ("INPUT.PETR.CROP_MIN_SIZE_TRAIN", lambda v: v >= 1, ">= 1 px"),
        ("INPUT.PETR.CROP_MAX_SIZE_TRAIN", lambda v: v >= 1, ">= 1 px"),
        ("INPUT.PETR.FLIP_PROB", lambda v: 0 <= v <= 1, "[0, 1]"),
        ("DATALOADER.PETR.MAX_BAD_IMAGE_SHARE", lambda v: 0 < v <= 1, "(0, 1]"),
        ("DATALOADER.PETR.MAX_BAD_ANNOTATION_SHARE", lambda v: 0 <= v <= 1, "[0, 1]"),
    ]
    + [(f"MODEL.PETR.{w}_WEIGHT", lambda v: v >= 0, ">= 0") for w in _LOSS_WEIGHTS]
    + [(f"MODEL.PETR.MATCH_{w}_WEIGHT", lambda v: v >= 0, ">= 0") for w in ("CLS", "KPT", "OKS")]
)


def check_config(cfg):
    """Refuse impossible values before anything is built, with an error naming the key and the
    allowed range (`check_device` included). Run by the trainer (training and --eval-only) and
    the predictor (the demo)."""
    import os

    check_device(cfg)
    for key, ok, allowed in _VALUE_RULES:
        value = _get(cfg, key)
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(ok(v) for v in values):
            raise ValueError(f"{key} must be {allowed}, got {value!r}")
    p = cfg.MODEL.PETR
    if p.HIDDEN_DIM < 1 or p.HIDDEN_DIM % p.NUM_HEADS:
        raise ValueError(
            f"MODEL.PETR.HIDDEN_DIM must be a positive multiple of MODEL.PETR.NUM_HEADS "
            f"({p.NUM_HEADS}), got {p.HIDDEN_DIM}"
        )
    if p.NUM_FEATURE_LEVELS < max(1, len(p.IN_FEATURES)):
        raise ValueError(
            f"MODEL.PETR.NUM_FEATURE_LEVELS must be >= len(MODEL.PETR.IN_FEATURES) = "
            f"{len(p.IN_FEATURES)} (extra levels are stride-2 convs), got {p.NUM_FEATURE_LEVELS}"
        )
    if cfg.TEST.AUG.ENABLED:
        for key in ("TEST.AUG.MIN_SIZES", "TEST.AUG.MAX_SIZE"):
            value = _get(cfg, key)
            if not all(v >= 1 for v in (value if isinstance(value, (list, tuple)) else [value])):
                raise ValueError(f"{key} must be >= 1 px, got {value!r}")
    if cfg.MODEL.WEIGHTS and os.path.isdir(cfg.MODEL.WEIGHTS):
        raise ValueError(
            f"MODEL.WEIGHTS must be a checkpoint file, got the folder {cfg.MODEL.WEIGHTS!r} "
            "(a training run's folder holds e.g. model_final.pth)"
        )


def _add_model_config(cfg):
    cfg.MODEL.PETR = CN()
    p = cfg.MODEL.PETR
    p.IN_FEATURES = ["res3", "res4", "res5"]
    p.NUM_FEATURE_LEVELS = 4  # backbone levels + extra stride-2 convs on the raw last one
    p.HIDDEN_DIM = 256
    p.NUM_HEADS = 8
    p.DIM_FEEDFORWARD = 1024
    p.DROPOUT = 0.1
    p.ENC_LAYERS = 6
    p.POSE_DEC_LAYERS = 3
    p.JOINT_DEC_LAYERS = 2
    p.HM_ENC_LAYERS = 1
    p.ENC_N_POINTS = 4  # per level, encoder and heatmap encoder
    p.JOINT_DEC_N_POINTS = 4  # per level; the pose decoder samples one point per keypoint
    p.KPT_HEAD_HIDDEN_DIM = 512  # fixed in the official code, not tied to HIDDEN_DIM
    p.NUM_QUERIES = 300  # also the top-k encoder tokens proposed (query i <-> proposal i)
    p.POS_TEMPERATURE = 10000.0
    # Loss weights (official: cls 2, L1 70, OKS 2, heatmap 4, joint L1 80, joint OKS 3, enc 2/70).
    p.CLS_WEIGHT = 2.0
    p.KPT_WEIGHT = 70.0
    p.OKS_WEIGHT = 2.0
    p.HM_WEIGHT = 4.0
    p.KPT_REFINE_WEIGHT = 80.0
    p.OKS_REFINE_WEIGHT = 3.0
    p.ENC_CLS_WEIGHT = 2.0
    p.ENC_KPT_WEIGHT = 70.0
    # Hungarian matching costs.
    p.MATCH_CLS_WEIGHT = 2.0
    p.MATCH_KPT_WEIGHT = 70.0
    p.MATCH_OKS_WEIGHT = 7.0
    p.FOCAL_ALPHA = 0.25
    p.FOCAL_GAMMA = 2.0
    # Empty: take the sigmas from the dataset metadata (`keypoint_oks_sigmas`), else COCO/CrowdPose.
    p.OKS_SIGMAS = []
    p.NUM_KEYPOINTS = 17  # used only when the training dataset's metadata has no keypoint_names
    p.SIZE_DIVISIBILITY = 1  # the official Pad(size_divisor=1)
    # Added to predicted keypoints (original-image pixels). Detectron2's loaders add 0.5 to json
    # keypoints and COCOEvaluator subtracts it; the official models were trained on raw json
    # coordinates, so converted official checkpoints want 0.5 here. Models trained here want 0.
    p.OUTPUT_PIXEL_OFFSET = 0.0
    # Greedy OKS-NMS over the final poses when > 0 (OKS threshold). The official model has none;
    # it helps a briefly trained model, whose duplicate poses outrank other people (the toy).
    p.OKS_NMS_THRESH_TEST = 0.0
    # Per-joint confidence, pred_keypoints[..., 2]: "heatmap" samples the auxiliary heatmap
    # branch (trained on labelled joints) at each predicted joint; "none" writes 1 everywhere.
    p.JOINT_SCORES = "heatmap"
    # MODEL.WEIGHTS that fill less than half of the model's parameter elements are an error
    # (a checkpoint of another architecture); True loads them with a warning.
    p.ALLOW_PARTIAL_WEIGHTS = False
    # torch.compile of the whole model (training, --eval-only, the demo predictor, the benchmark);
    # MODE is torch.compile's: "default", "reduce-overhead", "max-autotune",
    # "max-autotune-no-cudagraphs". DYNAMIC: symbolic image sizes, so one graph serves every
    # input size (per batch size); False compiles a graph per input size (fixed-size inputs).
    p.COMPILE = CN()
    p.COMPILE.ENABLED = False
    p.COMPILE.MODE = "default"
    p.COMPILE.DYNAMIC = True


def _add_swin_config(cfg):
    cfg.MODEL.SWIN = CN()
    s = cfg.MODEL.SWIN
    s.PATCH_SIZE = 4
    s.EMBED_DIM = 192
    s.DEPTHS = [2, 2, 18, 2]
    s.NUM_HEADS = [6, 12, 24, 48]
    s.WINDOW_SIZE = 7
    s.MLP_RATIO = 4.0
    s.QKV_BIAS = True
    s.DROP_RATE = 0.0
    s.ATTN_DROP_RATE = 0.0
    s.DROP_PATH_RATE = 0.3
    s.PATCH_NORM = True
    s.OUT_FEATURES = ["res3", "res4", "res5"]
    s.USE_CHECKPOINT = False


def _add_data_config(cfg):
    # Training images, the official rule (mmdet CocoDataset._filter_imgs, filter_empty_gt=True):
    # "official" keeps an image with at least one person annotation of any kind (crowd and
    # 0-keypoint persons included; all-crowd or all-keypoint-less images train as negatives)
    # whose json width and height are >= MIN_IMAGE_SIZE; "none" keeps every image.
    # Base-PETR.yaml turns Detectron2's own DATALOADER.FILTER_EMPTY_ANNOTATIONS off (on top of
    # the official rule it would also drop the crowd-only images).
    cfg.DATALOADER.PETR = CN()
    d = cfg.DATALOADER.PETR
    d.IMAGE_FILTER = "official"
    d.MIN_IMAGE_SIZE = 32
    # Unreadable training images (missing, truncated, undecodable) are replaced by another
    # image and counted; training stops when more than this share of the reads fails.
    d.MAX_BAD_IMAGE_SHARE = 0.01
    # Annotations are checked when a dataset is loaded (petr.data.annotation_checks): malformed
    # ones are dropped and invalid boxes counted; a training or test dataset with more than this
    # share of bad annotations is an error before training or inference starts.
    d.MAX_BAD_ANNOTATION_SHARE = 0.01
    # Compare each training image's file size (header only) with the json's width and height
    # at load; images that differ are dropped and counted. Off: found when an image is drawn.
    d.CHECK_IMAGE_SIZES = True
    # Policy 2 of the official AutoAugment: short side one of CROP_MIN_SIZE_TRAIN (long cap
    # 4200), then Detectron2's INPUT.CROP (Base-PETR.yaml: absolute_range [384, 600]), then
    # policy 1 (INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN). CROP.ENABLED False keeps only policy 1.
    cfg.INPUT.PETR = CN()
    p = cfg.INPUT.PETR
    p.CROP_MIN_SIZE_TRAIN = (400, 500, 600)
    p.CROP_MAX_SIZE_TRAIN = 4200
    p.PHOTOMETRIC = True  # mmdet PhotoMetricDistortion (brightness, contrast, HSV, channels)
    p.ROTATION_DEGREES = 30.0  # rotation ~ U(-30, 30) degrees about the centre, always applied
    p.SHEAR_DEGREES = 0.0  # CrowdPose: 2.0
    p.FLIP_PROB = 0.5  # horizontal; needs keypoint_flip_map in the dataset metadata


def _add_solver_config(cfg):
    s = cfg.SOLVER
    s.OPTIMIZER = "ADAMW"  # or "SGD" (Detectron2's default)
    s.BETAS = (0.9, 0.999)
    # The official learning-rate multipliers: a parameter whose full name contains the key gets
    # lr x value; the longest matching key wins (mmcv's paramwise custom_keys).
    s.LR_MULT_KEYS = ["backbone", "sampling_offsets"]
    s.LR_MULT_VALUES = [0.1, 0.1]
    # CLIP_TYPE "full_model": one global L2 norm over every parameter (the official grad_clip),
    # on top of Detectron2's per-parameter "value" and "norm".
    s.AMP.PRECISION = "float16"  # or "bfloat16"; AMP needs CUDA (Detectron2's AMPTrainer)


def _add_test_config(cfg):
    # Test-time augmentation (PETRWithTTA) reuses Detectron2's TEST.AUG keys (Base-PETR.yaml:
    # the paper's multi-scale flip test) and adds the merge of the views.
    a = cfg.TEST.AUG
    # "soft_nms": the official merge (concatenate all views, linear soft-NMS on keypoint boxes);
    # "oks_average": match views by OKS to the reference view (unflipped, MIN_SIZES[0]) and
    # average matched poses.
    a.MERGE = "soft_nms"
    a.SOFT_NMS_IOU_THRESH = 0.5
    a.SOFT_NMS_MIN_SCORE = 1e-3
    a.MATCH_OKS_THRESH = 0.5  # "oks_average": lower-OKS pairs stay separate poses
    # Reduced-precision inference (mirrors SOLVER.AMP): the model's inference path (--eval-only,
    # predictor and demo, TTA, benchmark) runs under torch.autocast with DTYPE on the model's
    # device; outputs stay float32 and deformable attention samples in float32. "float16"
    # needs CUDA; "bfloat16" also runs on CPUs (fast with AVX-512 BF16 / AMX).
    cfg.TEST.AMP = CN()
    cfg.TEST.AMP.ENABLED = False
    cfg.TEST.AMP.DTYPE = "bfloat16"  # or "float16"


TEST_AMP_DTYPES = ("bfloat16", "float16")


def inference_autocast_dtype(cfg):
    """The autocast dtype TEST.AMP asks for (torch.bfloat16 / torch.float16), or None when
    TEST.AMP.ENABLED is False. Raises a ValueError naming the key for an unknown dtype, and for
    float16 when MODEL.DEVICE is not CUDA (CPU autocast is bfloat16)."""
    import torch

    if not cfg.TEST.AMP.ENABLED:
        return None
    name = cfg.TEST.AMP.DTYPE
    if name not in TEST_AMP_DTYPES:
        raise ValueError(f"TEST.AMP.DTYPE={name!r}: use one of {', '.join(TEST_AMP_DTYPES)}")
    if name == "float16" and not str(cfg.MODEL.DEVICE).startswith("cuda"):
        raise ValueError(
            f"TEST.AMP.DTYPE=float16 needs CUDA, but MODEL.DEVICE is {cfg.MODEL.DEVICE!r}: "
            "use TEST.AMP.DTYPE bfloat16 on CPU"
        )
    return getattr(torch, name)
