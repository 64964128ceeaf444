// CUDA kernels of multi-scale deformable attention, included by ms_deform_attn_cuda.cu and, on
// machines without a GPU, by the CPU emulation test (cuda_emulation.h defines
// PETR_CUDA_EMULATION and the CUDA built-ins used here).
// Math credit: Deformable DETR (SenseTime, Apache-2.0); see ms_deform_attn.h.
//
// Work split: one warp per output row (n, q, m). Lanes stride over the D channels, so loads of
// value, grad_output and grad_value are coalesced; every lane of a warp computes the same
// footprint, so all branches on it are warp-uniform. In the backward pass the warp reduces its
// per-channel partial gradients with shuffles and lane 0 writes the sample's grad_loc and
// grad_attn (each sample belongs to exactly one warp: no atomics there). The scatter into
// grad_value uses atomics on an accumulation-type buffer (float32 for 16-bit inputs).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#ifndef PETR_CUDA_EMULATION
#include <ATen/cuda/Atomic.cuh>
#endif

#include "ms_deform_attn_sampling.h"

namespace petr {
namespace msda_cuda {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreadsPerBlock = kWarpSize * kWarpsPerBlock;

struct Dims {
  int64_t S, Q, M, D, L, P;
  int64_t rows;  // N * Q * M
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// value (N, S, M, D); shapes (L, 2); starts (L,); loc (N, Q, M, L, P, 2); attn (N, Q, M, L, P);
// out (N, Q, M, D).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock) forward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ loc,
    const scalar_t* __restrict__ attn,
    scalar_t* __restrict__ out,
    const Dims dims) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = dims.M, D = dims.D, L = dims.L, P = dims.P;
  const int64_t pix = M * D;  // stride between neighbouring pixels of one head
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       row < dims.rows; row += warp_stride) {
    const int64_t m = row % M;
    const int64_t n = row / (dims.Q * M);
    const scalar_t* row_loc = loc + row * L * P * 2;
    const scalar_t* row_attn = attn + row * L * P;
    const scalar_t* value_nm = value + n * dims.S * pix + m * D;
    for (int64_t d = lane; d < D; d += kWarpSize) {
      acc_t acc = acc_t(0);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
        const scalar_t* v = value_nm + starts[l] * pix + d;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t s = l * P + p;
          Footprint<acc_t> f;
          if (!make_footprint(
                  static_cast<acc_t>(row_loc[2 * s]), static_cast<acc_t>(row_loc[2 * s + 1]), H,
                  W, f)) {
            continue;
          }
          acc_t sampled = acc_t(0);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if (f.inside[i]) {
              sampled += f.weight[i] * static_cast<acc_t>(v[f.pix[i] * pix]);
            }
          }
          acc += static_cast<acc_t>(row_attn[s]) * sampled;
        }
      }
      out[row * D + d] = static_cast<scalar_t>(acc);
    }
  }
}

// grad_output (N, Q, M, D); grad_value (N, S, M, D) in acc_t, zeroed; grad_loc and grad_attn in
// the input dtype, zeroed (samples outside the maps keep gradient 0).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock) backward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ loc,
    const scalar_t* __restrict__ attn,
    const scalar_t* __restrict__ grad_output,
    acc_t* __restrict__ grad_value,
    scalar_t* __restrict__ grad_loc,
    scalar_t* __restrict__ grad_attn,
    const Dims dims) {
  const int64_t M = dims.M, D = dims.D, L = dims.L, P = dims.P;
  const int64_t pix = M * D;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // `row` is the same for all lanes of a warp, so whole warps enter and leave the loop together,
  // as the shuffles in warp_sum require.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       row < dims.rows; row += warp_stride) {
    const int64_t m = row % M;
    const int64_t n = row / (dims.Q * M);
    const scalar_t* g = grad_output + row * D;
    const int64_t value_nm = n * dims.S * pix + m * D;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const int64_t base = value_nm + starts[l] * pix;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t s = row * L * P + l * P + p;  // flat sample index in (N, Q, M, L, P)
        Footprint<acc_t> f;
        if (!make_footprint(
                static_cast<acc_t>(loc[2 * s]), static_cast<acc_t>(loc[2 * s + 1]), H, W, f)) {
          continue;  // warp-uniform: every lane computed the same footprint
        }
        const acc_t a = static_cast<acc_t>(attn[s]);
        acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        for (int64_t d = lane; d < D; d += kWarpSize) {
          const acc_t gd = static_cast<acc_t>(g[d]);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if (f.inside[i]) {
              const int64_t idx = base + f.pix[i] * pix + d;
              dot[i] += gd * static_cast<acc_t>(value[idx]);
              gpuAtomicAdd(grad_value + idx, a * f.weight[i] * gd);
            }
          }
        }
        // The sample gradients are linear in dot[], so each lane applies them to its partial
        // dots and the warp sums the three results.
        acc_t g_attn, g_x, g_y;
        footprint_grads(f, dot, a, H, W, g_attn, g_x, g_y);
        g_attn = warp_sum(g_attn);
        g_x = warp_sum(g_x);
        g_y = warp_sum(g_y);
        if (lane == 0) {
          grad_attn[s] = static_cast<scalar_t>(g_attn);
          grad_loc[2 * s] = static_cast<scalar_t>(g_x);
          grad_loc[2 * s + 1] = static_cast<scalar_t>(g_y);
        }
      }
    }
  }
}

inline Dims make_dims(const at::Tensor& value, const at::Tensor& loc) {
  const int64_t N = value.size(0), M = value.size(2);
  const int64_t Q = loc.size(1);
  return {value.size(1), Q, M, value.size(3), loc.size(3), loc.size(4), N * Q * M};
}

}  // namespace msda_cuda
}  // namespace petr
