// CUDA entry points of multi-scale deformable attention: float16, bfloat16, float32 and float64
// inputs, accumulation in float32 (float64 for float64 inputs). The kernels and their work split
// are described in ms_deform_attn_cuda_kernels.cuh.
// Math credit: Deformable DETR (SenseTime, Apache-2.0); see ms_deform_attn.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "ms_deform_attn.h"
#include "ms_deform_attn_cuda_kernels.cuh"

namespace petr {
namespace {

using msda_cuda::Dims;
using msda_cuda::kThreadsPerBlock;
using msda_cuda::kWarpsPerBlock;

// Enough warps to fill the GPU; the kernels stride over the remaining rows.
dim3 grid_for(int64_t rows) {
  const int64_t needed = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t cap =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return dim3(static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, cap))));
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Dims dims = msda_cuda::make_dims(value, sampling_locations);
  auto out = at::empty({value.size(0), dims.Q, dims.M * dims.D}, value.options());
  if (out.numel() == 0) {
    return out;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
      "ms_deform_attn_forward_cuda", [&] {
        const auto kernel = msda_cuda::forward_kernel<scalar_t>;
        kernel<<<grid_for(dims.rows), kThreadsPerBlock, 0, stream>>>(
            value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
            level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
            attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), dims);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Dims dims = msda_cuda::make_dims(value, sampling_locations);
  auto grad_loc = at::zeros_like(sampling_locations);
  auto grad_attn = at::zeros_like(attention_weights);
  at::Tensor grad_value;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
      "ms_deform_attn_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // Atomics on 16-bit floats would round every partial sum: accumulate in acc_t.
        const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
        auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
        if (dims.rows > 0 && dims.D > 0) {
          const auto kernel = msda_cuda::backward_kernel<scalar_t, acc_t>;
          kernel<<<grid_for(dims.rows), kThreadsPerBlock, 0, stream>>>(
              value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
              level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
              attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
              grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<scalar_t>(),
              grad_attn.data_ptr<scalar_t>(), dims);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        grad_value = grad_value_acc.to(value.scalar_type());
      });
  return std::make_tuple(grad_value, grad_loc, grad_attn);
}

}  // namespace petr
