"""ms_deform_attn as a torch.library custom op (torch >= 2.4) and with Python-int level sizes:
the same numbers as with index tensors, no host reads, and torch.compile traces it whole."""

import importlib

import pytest
import torch
from petr_testing import assert_matches, forward_backward, make_inputs, reference_on

from petr.utils.compat import HAS_CUSTOM_OP

msda = importlib.import_module("petr.layers.ms_deform_attn")
needs_custom_op = pytest.mark.skipif(not HAS_CUSTOM_OP, reason="torch.library.custom_op: 2.4+")


def _as_ints(inputs):
    value, shapes, start, loc, attn = inputs
    return value, [tuple(hw) for hw in shapes.tolist()], start.tolist(), loc, attn


@pytest.mark.parametrize("fn", [msda.ms_deform_attn, msda.ms_deform_attn_reference])
@pytest.mark.parametrize("case", ["odd_levels", "one_level", "no_queries"])
def test_int_level_sizes_match_index_tensors(fn, case):
    inputs = make_inputs(case)
    _, sizes, starts, _, _ = _as_ints(inputs)

    def with_ints(value, _shapes, _start, loc, attn):
        return fn(value, sizes, starts, loc, attn)

    assert_matches(forward_backward(with_ints, inputs), reference_on(inputs), 1e-10)


@pytest.mark.parametrize(
    "shapes,start,exc,match",
    [
        (
            [(7, 5), (3, 4), (1, 1)],
            [0, 35],
            ValueError,
            r"level_start_index must be \(L,\) = \(3,\)",
        ),
        ([(7, 5), (3,), (1, 1)], [0, 35, 47], ValueError, r"\(H, W\) int pairs"),
        ([(7, 5), (3, 4), (1.0, 1)], [0, 35, 47], ValueError, r"\(H, W\) int pairs"),
        ([(7, 5), (3, 4), (1, 1)], [0, 35, 46], ValueError, r"index\[2\] is 46"),
        ([(7, 5), (3, 4), (1, 1)], [0, 35.0, 47], TypeError, "must hold ints"),
        ({"a": 1}, [0], TypeError, "spatial_shapes must be a torch.Tensor or a sequence"),
    ],
)
def test_bad_int_level_sizes_raise(shapes, start, exc, match):
    value, _, _, loc, attn = make_inputs("odd_levels")
    with pytest.raises(exc, match=match):
        msda.ms_deform_attn(value, shapes, start, loc, attn)


def test_int_level_sizes_read_nothing_on_the_host(monkeypatch):
    value, shapes, start, loc, attn = _as_ints(make_inputs("odd_levels"))

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("tolist", "item", "__bool__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    loc.requires_grad_()
    msda.ms_deform_attn(value, shapes, start, loc, attn).sum().backward()
    assert loc.grad is not None


@needs_custom_op
def test_custom_op_passes_opcheck():
    value, shapes, _, loc, attn = make_inputs("odd_levels")
    flat = [s for hw in shapes.tolist() for s in hw]
    args = (value.requires_grad_(), flat, loc.requires_grad_(), attn.requires_grad_(), 64)
    torch.library.opcheck(torch.ops.petr.ms_deform_attn.default, args)


@needs_custom_op
def test_compiled_op_has_no_graph_break_and_matches_eager():
    inputs = _as_ints(make_inputs("odd_levels", torch.float32))
    _, shapes, start, _, _ = inputs

    def fn(value, loc, attn):
        return msda.ms_deform_attn(value, shapes, start, loc, attn).square().sum()

    tensors = [t.detach().clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
    explanation = torch._dynamo.explain(fn)(*tensors)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*tensors), tensors)
    want = torch.autograd.grad(fn(*tensors), tensors)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
