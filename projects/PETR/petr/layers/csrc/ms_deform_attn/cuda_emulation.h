// Test support: runs the kernels of ms_deform_attn_cuda_kernels.cuh on the CPU, so their indexing,
// warp reductions and atomics are checked against the reference on machines without a GPU
// (tests/test_ms_deform_attn.py). Not part of petr._C.
//
// Each lane of a warp is a std::thread and warps run one after another. __shfl_xor_sync is a
// barrier over the 32 lanes: a lane that skips a shuffle the others reach (a divergent warp, which
// is undefined behaviour on a GPU) makes the barrier time out with an error instead of passing.
#pragma once

#ifdef __CUDACC__
#error "cuda_emulation.h is for host compilers; nvcc builds the real kernels"
#endif

#define PETR_CUDA_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __restrict__ __restrict

#include <c10/util/Exception.h>

#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace petr {
namespace cuda_emulation {

struct Dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

constexpr int kLanes = 32;

struct Warp {
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  unsigned long generation = 0;
  double slots[kLanes] = {};  // exact for float and double
};

inline thread_local Warp* current_warp = nullptr;

inline void warp_barrier() {
  Warp& w = *current_warp;
  std::unique_lock<std::mutex> lock(w.mu);
  const unsigned long generation = w.generation;
  if (++w.arrived == kLanes) {
    w.arrived = 0;
    ++w.generation;
    w.cv.notify_all();
    return;
  }
  const bool released = w.cv.wait_for(
      lock, std::chrono::seconds(20), [&] { return w.generation != generation; });
  TORCH_CHECK(released, "cuda_emulation: not every lane reached __shfl_xor_sync (divergent warp)");
}

inline std::mutex& atomic_mutex() {
  static std::mutex mu;
  return mu;
}

// Runs kernel() as a <<<grid, block>>> launch; block must be a multiple of 32.
template <typename Kernel>
void launch(unsigned int grid, unsigned int block, const Kernel& kernel);

}  // namespace cuda_emulation
}  // namespace petr

// CUDA built-in variables and functions the kernels use.
inline thread_local petr::cuda_emulation::Dim3 threadIdx, blockIdx, blockDim, gridDim;

template <typename T>
T __shfl_xor_sync(unsigned int mask, T v, int lane_mask) {
  using petr::cuda_emulation::current_warp;
  using petr::cuda_emulation::warp_barrier;
  TORCH_CHECK(mask == 0xffffffffu, "cuda_emulation: only full-warp shuffles are emulated");
  const int lane = threadIdx.x % petr::cuda_emulation::kLanes;
  current_warp->slots[lane] = static_cast<double>(v);
  warp_barrier();
  const T out = static_cast<T>(current_warp->slots[lane ^ lane_mask]);
  warp_barrier();  // no lane may overwrite its slot before every lane has read
  return out;
}

template <typename T>
T gpuAtomicAdd(T* address, T v) {
  std::lock_guard<std::mutex> lock(petr::cuda_emulation::atomic_mutex());
  const T old = *address;
  *address = old + v;
  return old;
}

namespace petr {
namespace cuda_emulation {

template <typename Kernel>
void launch(unsigned int grid, unsigned int block, const Kernel& kernel) {
  TORCH_CHECK(block % kLanes == 0, "cuda_emulation: block size must be a multiple of 32");
  for (unsigned int b = 0; b < grid; ++b) {
    for (unsigned int first = 0; first < block; first += kLanes) {
      Warp warp;
      std::exception_ptr error;
      std::mutex error_mu;
      std::vector<std::thread> lanes;
      for (unsigned int lane = 0; lane < kLanes; ++lane) {
        lanes.emplace_back([&, lane] {
          threadIdx.x = first + lane;
          blockIdx.x = b;
          blockDim.x = block;
          gridDim.x = grid;
          current_warp = &warp;
          try {
            kernel();
          } catch (...) {
            std::lock_guard<std::mutex> lock(error_mu);
            if (!error) {
              error = std::current_exception();
            }
          }
        });
      }
      for (auto& t : lanes) {
        t.join();
      }
      if (error) {
        std::rethrow_exception(error);
      }
    }
  }
}

}  // namespace cuda_emulation
}  // namespace petr
