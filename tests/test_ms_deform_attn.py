"""petr.layers.ms_deform_attn: every compiled backend against the grid_sample reference.

The reference is evaluated in float64 on the very inputs a backend sees, so the tolerances
(1e-10 for float64, 1e-5 for float32, relative to each tensor's largest magnitude when that
exceeds 1) measure the backend's own error.
"""

import importlib
import os
import warnings

import pytest
import torch
from petr_testing import CASES, assert_matches, forward_backward, make_inputs, reference_on
from torch.utils.cpp_extension import is_ninja_available, load_inline

msda = importlib.import_module("petr.layers.ms_deform_attn")
ms_deform_attn = msda.ms_deform_attn
ms_deform_attn_reference = msda.ms_deform_attn_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "projects", "PETR", "petr", "layers", "csrc")
HAS_CUDA = torch.cuda.is_available()
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def kernel_op(device_type):
    """ms_deform_attn, after making sure it will not fall back to the reference on this device."""
    # setup.py always builds the CPU kernel (and the CUDA one where a GPU is visible).
    assert msda._missing_backend(device_type) is None, msda._missing_backend(device_type)
    return ms_deform_attn


def test_cpu_kernel_is_parallel():
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch does not use the OpenMP backend")
    assert msda._C.cpu_kernel_is_parallel(), "petr._C was compiled without -fopenmp"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_kernel_matches_reference(case, dtype):
    inputs = make_inputs(case, dtype)
    assert_matches(forward_backward(kernel_op("cpu"), inputs), reference_on(inputs), TOL[dtype])


def test_reference_matches_itself_across_dtypes():
    # The float32 reference agrees with the float64 one: the tolerances above are meaningful.
    inputs = make_inputs("odd_levels", torch.float32)
    assert_matches(forward_backward(ms_deform_attn_reference, inputs), reference_on(inputs), 1e-5)


def test_samples_far_outside_give_zero_output_and_gradients():
    value, shapes, start, loc, attn = make_inputs("odd_levels", lo=1.5, hi=3.0)
    loc[..., 0] *= -1  # x in [-3, -1.5]: every corner is padding
    out, g_value, g_loc, g_attn = forward_backward(
        kernel_op("cpu"), (value, shapes, start, loc, attn)
    )
    for t in (out, g_value, g_loc, g_attn):
        assert torch.count_nonzero(t) == 0


def test_border_sample_uses_zero_padding():
    # One 1x2 map with values 4 and 6; x = 0.25 is the centre of pixel 0, y = 0 sits half a pixel
    # above the map, so half of the bilinear weight falls on padding.
    value = torch.tensor([4.0, 6.0], dtype=torch.float64).view(1, 2, 1, 1)
    shapes, start = torch.tensor([[1, 2]]), torch.tensor([0])
    loc = torch.tensor([0.25, 0.0], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    attn = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    for fn in (kernel_op("cpu"), ms_deform_attn_reference):
        assert fn(value, shapes, start, loc, attn).item() == pytest.approx(2.0, abs=1e-12)


def test_im2col_step_does_not_change_results():
    inputs = make_inputs("odd_levels")
    op = kernel_op("cpu")
    base = forward_backward(op, inputs)
    for step in (1, 3, 128):
        for a, b in zip(forward_backward(op, inputs, im2col_step=step), base):
            assert torch.equal(a, b)


def test_cpu_backward_is_deterministic():
    inputs = make_inputs("contended", torch.float32)
    first = forward_backward(kernel_op("cpu"), inputs)
    for a, b in zip(forward_backward(kernel_op("cpu"), inputs), first):
        assert torch.equal(a, b)


def test_gradcheck_cpu_kernel():
    kernel_op("cpu")
    value, shapes, start, loc, attn = make_inputs(
        (1, ((3, 4), (2, 3)), 2, 3, 4, 2), lo=0.05, hi=0.95
    )

    def fn(v, x, a):
        return msda.MSDeformAttnFunction.apply(v, shapes, start, x, a, 64)

    args = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(fn, args)


def _bad_inputs():
    """(id, mutate(inputs dict), exception, message regex) for each validation error."""
    mismatched_start = torch.tensor([0, 36, 47])
    return [
        ("value_3d", lambda d: d.update(value=d["value"][0]), ValueError, r"value must be \(N"),
        ("value_int", lambda d: d.update(value=d["value"].long()), TypeError, "value dtype"),
        ("value_half_cpu", lambda d: d.update(value=d["value"].half()), TypeError, "float16"),
        ("loc_dtype", lambda d: d.update(loc=d["loc"].float()), TypeError, "sampling_locations"),
        ("attn_dtype", lambda d: d.update(attn=d["attn"].float()), TypeError, "attention_weig"),
        ("shapes_int32", lambda d: d.update(shapes=d["shapes"].int()), TypeError, "int64"),
        ("start_float", lambda d: d.update(start=d["start"].double()), TypeError, "level_start"),
        ("not_tensor", lambda d: d.update(attn=d["attn"].tolist()), TypeError, "torch.Tensor"),
        (
            "device",
            lambda d: d.update(loc=torch.empty_like(d["loc"], device="meta")),
            ValueError,
            "sampling_locations is on meta",
        ),
        (
            "value_noncontig",
            lambda d: d.update(value=d["value"].transpose(2, 3).contiguous().transpose(2, 3)),
            ValueError,
            "value must be contiguous",
        ),
        (
            "loc_noncontig",
            lambda d: d.update(loc=d["loc"].transpose(0, 1).contiguous().transpose(0, 1)),
            ValueError,
            "sampling_locations must be contiguous",
        ),
        (
            "loc_no_xy",
            lambda d: d.update(loc=d["loc"][..., 0].contiguous()),
            ValueError,
            r"\(N, Q, M, L, P, 2\)",
        ),
        ("loc_batch", lambda d: d.update(loc=d["loc"][:1]), ValueError, "with N=2"),
        (
            "attn_shape",
            lambda d: d.update(attn=d["attn"][:, :, :, :, :1].contiguous()),
            ValueError,
            "attention",
        ),
        (
            "shapes_3col",
            lambda d: d.update(shapes=d["shapes"].repeat(1, 2)[:, :3].contiguous()),
            ValueError,
            r"\(L, 2\)",
        ),
        ("start_len", lambda d: d.update(start=d["start"][:2]), ValueError, r"\(L,\) = \(3,\)"),
        (
            "start_values",
            lambda d: d.update(start=mismatched_start),
            ValueError,
            r"index\[1\] is 36",
        ),
        (
            "shapes_sum",
            lambda d: d.update(shapes=torch.tensor([[7, 5], [3, 4], [1, 2]])),
            ValueError,
            "cover 49 tokens but value has S=48",
        ),
        (
            "shapes_nonpositive",
            lambda d: d.update(shapes=torch.tensor([[7, 5], [-3, -4], [1, 1]])),
            ValueError,
            r"spatial_shapes\[1\] must be positive",
        ),
        ("im2col_zero", lambda d: d.update(step=0), ValueError, "im2col_step"),
    ]


@pytest.mark.parametrize("fn", [ms_deform_attn, ms_deform_attn_reference], ids=["op", "reference"])
@pytest.mark.parametrize(
    "mutate,exc,match", [b[1:] for b in _bad_inputs()], ids=[b[0] for b in _bad_inputs()]
)
def test_invalid_inputs_raise(fn, mutate, exc, match):
    value, shapes, start, loc, attn = make_inputs("odd_levels")
    d = dict(value=value, shapes=shapes, start=start, loc=loc, attn=attn, step=64)
    mutate(d)
    with pytest.raises(exc, match=match):
        fn(d["value"], d["shapes"], d["start"], d["loc"], d["attn"], im2col_step=d["step"])


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(1, torch.tensor([[7, 5], [3, 4], [1, 2]])), "S=48"),
        (lambda a: a.__setitem__(3, a[3].transpose(0, 1).contiguous().transpose(0, 1)), "contig"),
        (lambda a: a.__setitem__(4, a[4].float()), "attention_weights has dtype Float"),
        (lambda a: a.__setitem__(0, a[0][0]), r"value must be \(N, S, M, D\)"),
        (lambda a: a.__setitem__(2, torch.tensor([0, 36, 47])), r"level_start_index\[1\] is 36"),
    ],
)
def test_extension_checks_its_inputs(mutate, match):
    # Direct callers of petr._C get TORCH_CHECK errors instead of out-of-bounds reads.
    args = list(make_inputs("odd_levels"))
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        msda._C.ms_deform_attn_forward(*args, 64)


def test_extension_checks_grad_output_shape():
    args = make_inputs("odd_levels")
    with pytest.raises(RuntimeError, match=r"grad_output must be \(N, Q, M \* D\)"):
        msda._C.ms_deform_attn_backward(*args, torch.zeros(2, 11, 38, dtype=torch.float64), 64)


def test_fallback_to_reference_warns_once(monkeypatch):
    monkeypatch.setattr(msda, "_C", None)
    monkeypatch.setattr(msda, "_C_ERROR", "petr._C could not be imported (test)")
    monkeypatch.setattr(msda, "_warned", set())
    assert msda.ms_deform_attn_backend("cpu") == "reference"
    inputs = make_inputs("odd_levels")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = forward_backward(ms_deform_attn, inputs)
        second = forward_backward(ms_deform_attn, inputs)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "could not be imported (test)" in messages[0] and "reference" in messages[0]
    assert_matches(first, reference_on(inputs), 1e-12)
    assert_matches(second, reference_on(inputs), 1e-12)


def test_missing_cuda_backend_is_reported():
    if msda._C.has_cuda():
        pytest.skip("petr._C has its CUDA kernels")
    assert msda._missing_backend("cuda") == "petr._C was built without CUDA"
    assert msda.ms_deform_attn_backend("cuda") == "reference"
    assert msda.ms_deform_attn_backend("cpu") == "compiled"


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [*CASES, "many_rows"])
def test_cuda_kernel_matches_reference(case, dtype):
    if case == "many_rows":  # more warps than the grid holds: exercises the grid-stride loop
        case = (2, ((9, 11), (5, 6), (3, 3), (1, 2)), 8, 32, 1500, 4)
    inputs = make_inputs(case, dtype, device="cuda")
    assert_matches(forward_backward(kernel_op("cuda"), inputs), reference_on(inputs), TOL[dtype])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gradcheck_cuda_kernel():
    case = (2, ((3, 4), (2, 3)), 2, 35, 4, 2)
    kernel_op("cuda")
    value, shapes, start, loc, attn = make_inputs(case, device="cuda", lo=0.05, hi=0.95)

    def fn(v, x, a):
        return msda.MSDeformAttnFunction.apply(v, shapes, start, x, a, 64)

    args = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(fn, args, nondet_tol=1e-12)


# Runs the real CUDA kernels (ms_deform_attn_cuda_kernels.cuh) on the CPU: one thread per lane,
# a grid of 2 blocks x 8 warps, so rows > warps exercises the grid-stride loop. The output
# starts as NaN, so a row the kernel forgets to write fails the comparison.
EMULATION_HARNESS = r"""
#include <torch/extension.h>
#include "ms_deform_attn/cuda_emulation.h"
#include "ms_deform_attn/ms_deform_attn_cuda_kernels.cuh"

using namespace petr;

at::Tensor forward(at::Tensor value, at::Tensor shapes, at::Tensor start, at::Tensor loc,
                   at::Tensor attn, int64_t grid) {
  const auto dims = msda_cuda::make_dims(value, loc);
  auto out = at::full({value.size(0), dims.Q, dims.M * dims.D}, NAN, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "fwd", [&] {
    const auto v = value.data_ptr<scalar_t>(), l = loc.data_ptr<scalar_t>();
    const auto a = attn.data_ptr<scalar_t>();
    const auto o = out.data_ptr<scalar_t>();
    const auto s = shapes.data_ptr<int64_t>(), st = start.data_ptr<int64_t>();
    cuda_emulation::launch(grid, msda_cuda::kThreadsPerBlock, [&] {
      msda_cuda::forward_kernel<scalar_t>(v, s, st, l, a, o, dims);
    });
  });
  return out;
}

std::vector<at::Tensor> backward(at::Tensor value, at::Tensor shapes, at::Tensor start,
                                 at::Tensor loc, at::Tensor attn, at::Tensor grad_out,
                                 int64_t grid) {
  const auto dims = msda_cuda::make_dims(value, loc);
  auto grad_loc = at::zeros_like(loc), grad_attn = at::zeros_like(attn);
  at::Tensor grad_value;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    auto acc = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
    const auto v = value.data_ptr<scalar_t>(), l = loc.data_ptr<scalar_t>();
    const auto a = attn.data_ptr<scalar_t>(), g = grad_out.data_ptr<scalar_t>();
    const auto gl = grad_loc.data_ptr<scalar_t>(), ga = grad_attn.data_ptr<scalar_t>();
    const auto gv = acc.data_ptr<acc_t>();
    const auto s = shapes.data_ptr<int64_t>(), st = start.data_ptr<int64_t>();
    cuda_emulation::launch(grid, msda_cuda::kThreadsPerBlock, [&] {
      msda_cuda::backward_kernel<scalar_t, acc_t>(v, s, st, l, a, g, gv, gl, ga, dims);
    });
    grad_value = acc.to(value.scalar_type());
  });
  return {grad_value, grad_loc, grad_attn};
}
"""


@pytest.fixture(scope="module")
def emulated_cuda(tmp_path_factory):
    if not is_ninja_available():
        pytest.skip("torch.utils.cpp_extension.load_inline needs ninja")
    return load_inline(
        "msda_cuda_emulation",
        cpp_sources=[EMULATION_HARNESS],
        functions=["forward", "backward"],
        extra_cflags=["-O1"],  # the C++ standard is torch's choice
        extra_include_paths=[CSRC],
        build_directory=str(tmp_path_factory.mktemp("msda_cuda_emulation")),
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["odd_levels", "one_level", "wide_channels", "no_queries"])
def test_cuda_kernels_emulated_on_cpu_match_reference(emulated_cuda, case, dtype):
    value, shapes, start, loc, attn = make_inputs(case, dtype)
    out = emulated_cuda.forward(value, shapes, start, loc, attn, 2)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = emulated_cuda.backward(value, shapes, start, loc, attn, g.to(dtype), 2)
    expected = reference_on((value, shapes, start, loc, attn))
    assert_matches((out, *grads), expected, TOL[dtype])
