// Host-side helpers of the CUDA launchers (csrc/cuda/*.cu): the CUDA element type of each ATen scalar type,
// typed data pointers, and the shared-memory budget of the current device.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace structalign {

// at::Half and at::BFloat16 share the bit layout of __half and __nv_bfloat16, which the torch-free kernels use.
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

// t's data as the kernels' element type (S: t's ATen scalar type).
template <typename S>
auto* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename CudaType<S>::type*>(t.data_ptr<S>());
}

// Largest dynamic shared memory one block of a kernel may use on the current device (after opting in).
inline size_t shared_memory_budget() {
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

// Lets `kernel` use `bytes` of dynamic shared memory (above the default 48 KiB it must opt in, per device).
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

}  // namespace structalign
