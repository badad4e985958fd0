// Math of graph_message_passing shared by the CPU kernels (g++) and the CUDA kernels (nvcc): precision types,
// loads/stores through the accumulation type, the softmax over one CSR row and its gradient. Torch-free, so that
// csrc/cuda/graph_message_passing_kernels.cuh compiles with nvcc alone.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define STRUCTALIGN_HD __host__ __device__ __forceinline__
#else
#define STRUCTALIGN_HD inline
#endif

namespace structalign {
namespace gmp {

// Accumulation type: fp32 for fp16 / bf16 / fp32 inputs, fp64 for fp64.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
STRUCTALIGN_HD typename Acc<T>::type load(T x) {
  return static_cast<typename Acc<T>::type>(x);
}
template <typename T, typename A>
STRUCTALIGN_HD T store(A x) {
  return static_cast<T>(x);
}

#ifdef __CUDACC__
// torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__, so the CUDA half types convert through intrinsics.
template <>
STRUCTALIGN_HD float load<__half>(__half x) {
  return __half2float(x);
}
template <>
STRUCTALIGN_HD float load<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
STRUCTALIGN_HD __half store<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
STRUCTALIGN_HD __nv_bfloat16 store<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}
#endif

STRUCTALIGN_HD float exp_acc(float x) {
  return expf(x);
}
STRUCTALIGN_HD double exp_acc(double x) {
  return exp(x);
}

template <typename A>
STRUCTALIGN_HD A row_max(const A* row_logits, int64_t deg) {
  A peak = row_logits[0];
  for (int64_t k = 1; k < deg; ++k) {
    peak = row_logits[k] > peak ? row_logits[k] : peak;
  }
  return peak;
}

// Maximum and sum of exponentials of one CSR row, shifted by the maximum so that large logits cannot overflow.
template <typename A>
STRUCTALIGN_HD void row_softmax_stats(const A* row_logits, int64_t deg, A& peak, A& total) {
  peak = row_max(row_logits, deg);
  total = 0;
  for (int64_t k = 0; k < deg; ++k) {
    total += exp_acc(row_logits[k] - peak);
  }
}

// Softmax weight of one edge of a row from the row's statistics.
template <typename A>
STRUCTALIGN_HD A edge_softmax(A logit, A peak, A total) {
  return exp_acc(logit - peak) / total;
}

// attn[k] = softmax(row_logits[0..deg))[k], one exponential per edge.
template <typename A>
STRUCTALIGN_HD void row_softmax(const A* row_logits, int64_t deg, A* attn) {
  const A peak = row_max(row_logits, deg);
  A total = 0;
  for (int64_t k = 0; k < deg; ++k) {
    attn[k] = exp_acc(row_logits[k] - peak);
    total += attn[k];
  }
  const A inv = A(1) / total;
  for (int64_t k = 0; k < deg; ++k) {
    attn[k] *= inv;
  }
}

// d loss / d logit_e through the row softmax: a_e * (d_e - sum_f a_f d_f), where d_e = <grad_out_i, v_e> and
// weighted_sum = sum_f a_f d_f over the row.
template <typename A>
STRUCTALIGN_HD A softmax_backward(A a, A d, A weighted_sum) {
  return a * (d - weighted_sum);
}

}  // namespace gmp
}  // namespace structalign
