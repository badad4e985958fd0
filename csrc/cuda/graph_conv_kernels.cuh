// CUDA device code of graph_conv (launcher: graph_conv.cu) around the graph_message_passing kernels: the forward's
// epilogue, the backward's BatchNorm sums and its prologue (math: graph_conv_math.h). Torch-free, like
// graph_message_passing_kernels.cuh, so that nvcc compiles it alone and g++ for the CPU emulation (csrc/testing/).
//
// epilogue: out = act(scale * y + shift) (+ residual), element by element over the [rows, C] matrix (grid-stride).
// sums: block k owns rows [k * rows_per_block, (k + 1) * rows_per_block); thread t sums channels t, t + blockDim,
//   ... over them (consecutive threads, consecutive channels: coalesced) and writes partial[k] = (sum grad z,
//   sum grad z (y - mean)) per channel; the launcher adds the blocks' partials in order (deterministic).
// prologue: grad y = scale * grad z - k0 - ky * (y - mean) element by element, in T (what the aggregation's
//   backward kernel then reads as its grad_out).
#pragma once

#include "cuda/common.cuh"
#include "graph_conv_math.h"

namespace structalign {
namespace gconv {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 64;  // rows per block of the sums kernel

template <typename T>
struct EpilogueArgs {
  const T* y;                 // [rows, C] contiguous
  const acc_t<T>* scale;      // [C]
  const acc_t<T>* shift;      // [C]
  const T* residual;          // [rows, C] contiguous, or null
  T* out;                     // [rows, C] contiguous (may be y itself)
  int64_t rows, c;
  bool relu;
};

template <typename T>
struct SumsArgs {
  const T* grad_out;          // [rows, C] contiguous
  const T* y;                 // [rows, C] contiguous
  const acc_t<T>* scale;
  const acc_t<T>* shift;
  const acc_t<T>* mean;
  acc_t<T>* partial;          // [blocks, 2, C]
  int64_t rows, c, rows_per_block;
  bool relu;
};

template <typename T>
struct PrologueArgs {
  const T* grad_out;          // [rows, C] contiguous
  const T* y;                 // [rows, C] contiguous
  const acc_t<T>* scale;
  const acc_t<T>* shift;
  const acc_t<T>* mean;
  const acc_t<T>* k0;
  const acc_t<T>* ky;
  T* grad_y;                  // [rows, C] contiguous
  int64_t rows, c;
  bool relu;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) graph_conv_epilogue_kernel(const EpilogueArgs<T> a) {
  using A = acc_t<T>;
  const int64_t total = a.rows * a.c, step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t ch = i % a.c;
    const A res = a.residual != nullptr ? to_acc(a.residual[i]) : A(0);
    a.out[i] = from_acc<T>(epilogue(to_acc(a.y[i]), a.scale[ch], a.shift[ch], a.relu, res));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) graph_conv_sums_kernel(const SumsArgs<T> a) {
  using A = acc_t<T>;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * a.rows_per_block;
  const int64_t r1 = r0 + a.rows_per_block < a.rows ? r0 + a.rows_per_block : a.rows;
  A* part = a.partial + static_cast<int64_t>(blockIdx.x) * 2 * a.c;
  for (int64_t ch = threadIdx.x; ch < a.c; ch += blockDim.x) {
    const A scale = a.scale[ch], shift = a.shift[ch], mean = a.mean[ch];
    A sum_gz = 0, sum_gzx = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const A y = to_acc(a.y[r * a.c + ch]);
      const A gz = grad_z(to_acc(a.grad_out[r * a.c + ch]), y, scale, shift, a.relu);
      sum_gz += gz;
      sum_gzx += gz * (y - mean);
    }
    part[ch] = sum_gz;
    part[a.c + ch] = sum_gzx;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) graph_conv_prologue_kernel(const PrologueArgs<T> a) {
  const int64_t total = a.rows * a.c, step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t ch = i % a.c;
    a.grad_y[i] = from_acc<T>(prologue(to_acc(a.grad_out[i]), to_acc(a.y[i]), a.scale[ch], a.shift[ch], a.mean[ch],
                                       a.k0[ch], a.ky[ch], a.relu));
  }
}

// Host side: blocks of the element-wise kernels (grid-stride loops: enough blocks to fill a GPU, no more than the
// elements need) and of the sums kernel.
inline int64_t elementwise_blocks(int64_t elements) {
  const int64_t needed = (elements + kThreads - 1) / kThreads;
  return needed < 65535 ? (needed > 0 ? needed : 1) : 65535;
}
inline int64_t sums_blocks(int64_t rows) {
  return (rows + kRowsPerBlock - 1) / kRowsPerBlock;
}

}  // namespace gconv
}  // namespace structalign

#ifdef STRUCTALIGN_INSTANTIATE_KERNELS
namespace structalign {
namespace gconv {

#define STRUCTALIGN_GCONV_INSTANTIATE(T)                                                \
  template __global__ void graph_conv_epilogue_kernel<T>(const EpilogueArgs<T>);       \
  template __global__ void graph_conv_sums_kernel<T>(const SumsArgs<T>);               \
  template __global__ void graph_conv_prologue_kernel<T>(const PrologueArgs<T>);

STRUCTALIGN_GCONV_INSTANTIATE(float)
STRUCTALIGN_GCONV_INSTANTIATE(double)
STRUCTALIGN_GCONV_INSTANTIATE(__half)
STRUCTALIGN_GCONV_INSTANTIATE(__nv_bfloat16)
#undef STRUCTALIGN_GCONV_INSTANTIATE

}  // namespace gconv
}  // namespace structalign
#endif
