// Input validation and device dispatch for multi-scale deformable attention.
// Math credit: Deformable DETR (SenseTime, Apache-2.0); see ms_deform_attn.h.
#include "ms_deform_attn.h"

namespace petr {
namespace {

#ifndef WITH_CUDA
constexpr const char* kNoCudaMessage =
    "ms_deform_attn: petr._C was built without CUDA (rebuild it with FORCE_CUDA=1)";
#endif

void check_float_tensor(const at::Tensor& t, const char* name, const at::Tensor& value) {
  TORCH_CHECK(
      t.scalar_type() == value.scalar_type(), "ms_deform_attn: ", name, " has dtype ",
      t.scalar_type(), " but value has dtype ", value.scalar_type(), "; they must match");
  TORCH_CHECK(
      t.device() == value.device(), "ms_deform_attn: ", name, " is on ", t.device(),
      " but value is on ", value.device());
  TORCH_CHECK(t.is_contiguous(), "ms_deform_attn: ", name, " must be contiguous");
}

void check_index_tensor(const at::Tensor& t, const char* name, const at::Tensor& value) {
  TORCH_CHECK(
      t.scalar_type() == at::kLong, "ms_deform_attn: ", name, " must be int64, got ",
      t.scalar_type());
  TORCH_CHECK(
      t.device() == value.device(), "ms_deform_attn: ", name, " is on ", t.device(),
      " but value is on ", value.device());
  TORCH_CHECK(t.is_contiguous(), "ms_deform_attn: ", name, " must be contiguous");
}

// Checks everything the kernels rely on. The level sizes are compared with S only for CPU
// tensors: for CUDA ones that needs a device sync, which the Python wrapper already pays.
void check_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    int64_t im2col_step) {
  TORCH_CHECK(
      value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got shape ", value.sizes());
  TORCH_CHECK(
      value.is_cpu() || value.is_cuda(), "ms_deform_attn: unsupported device ", value.device());
  TORCH_CHECK(
      at::isFloatingType(value.scalar_type()), "ms_deform_attn: value must be floating point, got ",
      value.scalar_type());
  TORCH_CHECK(
      value.is_cuda() || value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
      "ms_deform_attn: the CPU kernel supports float32 and float64, got ", value.scalar_type());
  TORCH_CHECK(value.is_contiguous(), "ms_deform_attn: value must be contiguous");
  TORCH_CHECK(im2col_step > 0, "ms_deform_attn: im2col_step must be positive, got ", im2col_step);
  check_index_tensor(spatial_shapes, "spatial_shapes", value);
  check_index_tensor(level_start_index, "level_start_index", value);
  check_float_tensor(sampling_locations, "sampling_locations", value);
  check_float_tensor(attention_weights, "attention_weights", value);

  const int64_t N = value.size(0), S = value.size(1), M = value.size(2);
  TORCH_CHECK(
      spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 && spatial_shapes.size(0) > 0,
      "ms_deform_attn: spatial_shapes must be (L, 2) with L >= 1, got shape ",
      spatial_shapes.sizes());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(
      level_start_index.dim() == 1 && level_start_index.size(0) == L,
      "ms_deform_attn: level_start_index must be (L,) = (", L, ",), got shape ",
      level_start_index.sizes());
  const auto loc = sampling_locations.sizes();
  TORCH_CHECK(
      loc.size() == 6 && loc[0] == N && loc[2] == M && loc[3] == L && loc[5] == 2,
      "ms_deform_attn: sampling_locations must be (N, Q, M, L, P, 2) with N=", N, ", M=", M,
      ", L=", L, ", got shape ", loc);
  const auto attn = attention_weights.sizes();
  TORCH_CHECK(
      attn.size() == 5 && attn[0] == N && attn[1] == loc[1] && attn[2] == M && attn[3] == L &&
          attn[4] == loc[4],
      "ms_deform_attn: attention_weights must be (N, Q, M, L, P) = ", loc.slice(0, 5),
      ", got shape ", attn);

  if (value.is_cpu()) {
    const int64_t* hw = spatial_shapes.data_ptr<int64_t>();
    const int64_t* start = level_start_index.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t l = 0; l < L; ++l) {
      TORCH_CHECK(
          hw[2 * l] > 0 && hw[2 * l + 1] > 0, "ms_deform_attn: spatial_shapes[", l,
          "] must be positive, got (", hw[2 * l], ", ", hw[2 * l + 1], ")");
      TORCH_CHECK(
          start[l] == total, "ms_deform_attn: level_start_index[", l, "] is ", start[l],
          " but the levels before it hold ", total, " tokens");
      total += hw[2 * l] * hw[2 * l + 1];
    }
    TORCH_CHECK(
        total == S, "ms_deform_attn: spatial_shapes cover ", total,
        " tokens but value has S=", S);
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    int64_t im2col_step) {
  check_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      im2col_step);
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_forward_cuda(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
#else
    TORCH_CHECK(false, kNoCudaMessage);
#endif
  }
  return ms_deform_attn_forward_cpu(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    int64_t im2col_step) {
  check_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      im2col_step);
  check_float_tensor(grad_output, "grad_output", value);
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Q = sampling_locations.size(1);
  TORCH_CHECK(
      grad_output.dim() == 3 && grad_output.size(0) == N && grad_output.size(1) == Q &&
          grad_output.size(2) == M * D,
      "ms_deform_attn: grad_output must be (N, Q, M * D) = (", N, ", ", Q, ", ", M * D,
      "), got shape ", grad_output.sizes());
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_backward_cuda(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        grad_output);
#else
    TORCH_CHECK(false, kNoCudaMessage);
#endif
  }
  return ms_deform_attn_backward_cpu(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      grad_output);
}

}  // namespace petr
