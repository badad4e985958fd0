// Scalar helpers shared by the CPU kernels (g++), the CUDA kernels (nvcc) and their CPU emulation
// (csrc/testing/): the accumulation type of each element type, conversions through it, exp / log1p of the
// accumulation type. Torch-free, so that csrc/cuda/*_kernels.cuh compile with nvcc alone.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define STRUCTALIGN_HD __host__ __device__ __forceinline__
#else
#define STRUCTALIGN_HD inline
#endif

// __half / __nv_bfloat16 exist in nvcc builds and in the CPU emulation of the CUDA kernels.
#if defined(__CUDACC__) || defined(STRUCTALIGN_CUDA_EMULATION)
#define STRUCTALIGN_CUDA_TYPES 1
#endif

namespace structalign {

// Accumulation type: float for fp16 / bf16 / fp32 elements, double for fp64.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

template <typename T>
STRUCTALIGN_HD acc_t<T> to_acc(T x) {
  return static_cast<acc_t<T>>(x);
}
template <typename T>
STRUCTALIGN_HD T from_acc(acc_t<T> x) {
  return static_cast<T>(x);
}

#ifdef STRUCTALIGN_CUDA_TYPES
// torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__, so the CUDA half types convert through intrinsics.
template <>
STRUCTALIGN_HD float to_acc<__half>(__half x) {
  return __half2float(x);
}
template <>
STRUCTALIGN_HD float to_acc<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
STRUCTALIGN_HD __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
STRUCTALIGN_HD __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
#endif

STRUCTALIGN_HD float exp_acc(float x) {
  return expf(x);
}
STRUCTALIGN_HD double exp_acc(double x) {
  return exp(x);
}

STRUCTALIGN_HD float log1p_acc(float x) {
  return log1pf(x);
}
STRUCTALIGN_HD double log1p_acc(double x) {
  return log1p(x);
}

}  // namespace structalign
