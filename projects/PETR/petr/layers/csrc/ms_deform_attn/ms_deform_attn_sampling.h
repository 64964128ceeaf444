// Bilinear sampling math shared by the CPU and CUDA kernels, so the CPU tests cover it for both.
// Math credit: Deformable DETR (SenseTime, Apache-2.0); see ms_deform_attn.h.
#pragma once

#include <c10/macros/Macros.h>

#include <math.h>
#include <stdint.h>

namespace petr {

template <typename T>
C10_HOST_DEVICE inline T floor_t(T v) {
  return floor(v);
}

template <>
C10_HOST_DEVICE inline float floor_t<float>(float v) {
  return floorf(v);
}

// Where one sampling point lands in a level map of H x W pixels. Corner order:
// 0 = (h0, w0), 1 = (h0, w0 + 1), 2 = (h0 + 1, w0), 3 = (h0 + 1, w0 + 1).
template <typename T>
struct Footprint {
  int64_t pix[4];  // flat pixel index h * W + w of each corner (only meaningful when inside)
  T weight[4];     // bilinear weight of each corner
  bool inside[4];  // corners outside the map read as zero (zero padding)
  T lh, lw;        // position inside the cell, in [0, 1)
};

// Fills `f` for normalised (x, y) and returns false when the point is so far out that every
// corner is padding (or a coordinate is NaN): such a sample contributes nothing, gradient 0.
// Pixel centres sit at (i + 0.5) / size, i.e. grid_sample with align_corners=False.
template <typename T>
C10_HOST_DEVICE inline bool make_footprint(T x, T y, int64_t H, int64_t W, Footprint<T>& f) {
  const T h_im = y * static_cast<T>(H) - T(0.5);
  const T w_im = x * static_cast<T>(W) - T(0.5);
  if (!(h_im > T(-1) && w_im > T(-1) && h_im < static_cast<T>(H) && w_im < static_cast<T>(W))) {
    return false;
  }
  const T hf = floor_t(h_im);
  const T wf = floor_t(w_im);
  const int64_t h0 = static_cast<int64_t>(hf);
  const int64_t w0 = static_cast<int64_t>(wf);
  f.lh = h_im - hf;
  f.lw = w_im - wf;
  const T hh = T(1) - f.lh;
  const T hw = T(1) - f.lw;
  const bool top = h0 >= 0, bottom = h0 + 1 < H, left = w0 >= 0, right = w0 + 1 < W;
  f.inside[0] = top && left;
  f.inside[1] = top && right;
  f.inside[2] = bottom && left;
  f.inside[3] = bottom && right;
  f.pix[0] = h0 * W + w0;
  f.pix[1] = f.pix[0] + 1;
  f.pix[2] = f.pix[0] + W;
  f.pix[3] = f.pix[2] + 1;
  f.weight[0] = hh * hw;
  f.weight[1] = hh * f.lw;
  f.weight[2] = f.lh * hw;
  f.weight[3] = f.lh * f.lw;
  return true;
}

// Gradients of one sample given dot[i] = <grad_out, value at corner i> (0 for padding corners)
// and its attention weight a: d/d(attention weight), d/dx and d/dy of the normalised location.
template <typename T>
C10_HOST_DEVICE inline void footprint_grads(
    const Footprint<T>& f, const T dot[4], T a, int64_t H, int64_t W, T& g_attn, T& g_x, T& g_y) {
  g_attn = f.weight[0] * dot[0] + f.weight[1] * dot[1] + f.weight[2] * dot[2] +
           f.weight[3] * dot[3];
  const T hh = T(1) - f.lh;
  const T hw = T(1) - f.lw;
  // d weight / d w_im = (-hh, hh, -lh, lh); d weight / d h_im = (-hw, -lw, hw, lw);
  // w_im = x * W - 0.5 and h_im = y * H - 0.5.
  const T g_w = hh * (dot[1] - dot[0]) + f.lh * (dot[3] - dot[2]);
  const T g_h = hw * (dot[2] - dot[0]) + f.lw * (dot[3] - dot[1]);
  g_x = a * g_w * static_cast<T>(W);
  g_y = a * g_h * static_cast<T>(H);
}

}  // namespace petr
