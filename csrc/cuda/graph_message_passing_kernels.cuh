// CUDA device code of graph_message_passing, free of torch headers (tests/test_cuda_compile.py compiles it alone
// with nvcc). The launcher csrc/cuda/graph_message_passing.cu allocates, dispatches and launches these kernels.
//
// Forward: one block per output row (face b, node i); the threads split the C channels and each recomputes the
// row's softmax (a row has a handful of edges, so this costs less than a shared-memory exchange).
// Backward: a softmax kernel stores A (acc type, [sets, E]); then one block per (face b, node k) writes
// grad h_self_k = A_kk g_k, gathers grad h_nbr_k = sum over k's incoming edges (i -> k, i != k) of A_e g_i (the
// transposed graph, so no atomics and a deterministic result), and reduces d_e = <g_k, v_e> over the block for the
// softmax gradient of row k's logits.
#pragma once

#include <cassert>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "graph_message_passing_math.h"

// Device-side check of values that only the GPU reads (CSR offsets and neighbour indices passed to the op
// directly); it aborts the kernel with the failed condition instead of reading out of bounds. Same mechanism as
// torch's CUDA_KERNEL_ASSERT, which this torch-free header cannot include.
#define STRUCTALIGN_KERNEL_ASSERT(cond)                                                   \
  if (!(cond)) {                                                                          \
    __assert_fail(#cond, __FILE__, static_cast<unsigned int>(__LINE__), __func__);        \
  }

namespace structalign {
namespace gmp {

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// Sum of x over the block; every thread gets the result. `scratch` holds one value per warp.
template <typename A>
__device__ A block_sum(A x, A* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by the previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// grid.x = B * N rows, block = channel threads.
template <typename T>
__global__ void graph_message_passing_fwd_kernel(const T* __restrict__ h_self, int64_t hs_stride_b,
                                                 int64_t hs_stride_n, const T* __restrict__ h_nbr,
                                                 int64_t hn_stride_b, int64_t hn_stride_n,
                                                 const typename Acc<T>::type* __restrict__ logits,
                                                 int64_t logits_stride_b, const int64_t* __restrict__ indptr,
                                                 const int64_t* __restrict__ indices, const T* __restrict__ bias,
                                                 T* __restrict__ out, int64_t n, int64_t c, int64_t e) {
  using A = typename Acc<T>::type;
  const int64_t r = blockIdx.x, b = r / n, i = r % n;
  const int64_t row = indptr[i], row_end = indptr[i + 1];
  STRUCTALIGN_KERNEL_ASSERT(row >= 0 && row < row_end && row_end <= e);
  const A* row_logits = logits + b * logits_stride_b + row;
  A peak, total;
  row_softmax_stats(row_logits, row_end - row, peak, total);
  for (int64_t ch = threadIdx.x; ch < c; ch += blockDim.x) {
    A acc = bias != nullptr ? load(bias[ch]) : A(0);
    for (int64_t f = row; f < row_end; ++f) {
      const int64_t j = indices[f];
      STRUCTALIGN_KERNEL_ASSERT(j >= 0 && j < n);
      const T v = j == i ? h_self[b * hs_stride_b + i * hs_stride_n + ch] : h_nbr[b * hn_stride_b + j * hn_stride_n + ch];
      acc += edge_softmax(row_logits[f - row], peak, total) * load(v);
    }
    out[r * c + ch] = store<T>(acc);
  }
}

// One thread per (softmax set s, row i): attn[s, e] for the row's edges; set 0 also records each edge's row.
template <typename A>
__global__ void graph_message_passing_softmax_kernel(const A* __restrict__ logits, const int64_t* __restrict__ indptr,
                                                     const int64_t* __restrict__ indices, A* __restrict__ attn,
                                                     int64_t* __restrict__ edge_row, int64_t sets, int64_t n,
                                                     int64_t e) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= sets * n) return;
  const int64_t s = t / n, i = t % n, row = indptr[i], row_end = indptr[i + 1];
  STRUCTALIGN_KERNEL_ASSERT(row >= 0 && row < row_end && row_end <= e);
  row_softmax(logits + s * e + row, row_end - row, attn + s * e + row);
  if (s == 0) {
    for (int64_t f = row; f < row_end; ++f) {
      STRUCTALIGN_KERNEL_ASSERT(indices[f] >= 0 && indices[f] < n);
      edge_row[f] = i;
    }
  }
}

// grid.x = B * N, block = channel threads; dynamic shared memory: (max_deg + warps) values of the acc type.
// Null output pointers skip that gradient.
template <typename T>
__global__ void graph_message_passing_bwd_kernel(
    const T* __restrict__ grad_out, int64_t go_stride_b, int64_t go_stride_n, const T* __restrict__ h_self,
    int64_t hs_stride_b, int64_t hs_stride_n, const T* __restrict__ h_nbr, int64_t hn_stride_b, int64_t hn_stride_n,
    const typename Acc<T>::type* __restrict__ attn, int64_t attn_stride_b, const int64_t* __restrict__ indptr,
    const int64_t* __restrict__ indices, const int64_t* __restrict__ in_ptr, const int64_t* __restrict__ in_edges,
    const int64_t* __restrict__ edge_row, T* __restrict__ grad_h_self, T* __restrict__ grad_h_nbr,
    typename Acc<T>::type* __restrict__ grad_logits, int64_t n, int64_t c, int64_t e) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char shared_raw[];
  A* scratch = reinterpret_cast<A*>(shared_raw);
  A* dots = scratch + (blockDim.x + 31) / 32;
  const int64_t r = blockIdx.x, b = r / n, k = r % n;
  const int64_t row = indptr[k], row_end = indptr[k + 1];
  const A* a_b = attn + b * attn_stride_b;
  const T* g = grad_out + b * go_stride_b + k * go_stride_n;

  if (grad_h_self != nullptr || grad_h_nbr != nullptr) {
    A a_self = 0;
    for (int64_t f = row; f < row_end; ++f) a_self += indices[f] == k ? a_b[f] : A(0);
    for (int64_t ch = threadIdx.x; ch < c; ch += blockDim.x) {
      if (grad_h_self != nullptr) grad_h_self[r * c + ch] = store<T>(a_self * load(g[ch]));
      if (grad_h_nbr != nullptr) {
        A acc = 0;
        for (int64_t t = in_ptr[k]; t < in_ptr[k + 1]; ++t) {
          const int64_t f = in_edges[t], i = edge_row[f];
          if (i != k) acc += a_b[f] * load(grad_out[b * go_stride_b + i * go_stride_n + ch]);
        }
        grad_h_nbr[r * c + ch] = store<T>(acc);
      }
    }
  }
  if (grad_logits != nullptr) {
    for (int64_t f = row; f < row_end; ++f) {
      const int64_t j = indices[f];
      const T* v = j == k ? h_self + b * hs_stride_b + k * hs_stride_n : h_nbr + b * hn_stride_b + j * hn_stride_n;
      A partial = 0;
      for (int64_t ch = threadIdx.x; ch < c; ch += blockDim.x) partial += load(g[ch]) * load(v[ch]);
      const A d = block_sum(partial, scratch);
      if (threadIdx.x == 0) dots[f - row] = d;
    }
    if (threadIdx.x == 0) {
      A weighted = 0;
      for (int64_t f = row; f < row_end; ++f) weighted += a_b[f] * dots[f - row];
      for (int64_t f = row; f < row_end; ++f) {
        grad_logits[b * e + f] = softmax_backward(a_b[f], dots[f - row], weighted);
      }
    }
  }
}

}  // namespace gmp
}  // namespace structalign

#ifdef STRUCTALIGN_INSTANTIATE_KERNELS
namespace structalign {
namespace gmp {

#define STRUCTALIGN_GMP_INSTANTIATE(T)                                                                               \
  template __global__ void graph_message_passing_fwd_kernel<T>(                                                      \
      const T*, int64_t, int64_t, const T*, int64_t, int64_t, const Acc<T>::type*, int64_t, const int64_t*,          \
      const int64_t*, const T*, T*, int64_t, int64_t, int64_t);                                                      \
  template __global__ void graph_message_passing_bwd_kernel<T>(                                                      \
      const T*, int64_t, int64_t, const T*, int64_t, int64_t, const T*, int64_t, int64_t, const Acc<T>::type*,       \
      int64_t, const int64_t*, const int64_t*, const int64_t*, const int64_t*, const int64_t*, T*, T*,               \
      Acc<T>::type*, int64_t, int64_t, int64_t);

STRUCTALIGN_GMP_INSTANTIATE(float)
STRUCTALIGN_GMP_INSTANTIATE(double)
STRUCTALIGN_GMP_INSTANTIATE(__half)
STRUCTALIGN_GMP_INSTANTIATE(__nv_bfloat16)
template __global__ void graph_message_passing_softmax_kernel<float>(const float*, const int64_t*, const int64_t*,
                                                                     float*, int64_t*, int64_t, int64_t, int64_t);
template __global__ void graph_message_passing_softmax_kernel<double>(const double*, const int64_t*, const int64_t*,
                                                                      double*, int64_t*, int64_t, int64_t, int64_t);
#undef STRUCTALIGN_GMP_INSTANTIATE

}  // namespace gmp
}  // namespace structalign
#endif
