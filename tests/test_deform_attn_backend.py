"""petr.layers.deform_attn_backend: the explicit, public switch between the compiled kernel and
the pure-PyTorch reference (ONNX export forces the reference with it)."""

import importlib
import warnings

import pytest
import torch
from petr_testing import forward_backward, make_inputs

from petr.layers import deform_attn_backend, ms_deform_attn, ms_deform_attn_backend

msda = importlib.import_module("petr.layers.ms_deform_attn")


def _count_calls(monkeypatch, name):
    calls = []
    original = getattr(msda, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(msda, name, spy)
    return calls


def test_reference_is_forced_within_the_block_and_restored_after(monkeypatch):
    if ms_deform_attn_backend("cpu") == "reference":
        pytest.skip("petr._C is not built: 'auto' would run the reference too")
    reference, kernel = (
        _count_calls(monkeypatch, "_reference"),
        _count_calls(monkeypatch, "_kernel"),
    )
    inputs = make_inputs("odd_levels")
    with deform_attn_backend("reference"):
        assert ms_deform_attn_backend("cpu") == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a forced choice is not a fallback: no warning
            forced = forward_backward(ms_deform_attn, inputs)
    assert (len(reference), len(kernel)) == (1, 0)
    assert ms_deform_attn_backend("cpu") == "compiled"
    auto = forward_backward(ms_deform_attn, inputs)
    assert (len(reference), len(kernel)) == (1, 1)
    for a, b in zip(forced, auto):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_switch_is_restored_on_error_and_nests():
    auto = ms_deform_attn_backend("cpu")  # what runs without a forced choice
    with pytest.raises(RuntimeError, match="boom"):
        with deform_attn_backend("compiled"):
            assert ms_deform_attn_backend("cpu") == "compiled"
            raise RuntimeError("boom")
    assert ms_deform_attn_backend("cpu") == auto
    with deform_attn_backend("compiled"):
        with deform_attn_backend("reference"):
            assert ms_deform_attn_backend("cpu") == "reference"
            with deform_attn_backend("auto"):
                assert ms_deform_attn_backend("cpu") == auto
        assert ms_deform_attn_backend("cpu") == "compiled"
    assert ms_deform_attn_backend("cpu") == auto


def test_unknown_backend_and_missing_kernel_raise(monkeypatch):
    with pytest.raises(ValueError, match="'grid_sample' is not one of"):
        with deform_attn_backend("grid_sample"):
            pass
    monkeypatch.setattr(msda, "_C", None)
    monkeypatch.setattr(msda, "_C_ERROR", "petr._C could not be imported (test)")
    with deform_attn_backend("compiled"):
        with pytest.raises(RuntimeError, match=r"deform_attn_backend\('compiled'\).*\(test\)"):
            ms_deform_attn(*make_inputs("one_level"))
