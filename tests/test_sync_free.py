"""PETR inference reads no tensor value on the host: level sizes travel as Python ints, so the
forward has no device-to-host sync (one stall per attention call on a GPU) and torch.compile
traces it as one graph. Two checks: Tensor methods that read values are patched to fail (any
torch), and dynamo's graph-break count (torch >= 2.4, where the kernel is a custom op)."""

import inspect
import os

import pytest
import torch
from detectron2.modeling import build_model
from petr_testing import opera_tiny_cfg

from petr.data.synthetic import random_person_batch
from petr.utils.compat import HAS_CUSTOM_OP

H, W = 96, 128
# Python-level ways of reading a tensor's value (boolean-mask indexing reads it in C++, which
# the graph-break count below catches instead).
HOST_READS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy", "cpu")


@pytest.fixture(scope="module")
def model():
    return build_model(opera_tiny_cfg()).eval()


def _images(sizes):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
            for h, w in sizes]  # fmt: skip


@pytest.fixture
def forbid_host_reads(monkeypatch):
    calls = []

    def guard(name, original):
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            raise AssertionError(f"inference called Tensor.{name}")

        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    original = torch.repeat_interleave

    def repeat_interleave(input, repeats=None, *args, **kwargs):
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            calls.append("repeat_interleave")
            raise AssertionError("repeat_interleave with tensor repeats and no output_size")
        return original(input, repeats, *args, **kwargs)

    monkeypatch.setattr(torch, "repeat_interleave", repeat_interleave)
    return calls


def test_guard_catches_a_host_read(forbid_host_reads):
    with pytest.raises(AssertionError, match="Tensor.item"):
        torch.ones(1).item()
    with pytest.raises(AssertionError, match="Tensor.__bool__"):
        bool(torch.ones(1))
    with pytest.raises(AssertionError, match="output_size"):
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]))


@pytest.mark.parametrize("sizes", [[(H, W)], [(H, W), (80, 112)]], ids=["one", "padded_batch"])
def test_inference_reads_no_tensor_value_on_the_host(model, forbid_host_reads, sizes):
    with torch.no_grad():
        results = model(_images(sizes))
    assert not forbid_host_reads
    assert [r["instances"].image_size for r in results] == sizes
    assert all(len(r["instances"]) == 10 for r in results)


@pytest.mark.skipif(not HAS_CUSTOM_OP, reason="the kernel is opaque to dynamo before torch 2.4")
def test_whole_model_inference_traces_without_graph_breaks(model):
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(_images([(H, W)]))
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_training_reads_device_values_only_in_the_matcher(monkeypatch):
    """Per training step, the only host reads of model or target tensors are the matcher's:
    one transfer per matching (encoder proposals and each pose-decoder layer), whatever the
    batch size. The heatmap targets are drawn from the loader's host copies."""
    model = build_model(opera_tiny_cfg()).train()
    batch = random_person_batch(17, [(96, 128), (80, 112), (96, 96)], [3, 2, 0])
    host_files = ("heatmap_target.py",)  # draws on the host copies: no device read
    reads = []

    def guard(name, original):
        def wrapper(self, *args, **kwargs):
            caller = os.path.basename(inspect.stack()[1].filename)
            if caller not in host_files:
                reads.append((name, caller))
            return original(self, *args, **kwargs)

        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    model(batch)
    monkeypatch.undo()
    matchings = 1 + len(model.pose_decoder.layers)  # encoder proposals + every pose layer
    assert reads == [("cpu", "matcher.py"), ("numpy", "matcher.py")] * matchings
