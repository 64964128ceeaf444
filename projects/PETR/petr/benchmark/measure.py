"""One benchmark measurement of PETR (inference or training) on synthetic data.

Run as `python -m petr.benchmark.measure '<json spec>'` in a fresh process per measurement, so
that the process's peak RSS (VmHWM) belongs to that measurement alone; prints one JSON line.
Spec keys: config_file, opts, mode ("inference" | "train"), device, precision ("fp32" | "fp16"
| "bf16": inference through the model's TEST.AMP, training under torch.autocast), height,
width, batch_size, warmup, iters; optional compile (bool), compile_mode (torch.compile mode,
default MODEL.PETR.COMPILE.MODE), compile_backend (default "inductor"), compile_shapes (a list
of "static" | "dynamic": torch.compile's dynamic=False / True, one compiled model each; default
MODEL.PETR.COMPILE.DYNAMIC's), compare ("keypoint_rcnn" | "joint_scores"), kpt_boxes (person
boxes per image for Keypoint R-CNN's keypoint head, default 20) and stages (bool: also time
each stage of the eager model).
"""

import contextlib
import copy
import functools
import json
import sys
import time
from typing import Dict, List

import torch
from detectron2.modeling import build_model

from petr import get_petr_cfg
from petr.checkpoint.checkpointer import PETRCheckpointer
from petr.data.synthetic import random_person_batch
from petr.engine.solver import build_petr_optimizer
from petr.layers import ms_deform_attn_backend

from .keypoint_rcnn import KeypointRCNNRunner, keypoint_rcnn_batch
from .rss import peak_rss_mib
from .stages import StageTimer

__all__ = ["PEOPLE_PER_IMAGE", "deform_attn_backend", "run_measurement", "synthetic_batch"]

PEOPLE_PER_IMAGE = 5  # synthetic training targets per image (COCO train averages ~3 with joints)
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TEST_AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}  # TEST.AMP.DTYPE of a precision


def deform_attn_backend(device_type: str) -> str:
    """'compiled' when ms_deform_attn runs petr._C on this device type, else 'reference'."""
    return ms_deform_attn_backend(device_type)


def synthetic_batch(
    num_keypoints: int, height: int, width: int, batch_size: int, with_targets: bool, seed=0
) -> List[Dict]:
    """Detectron2 input dicts of random uint8 (3, height, width) images (`random_person_batch`,
    the tests' synthetic data) with, for training, PEOPLE_PER_IMAGE random poses per image."""
    people = [PEOPLE_PER_IMAGE if with_targets else 0] * batch_size
    batch = random_person_batch(num_keypoints, [(height, width)] * batch_size, people, seed)
    if not with_targets:
        for x in batch:
            del x["instances"]
    return batch


def _build(spec: Dict):
    """The model as a user runs it: fp16/bf16 inference is the model's own TEST.AMP."""
    opts = list(spec.get("opts", []))
    if spec["mode"] == "inference" and spec["precision"] != "fp32":
        opts += ["TEST.AMP.ENABLED", "True", "TEST.AMP.DTYPE", TEST_AMP_DTYPES[spec["precision"]]]
    cfg = get_petr_cfg(spec["config_file"], opts)
    cfg.MODEL.DEVICE = spec["device"]
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        PETRCheckpointer.from_config(cfg, model, config_file=spec["config_file"]).load(
            cfg.MODEL.WEIGHTS
        )
    return cfg, model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _stats(times: List[float]) -> Dict:
    return {"ms_per_iter": 1000.0 * sum(times) / len(times), "ms_per_iter_min": 1000.0 * min(times)}


def _autocast(device: str, precision: str):
    return torch.autocast(
        device.split(":")[0],
        dtype=AUTOCAST_DTYPES.get(precision, torch.float32),
        enabled=precision != "fp32",
    )


def _steps(spec: Dict, cfg, model):
    """step(module) runs one inference or training iteration through `module` (the eager model
    or its compiled wrapper, which share parameters and optimiser)."""
    device, precision = spec["device"], spec["precision"]
    train = spec["mode"] == "train"
    batch = synthetic_batch(
        model.num_keypoints, spec["height"], spec["width"], spec["batch_size"], train
    )
    autocast = _autocast(device, precision)
    if not train:

        def step(module):  # the precision is the model's TEST.AMP (see _build)
            with torch.no_grad():
                return module(batch)

        return batch, step
    # The training recipe's optimiser: learning-rate multipliers, weight decay and gradient
    # clipping (inside its step, as in training; Detectron2's AMPTrainer does not unscale first).
    optimizer = build_petr_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    def step(module):
        with autocast:
            losses = module(batch)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return batch, step


def compile_shapes(spec: Dict, cfg) -> List[str]:
    """The compiled variants to time: spec "compile_shapes", else MODEL.PETR.COMPILE.DYNAMIC's."""
    shapes = spec.get("compile_shapes") or [
        "dynamic" if cfg.MODEL.PETR.COMPILE.DYNAMIC else "static"
    ]
    bad = [s for s in shapes if s not in ("static", "dynamic")]
    if bad:
        raise ValueError(f"compile_shapes must be 'static' or 'dynamic', got {bad}")
    return list(dict.fromkeys(shapes))


def run_measurement(spec: Dict) -> Dict:
    """Times `warmup` untimed and `iters` timed iterations of the eager model and, alternating
    with it in this process, of the compiled model (spec "compile") and of Keypoint R-CNN
    (spec "compare" == "keypoint_rcnn", inference) or of the same model with
    MODEL.PETR.JOINT_SCORES none (spec "compare" == "joint_scores", inference; its result
    "joint_scores_none" also holds the eager model's mode). Returns for the eager model ms_per_iter
    (mean), ms_per_iter_min, images_per_s, iters_per_s, peak_mem_mib (CUDA:
    max_memory_allocated; CPU: peak RSS increase over the built model), the deformable-attention
    backend and, with spec "stages", "stages" (mean ms per stage); "compiled" maps "static" /
    "dynamic" to the ms_per_iter, ms_per_iter_min and compile_s (the first call) of that
    compiled model; "keypoint_rcnn" holds ms_per_iter, ms_per_iter_min and boxes (the mean
    person boxes per image its keypoint head ran on); for fp16/bf16 inference, an fp32 copy
    of the model is timed alongside (the baseline of the speed-up): "eager_fp32" holds its
    ms_per_iter and ms_per_iter_min."""
    device, precision, train = spec["device"], spec["precision"], spec["mode"] == "train"
    if precision not in ("fp32", *AUTOCAST_DTYPES):
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    if precision == "fp16" and not device.startswith("cuda"):
        raise ValueError("fp16 autocast is only benchmarked on CUDA; use bf16 on CPU")
    compare = spec.get("compare")
    if compare not in (None, "keypoint_rcnn", "joint_scores"):
        raise ValueError(
            f"compare must be None, 'keypoint_rcnn' or 'joint_scores', got {compare!r}"
        )
    if compare and train:
        raise ValueError(f"the {compare} comparison times inference only")
    cfg, model = _build(spec)
    model.train(train)
    batch, step = _steps(spec, cfg, model)
    runners = {"eager": lambda: step(model)}
    if not train and precision != "fp32":
        fp32_model = copy.deepcopy(model)  # before compiling: the same weights, TEST.AMP off
        fp32_model.autocast_dtype = None
        runners["eager_fp32"] = lambda: step(fp32_model)
    if spec.get("compile"):
        backend = spec.get("compile_backend", "inductor")
        mode = (
            (spec.get("compile_mode") or cfg.MODEL.PETR.COMPILE.MODE)
            if backend == "inductor"
            else None
        )
        for shapes in compile_shapes(spec, cfg):
            compiled = torch.compile(model, backend=backend, mode=mode, dynamic=shapes == "dynamic")
            runners[f"compiled {shapes}"] = functools.partial(step, compiled)
    if compare == "joint_scores":  # the same model and weights, MODEL.PETR.JOINT_SCORES none
        joint_mode = model.joint_scores

        def run_without_joint_scores():
            model.joint_scores = "none"
            try:
                step(model)
            finally:
                model.joint_scores = joint_mode

        runners["joint_scores_none"] = run_without_joint_scores
    if compare == "keypoint_rcnn":
        krcnn = KeypointRCNNRunner(device, spec.get("kpt_boxes", 20))
        krcnn_batch = keypoint_rcnn_batch(batch)
        boxes = []

        def run_krcnn():
            with torch.no_grad(), _autocast(device, precision):
                out = krcnn(krcnn_batch)
            boxes.extend(o["instances"].pred_keypoints.shape[0] for o in out)

        runners["keypoint_rcnn"] = run_krcnn

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_rss_mib()
    first_call = {}
    for name, run in runners.items():
        first_call[name] = _timed(run, device)
        for _ in range(spec["warmup"] - 1):
            run()
    _sync(device)
    # Stage hooks only when asked for: on CUDA they synchronise at every stage boundary, which
    # would slow the eager iterations against the compiled ones.
    timer = StageTimer(model, device) if spec.get("stages") else None
    times = {name: [] for name in runners}
    for _ in range(spec["iters"]):  # alternate, so that machine load hits every model alike
        for name, run in runners.items():
            with timer if timer is not None and name == "eager" else contextlib.nullcontext():
                times[name].append(_timed(run, device))
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mib() - rss_before
    eager = _stats(times["eager"])
    mean = eager["ms_per_iter"] / 1000.0
    result = {
        **eager,
        "iters_per_s": 1.0 / mean,
        "images_per_s": spec["batch_size"] / mean,
        "peak_mem_mib": peak,
        "deform_attn": deform_attn_backend(device.split(":")[0]),
        "threads": torch.get_num_threads(),
    }
    if timer is not None:
        result["stages"] = timer.mean_ms()
    compiled = [name for name in runners if name.startswith("compiled ")]
    if compiled:
        result["compiled"] = {
            name.split()[1]: {**_stats(times[name]), "compile_s": first_call[name]}
            for name in compiled
        }
    if compare == "joint_scores":
        result["joint_scores_none"] = {**_stats(times["joint_scores_none"]), "mode": joint_mode}
    if "eager_fp32" in runners:
        result["eager_fp32"] = _stats(times["eager_fp32"])
    if compare == "keypoint_rcnn":
        result["keypoint_rcnn"] = {
            **_stats(times["keypoint_rcnn"]),
            "boxes": sum(boxes) / max(len(boxes), 1),
        }
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m petr.benchmark.measure '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    if spec["iters"] < 1 or spec["warmup"] < 0 or spec["batch_size"] < 1:
        raise ValueError(f"Need iters >= 1, warmup >= 0 and batch_size >= 1, got {spec}")
    print(json.dumps(run_measurement(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
