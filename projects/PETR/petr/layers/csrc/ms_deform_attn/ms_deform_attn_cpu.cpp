// CPU kernels of multi-scale deformable attention (float32, float64).
// Math credit: Deformable DETR (SenseTime, Apache-2.0); see ms_deform_attn.h.
//
// Forward: at::parallel_for over output rows (n, q, m); each row accumulates its D contiguous
// channels in place, so the inner loops are unit-stride and vectorise.
// Backward: at::parallel_for over (n, m, level) triples. Each owns the slice
// grad_value[n, start_l : start_l + H_l * W_l, m, :], so the scatter into grad_value is race-free
// without atomics or per-thread buffers, and the result is deterministic. Every query samples P
// points in every level, so the tasks are equally heavy. grad_loc and grad_attn are per-sample
// and written once.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace petr {
namespace {

// Fixed-width partial sums let the compiler vectorise dot products without -ffast-math.
constexpr int64_t kLanes = 8;

struct Level {
  int64_t h, w, start;
};

template <typename T>
struct Problem {
  const T* value;  // (N, S, M, D)
  const T* loc;    // (N, Q, M, L, P, 2)
  const T* attn;   // (N, Q, M, L, P)
  const Level* levels;
  int64_t S, Q, M, D, L, P;
};

std::vector<Level> read_levels(const at::Tensor& shapes, const at::Tensor& start) {
  const int64_t L = shapes.size(0);
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* st = start.data_ptr<int64_t>();
  std::vector<Level> levels(L);
  for (int64_t l = 0; l < L; ++l) {
    levels[l] = {hw[2 * l], hw[2 * l + 1], st[l]};
  }
  return levels;
}

template <typename T>
Problem<T> make_problem(
    const at::Tensor& value,
    const at::Tensor& loc,
    const at::Tensor& attn,
    const std::vector<Level>& levels) {
  return {
      value.data_ptr<T>(), loc.data_ptr<T>(), attn.data_ptr<T>(), levels.data(), value.size(1),
      loc.size(1), value.size(2), value.size(3), loc.size(3), loc.size(4)};
}

template <typename T>
T sum_lanes(const T* part) {
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// out[d] += c * v[d]
template <typename T>
inline void axpy(T* __restrict out, const T* __restrict v, T c, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    out[d] += c * v[d];
  }
}

// Returns <g, v> and does gv[d] += c * g[d].
template <typename T>
inline T dot_axpy(const T* __restrict g, const T* __restrict v, T* __restrict gv, T c, int64_t D) {
  T part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      part[k] += g[d + k] * v[d + k];
      gv[d + k] += c * g[d + k];
    }
  }
  T acc = sum_lanes(part);
  for (; d < D; ++d) {
    acc += g[d] * v[d];
    gv[d] += c * g[d];
  }
  return acc;
}

// Interior sample (the common case): o[d] += sum_i c_i * v_i[d] in one pass over the channels.
// The __restrict parameters (GCC ignores restrict on locals) let the loop vectorise unversioned.
template <typename T>
inline void interior_forward(
    T* __restrict o,
    const T* __restrict v0,
    const T* __restrict v1,
    const T* __restrict v2,
    const T* __restrict v3,
    T c0,
    T c1,
    T c2,
    T c3,
    int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    o[d] += c0 * v0[d] + c1 * v1[d] + c2 * v2[d] + c3 * v3[d];
  }
}

// Interior sample backward: dot[i] = <g, v_i> and gv_i[d] += c_i * g[d], in one pass.
template <typename T>
inline void interior_backward(
    const T* __restrict g,
    const T* __restrict v0,
    const T* __restrict v1,
    const T* __restrict v2,
    const T* __restrict v3,
    T* __restrict gv0,
    T* __restrict gv1,
    T* __restrict gv2,
    T* __restrict gv3,
    T c0,
    T c1,
    T c2,
    T c3,
    T* __restrict dot,
    int64_t D) {
  T p0[kLanes] = {}, p1[kLanes] = {}, p2[kLanes] = {}, p3[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const T gd = g[d + k];
      p0[k] += gd * v0[d + k];
      p1[k] += gd * v1[d + k];
      p2[k] += gd * v2[d + k];
      p3[k] += gd * v3[d + k];
      gv0[d + k] += c0 * gd;
      gv1[d + k] += c1 * gd;
      gv2[d + k] += c2 * gd;
      gv3[d + k] += c3 * gd;
    }
  }
  dot[0] = sum_lanes(p0);
  dot[1] = sum_lanes(p1);
  dot[2] = sum_lanes(p2);
  dot[3] = sum_lanes(p3);
  for (; d < D; ++d) {
    const T gd = g[d];
    dot[0] += gd * v0[d];
    dot[1] += gd * v1[d];
    dot[2] += gd * v2[d];
    dot[3] += gd * v3[d];
    gv0[d] += c0 * gd;
    gv1[d] += c1 * gd;
    gv2[d] += c2 * gd;
    gv3[d] += c3 * gd;
  }
}

// Output rows [begin, end) of the (N * Q * M, D) output.
template <typename T>
void forward_rows(const Problem<T>& pb, T* out, int64_t begin, int64_t end) {
  const int64_t M = pb.M, D = pb.D, L = pb.L, P = pb.P;
  const int64_t pix = M * D;  // stride between neighbouring pixels of one head
  for (int64_t row = begin; row < end; ++row) {
    const int64_t m = row % M;
    const int64_t n = row / (pb.Q * M);
    T* o = out + row * D;
    std::fill(o, o + D, T(0));
    const T* loc = pb.loc + row * L * P * 2;
    const T* attn = pb.attn + row * L * P;
    for (int64_t l = 0; l < L; ++l) {
      const Level lv = pb.levels[l];
      const T* v = pb.value + (n * pb.S + lv.start) * pix + m * D;
      for (int64_t p = 0; p < P; ++p, loc += 2, ++attn) {
        Footprint<T> f;
        if (!make_footprint(loc[0], loc[1], lv.h, lv.w, f)) {
          continue;
        }
        const T a = *attn;
        if (f.inside[0] && f.inside[1] && f.inside[2] && f.inside[3]) {
          // Interior sample (the common case): one fused pass over the channels.
          const T* v0 = v + f.pix[0] * pix;
          const T* v2 = v0 + lv.w * pix;
          interior_forward(
              o, v0, v0 + pix, v2, v2 + pix, a * f.weight[0], a * f.weight[1], a * f.weight[2],
              a * f.weight[3], D);
        } else {
          for (int i = 0; i < 4; ++i) {
            if (f.inside[i]) {
              axpy(o, v + f.pix[i] * pix, a * f.weight[i], D);
            }
          }
        }
      }
    }
  }
}

template <typename T>
struct Grads {
  T* value;  // (N, S, M, D), zero-initialised
  T* loc;    // (N, Q, M, L, P, 2), zero-initialised
  T* attn;   // (N, Q, M, L, P), zero-initialised
};

// All samples of the (n, m, level) triples [begin, end).
template <typename T>
void backward_slices(
    const Problem<T>& pb, const T* grad_out, const Grads<T>& grads, int64_t begin, int64_t end) {
  const int64_t Q = pb.Q, M = pb.M, D = pb.D, L = pb.L, P = pb.P;
  const int64_t pix = M * D;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t l = task % L, m = (task / L) % M, n = task / (L * M);
    const Level lv = pb.levels[l];
    const int64_t base = (n * pb.S + lv.start) * pix + m * D;
    const T* v = pb.value + base;
    T* gv = grads.value + base;
    for (int64_t q = 0; q < Q; ++q) {
      const int64_t row = (n * Q + q) * M + m;
      const T* g = grad_out + row * D;
      const int64_t first = row * L * P + l * P;  // this level's first sample of the row
      const T* loc = pb.loc + first * 2;
      const T* attn = pb.attn + first;
      T* g_loc = grads.loc + first * 2;
      T* g_attn = grads.attn + first;
      for (int64_t p = 0; p < P; ++p, loc += 2, ++attn, g_loc += 2, ++g_attn) {
        Footprint<T> f;
        if (!make_footprint(loc[0], loc[1], lv.h, lv.w, f)) {
          continue;  // gradients stay 0
        }
        const T a = *attn;
        T dot[4] = {T(0), T(0), T(0), T(0)};
        if (f.inside[0] && f.inside[1] && f.inside[2] && f.inside[3]) {
          const int64_t off0 = f.pix[0] * pix, off2 = off0 + lv.w * pix;
          interior_backward(
              g, v + off0, v + off0 + pix, v + off2, v + off2 + pix, gv + off0,
              gv + off0 + pix, gv + off2, gv + off2 + pix, a * f.weight[0], a * f.weight[1],
              a * f.weight[2], a * f.weight[3], dot, D);
        } else {
          for (int i = 0; i < 4; ++i) {
            if (f.inside[i]) {
              const int64_t off = f.pix[i] * pix;
              dot[i] = dot_axpy(g, v + off, gv + off, a * f.weight[i], D);
            }
          }
        }
        footprint_grads(f, dot, a, lv.h, lv.w, *g_attn, g_loc[0], g_loc[1]);
      }
    }
  }
}

}  // namespace

bool ms_deform_attn_cpu_is_parallel() {
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
  return false;
#else
  return true;
#endif
}

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Q = sampling_locations.size(1);
  auto out = at::empty({N, Q, M * D}, value.options());
  const auto levels = read_levels(spatial_shapes, level_start_index);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const auto pb = make_problem<scalar_t>(value, sampling_locations, attention_weights, levels);
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    // ~64 samples x D channels per task keeps the scheduling overhead negligible.
    const int64_t grain = std::max<int64_t>(1, 64 / std::max<int64_t>(1, pb.L * pb.P));
    at::parallel_for(0, N * Q * M, grain, [&](int64_t begin, int64_t end) {
      forward_rows(pb, out_ptr, begin, end);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  auto grad_value = at::zeros_like(value);
  auto grad_loc = at::zeros_like(sampling_locations);
  auto grad_attn = at::zeros_like(attention_weights);
  const auto levels = read_levels(spatial_shapes, level_start_index);
  const int64_t N = value.size(0), M = value.size(2);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const auto pb = make_problem<scalar_t>(value, sampling_locations, attention_weights, levels);
    const scalar_t* g = grad_output.data_ptr<scalar_t>();
    const Grads<scalar_t> grads{
        grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
        grad_attn.data_ptr<scalar_t>()};
    at::parallel_for(0, N * M * pb.L, 1, [&](int64_t begin, int64_t end) {
      backward_slices(pb, g, grads, begin, end);
    });
  });
  return std::make_tuple(grad_value, grad_loc, grad_attn);
}

}  // namespace petr
