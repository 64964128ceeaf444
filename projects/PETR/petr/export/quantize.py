"""int8 PETR for deployment: dynamic quantisation of an exported ONNX graph with onnxruntime,
and the two measurements that decide whether it is worth it (latency against the fp32 graph
in one process, keypoint AP on a registered dataset).

Dynamic quantisation (`onnxruntime.quantization.quantize_dynamic`) stores weights as 8-bit
integers and quantises the activations at run time (uint8, per tensor), so it needs no
calibration data. By default only MatMul and Gemm (the transformer) are quantised, with int8
weights: onnxruntime's ConvInteger was slower than its float32 Conv on every CPU measured here
(int8 convolutions made the whole graph 0.8x as fast: README). `op_types` with "Conv" quantises the
convolutions too, with uint8 weights (the only ConvInteger older onnxruntime runs on CPU).
`keep_fp32` names modules whose layers stay float32; the default, SENSITIVE_MODULES, keeps
the layers whose outputs become coordinates or sampling weights: a quantisation step there
moves every keypoint or sampling point (the sampling-offset and attention-weight projections
of deformable attention, and the keypoint-regression heads).

    python -m petr.export.quantize --fp32 toy.onnx --int8 toy_int8.onnx \
        --config-file configs/petr_toy.yaml --iters 20 --eval petr_toy_val
prints one JSON line: ms per image of both graphs (alternating, this process) and, with
--eval, COCO keypoint AP of each.
"""

import argparse
import json
import re
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

__all__ = [
    "DEFAULT_OPS",
    "QUANTIZED_OPS",
    "SENSITIVE_MODULES",
    "evaluate_onnx",
    "node_module",
    "onnx_latency",
    "quantize_int8",
]

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
DEFAULT_OPS = ("MatMul", "Gemm")
SENSITIVE_MODULES = ("sampling_offsets", "attention_weights", "kpt_head")


def node_module(node) -> str:
    """The PyTorch module path a graph node came from: the innermost "model.…" scope of the
    `namespace` metadata (torch.export-based exporter), else the node name, whose
    "/model/encoder/layers.0/…" path the TorchScript exporter writes."""
    for prop in node.metadata_props:
        if prop.key == "namespace":
            scopes = re.findall(r"(model\.[\w.]+):", prop.value)
            if scopes:
                return scopes[-1]
    return node.name.strip("/").replace("/", ".")


def _nodes_to_exclude(model, keep_fp32: Sequence[str], op_types: Sequence[str]) -> List[str]:
    return [
        n.name
        for n in model.graph.node
        if n.op_type in op_types and any(key in node_module(n) for key in keep_fp32)
    ]


def quantize_int8(
    src: str,
    dst: str,
    keep_fp32: Sequence[str] = SENSITIVE_MODULES,
    op_types: Sequence[str] = DEFAULT_OPS,
) -> Dict:
    """Write the dynamically quantised `src` graph to `dst`: 8-bit weights for `op_types`
    (MatMul/Gemm int8, Conv uint8), except in modules whose path contains one of `keep_fp32`
    (empty: the whole model). Returns {"quantized": number of quantisable nodes quantised,
    "kept_fp32": names of those kept}."""
    import os
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    unknown = set(op_types) - set(QUANTIZED_OPS)
    if unknown or not op_types:
        raise ValueError(f"op_types {list(op_types)}: choose among {QUANTIZED_OPS}")
    model = onnx.load(src, load_external_data=False)
    kept = _nodes_to_exclude(model, keep_fp32, op_types)
    candidates = sum(n.op_type in op_types for n in model.graph.node)
    passes = [
        (ops, weights)
        for ops, weights in (
            ([t for t in op_types if t != "Conv"], QuantType.QInt8),
            ([t for t in op_types if t == "Conv"], QuantType.QUInt8),
        )
        if ops
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (ops, weights) in enumerate(passes):
            out = dst if i == len(passes) - 1 else os.path.join(tmp, f"pass{i}.onnx")
            quantize_dynamic(
                src, out, op_types_to_quantize=ops, weight_type=weights, nodes_to_exclude=kept
            )
            src = out
    return {"quantized": candidates - len(kept), "kept_fp32": kept}


def _session(path: str, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _input_shape(session) -> List:
    return list(session.get_inputs()[0].shape)  # ints, or names for dynamic axes


def onnx_latency(paths: Dict[str, str], warmup: int = 2, iters: int = 10, seed=0) -> Dict:
    """Mean and min ms per image of each graph (name -> path) on one random raw image of the
    first graph's input size, the graphs alternating in this process so that machine load hits
    each alike. Returns {name: {"ms": mean, "ms_min": min}}."""
    sessions = {name: _session(p) for name, p in paths.items()}
    shape = _input_shape(next(iter(sessions.values())))
    if not all(isinstance(d, int) for d in shape):
        raise ValueError(f"onnx_latency needs a fixed input size, the graph has {shape}")
    image = np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, {s.get_inputs()[0].name: image})
    times = {name: [] for name in sessions}
    for _ in range(iters):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: image})
            times[name].append(1000.0 * (time.perf_counter() - t0))
    return {n: {"ms": sum(t) / len(t), "ms_min": min(t)} for n, t in times.items()}


def _padded_input(image: np.ndarray, shape, pixel_mean: np.ndarray) -> np.ndarray:
    """(3, h, w) uint8 -> (1, 3, H, W) float32, padded bottom/right with the pixel mean (zero
    after normalisation, as the official collate) when the graph has a fixed size H x W."""
    c, h, w = image.shape
    H, W = shape[2:]
    if not (isinstance(H, int) and isinstance(W, int)):
        return image[None].astype(np.float32)  # a dynamic-size graph takes the image as it is
    if h > H or w > W:
        raise ValueError(f"image {h}x{w} is larger than the graph's fixed input {H}x{W}")
    out = np.broadcast_to(pixel_mean.reshape(3, 1, 1), (3, H, W)).astype(np.float32)
    out[:, :h, :w] = image
    return out[None]


def evaluate_onnx(path: str, cfg, dataset_name: str, max_images: int | None = None) -> Dict:
    """COCO keypoint AP of an exported graph on `dataset_name`: every image through the front
    door (`PETRPreprocessor`, cfg's test resize), the graph in onnxruntime (a fixed-size graph
    gets the resized image padded bottom/right: its padding is image content, as its
    `export_onnx` limits say), poses back to original pixels, the model's OKS-NMS when
    MODEL.PETR.OKS_NMS_THRESH_TEST > 0 (not exportable: applied here), then COCOEvaluator.
    Returns the evaluator's results ({"keypoints": {"AP": ...}, ...})."""
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image

    from ..data.metadata import keypoint_spec
    from ..data.preprocess import PETRPreprocessor
    from ..evaluation import build_keypoint_evaluator
    from ..modeling.postprocess import oks_nms, pose_instances

    session = _session(path)
    shape = _input_shape(session)
    preprocessor = PETRPreprocessor(cfg)
    mean = np.asarray(cfg.MODEL.PIXEL_MEAN, dtype=np.float32)
    p = cfg.MODEL.PETR
    sigmas = keypoint_spec(
        [dataset_name],
        default_num_keypoints=p.NUM_KEYPOINTS,
        oks_sigmas=p.OKS_SIGMAS,
        sigmas_key="MODEL.PETR.OKS_SIGMAS",
    ).oks_sigmas
    if p.OKS_NMS_THRESH_TEST > 0 and sigmas is None:
        raise ValueError(f"{dataset_name}: OKS-NMS needs keypoint_oks_sigmas in its metadata")
    MetadataCatalog.get(dataset_name)  # registered datasets only: a clear KeyError otherwise
    dicts = DatasetCatalog.get(dataset_name)[:max_images]
    evaluator = build_keypoint_evaluator(cfg, dataset_name, output_folder=None)
    evaluator.reset()
    offset = p.OUTPUT_PIXEL_OFFSET
    for d in dicts:
        inputs = preprocessor(read_image(d["file_name"], format="BGR"), "BGR")
        image = inputs["image"].numpy()
        h, w = image.shape[1:]
        scores, kpts, _ = session.run(None, {"image": _padded_input(image, shape, mean)})
        kpts = torch.from_numpy(kpts[:, :, :2]) - offset  # pixels of the resized image
        scale = torch.tensor([inputs["width"] / w, inputs["height"] / h])
        inst = pose_instances(kpts * scale + offset, torch.from_numpy(scores), (h, w))
        inst._image_size = (inputs["height"], inputs["width"])
        if p.OKS_NMS_THRESH_TEST > 0:
            sig = torch.tensor(sigmas, dtype=torch.float32)
            inst = inst[oks_nms(inst.pred_keypoints, inst.scores, sig, p.OKS_NMS_THRESH_TEST)]
        evaluator.process([{"image_id": d["image_id"], **inputs}], [{"instances": inst}])
    return evaluator.evaluate()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", required=True, help="the exported fp32 graph")
    parser.add_argument("--int8", required=True, help="its quantised copy (--quantize int8)")
    parser.add_argument("--config-file", help="the model's config (needed by --eval)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10, help="timed runs of each graph")
    parser.add_argument("--eval", metavar="DATASET", help="also COCO keypoint AP on DATASET")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    paths = {"fp32": args.fp32, "int8": args.int8}
    result = {"latency": onnx_latency(paths, args.warmup, args.iters)}
    result["speedup"] = result["latency"]["fp32"]["ms"] / result["latency"]["int8"]["ms"]
    if args.eval:
        if not args.config_file:
            parser.error("--eval needs --config-file")
        from petr import get_petr_cfg

        cfg = get_petr_cfg(args.config_file, args.opts)
        result["keypoint_AP"] = {
            name: evaluate_onnx(path, cfg, args.eval, args.max_images)["keypoints"]["AP"]
            for name, path in paths.items()
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
