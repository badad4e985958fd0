// The CUDA element type each ATen scalar type is handed to the torch-free kernels as: at::Half and at::BFloat16
// share the bit layout of __half and __nv_bfloat16.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace structalign {

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

}  // namespace structalign
