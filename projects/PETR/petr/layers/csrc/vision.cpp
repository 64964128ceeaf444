// Python bindings of petr._C.
#include <torch/extension.h>

#include "ms_deform_attn/ms_deform_attn.h"

namespace {

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels never touch Python objects, so other Python threads may run meanwhile.
  using release_gil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def(
      "ms_deform_attn_forward", &petr::ms_deform_attn_forward,
      "Multi-scale deformable attention forward -> (N, Q, M * D)", pybind11::arg("value"),
      pybind11::arg("spatial_shapes"), pybind11::arg("level_start_index"),
      pybind11::arg("sampling_locations"), pybind11::arg("attention_weights"),
      pybind11::arg("im2col_step"), release_gil());
  m.def(
      "ms_deform_attn_backward", &petr::ms_deform_attn_backward,
      "Multi-scale deformable attention backward -> (grad_value, grad_loc, grad_attn)",
      pybind11::arg("value"), pybind11::arg("spatial_shapes"), pybind11::arg("level_start_index"),
      pybind11::arg("sampling_locations"), pybind11::arg("attention_weights"),
      pybind11::arg("grad_output"), pybind11::arg("im2col_step"), release_gil());
  m.def("has_cuda", &has_cuda, "Whether petr._C was built with its CUDA kernels");
  m.def(
      "cpu_kernel_is_parallel", &petr::ms_deform_attn_cpu_is_parallel,
      "False when the CPU kernel was compiled without OpenMP and so runs on one thread");
}
