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

from petr.utils.ort_session import ort_session

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
    return ort_session(path, threads)


def _feeds(session, image: np.ndarray) -> Dict:
    """Inputs of the graph for one (1, 3, h, w) float32 image: "image", and "image_sizes" (the
    unpadded size) when the graph takes it (the dynamic export)."""
    names = [i.name for i in session.get_inputs()]
    feeds = {names[0]: image}
    if "image_sizes" in names:
        feeds["image_sizes"] = np.array([image.shape[-2:]], dtype=np.int64)
    return feeds


def onnx_latency(
    paths: Dict[str, str], warmup: int = 2, iters: int = 10, seed=0, size=(800, 1333)
) -> Dict:
    """Mean and min ms per image of each graph (name -> path) on one random raw image (the
    graph's fixed input size, else `size` (h, w)), the graphs alternating in this process so
    that machine load hits each alike. Returns {name: {"ms": mean, "ms_min": min}}."""
    sessions = {name: _session(p) for name, p in paths.items()}
    shape = list(next(iter(sessions.values())).get_inputs()[0].shape)
    if not all(isinstance(d, int) for d in shape):
        shape = [1, 3, *size]
    image = np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, _feeds(s, image))
    times = {name: [] for name in sessions}
    for _ in range(iters):
        for name, s in sessions.items():
            feeds = _feeds(s, image)
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[name].append(1000.0 * (time.perf_counter() - t0))
    return {n: {"ms": sum(t) / len(t), "ms_min": min(t)} for n, t in times.items()}


def evaluate_onnx(path: str, cfg, dataset_name: str, max_images: int | None = None) -> Dict:
    """COCO keypoint AP of an exported graph on `dataset_name`, through `PETRONNXPredictor` (the
    front door, onnxruntime, poses back to original pixels, the graph's OKS-NMS), then
    COCOEvaluator. Returns the evaluator's results ({"keypoints": {"AP": ...}, ...})."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ..data.image_io import read_image
    from ..evaluation import build_keypoint_evaluator
    from .onnx_predictor import PETRONNXPredictor

    predictor = PETRONNXPredictor(cfg, path)
    MetadataCatalog.get(dataset_name)  # registered datasets only: a clear KeyError otherwise
    dicts = DatasetCatalog.get(dataset_name)[:max_images]
    evaluator = build_keypoint_evaluator(cfg, dataset_name, output_folder=None)
    evaluator.reset()
    for d in dicts:
        outputs = predictor(read_image(d["file_name"], format="BGR"))
        evaluator.process([{"image_id": d["image_id"]}], [outputs])
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
