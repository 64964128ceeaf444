// Multi-scale deformable attention: declarations shared by the bindings and the kernels.
//
// The op's math (bilinear sampling with zero padding, h = y * H - 0.5, w = x * W - 0.5, summed
// with attention weights over levels and points) is that of Deformable DETR (SenseTime,
// Apache-2.0, https://github.com/fundamentalvision/Deformable-DETR). This code is our own.
//
// Shapes (all tensors contiguous, on one device):
//   value               (N, S, M, D)        float; S = sum_l H_l * W_l
//   spatial_shapes      (L, 2)   int64      (H_l, W_l)
//   level_start_index   (L,)     int64      exclusive cumsum of H_l * W_l
//   sampling_locations  (N, Q, M, L, P, 2)  normalised (x, y): [0, 1] spans the level
//   attention_weights   (N, Q, M, L, P)
//   output              (N, Q, M * D)
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace petr {

// Device-dispatching entry points (ms_deform_attn.cpp); they validate their inputs.
at::Tensor ms_deform_attn_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    int64_t im2col_step);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    int64_t im2col_step);

// Backends: they assume validated inputs.
at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

// Whether the CPU kernel was compiled with OpenMP, i.e. whether at::parallel_for really runs in
// parallel (without -fopenmp ATen's OpenMP backend silently runs the loop on one thread).
bool ms_deform_attn_cpu_is_parallel();

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);
#endif

}  // namespace petr
