"""The onnxruntime session every PETR route opens (the ONNX predictor, export verification,
quantisation, the benchmark). Imports no torch: a deployment runs it with numpy alone.

The CPU memory arena and the memory-pattern planner are off. With them on (onnxruntime's
defaults) PETR-R50 at 800x1333 peaked at 3.5 GB RSS, 2.3x eager PyTorch's, because the arena
keeps the largest intermediate of every shape the run saw (the deformable attention's sampled
values, the backbone's im2col buffers); without them it peaked at 2.0 GB at the same speed
(2 threads, onnxruntime 1.32, tools/benchmark.py --backends).
"""

__all__ = ["ort_session"]


def ort_session(path: str, threads=None, providers=("CPUExecutionProvider",), spin=True):
    """An onnxruntime InferenceSession of the graph at `path`. threads: intra-op threads
    (default: onnxruntime's, one per core); spin False stops idle threads from busy-waiting
    (for a process that runs other work between calls)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=list(providers))
