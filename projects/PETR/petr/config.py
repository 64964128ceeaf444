"""Config keys PETR adds to Detectron2's defaults. Values are the official R50 COCO recipe."""

from detectron2.config import CfgNode as CN


def add_petr_config(cfg):
    """Add every PETR key (model, Swin backbone, data pipeline, solver, test) to `cfg`."""
    _add_model_config(cfg)
    _add_swin_config(cfg)
    _add_data_config(cfg)
    _add_solver_config(cfg)
    _add_test_config(cfg)


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
    p.NUM_QUERIES = 300
    p.NUM_PROPOSALS = 300  # top-k encoder tokens; must equal NUM_QUERIES (query i <-> proposal i)
    p.DETECTIONS_PER_IMAGE = 100
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


def _add_swin_config(cfg):
    cfg.MODEL.SWIN = CN()
    s = cfg.MODEL.SWIN
    s.PRETRAIN_IMG_SIZE = 224
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
    pass


def _add_solver_config(cfg):
    pass


def _add_test_config(cfg):
    pass
