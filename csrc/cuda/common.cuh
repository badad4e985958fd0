// Device helpers shared by the CUDA kernels (csrc/cuda/*_kernels.cuh): device-side checks, the dynamic
// shared-memory buffer and its layout, deterministic warp / block sums, and vector loads and stores of 2..16
// bytes converted through the accumulation type. Torch-free: nvcc compiles it alone, and with
// STRUCTALIGN_CUDA_EMULATION (csrc/testing/cuda_emulation.h, included first) g++ compiles it for the CPU emulation
// that tests the kernels on machines without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#elif !defined(STRUCTALIGN_CUDA_EMULATION)
#error "csrc/cuda/*.cuh is device code: compile it with nvcc, or include csrc/testing/cuda_emulation.h first"
#endif

#include "common_math.h"

// Device-side check of values only the GPU reads (graph / relation tables passed to the op directly): it stops
// the kernel with `msg` (a CUDA "device-side assert triggered" error) instead of reading out of bounds. The same
// mechanism as torch's CUDA_KERNEL_ASSERT, which this torch-free header cannot include.
#ifdef STRUCTALIGN_CUDA_EMULATION
#define STRUCTALIGN_DEVICE_CHECK(cond, msg)         \
  do {                                              \
    if (!(cond)) ::structalign::emu::check_failed(msg); \
  } while (0)
#else
#define STRUCTALIGN_DEVICE_CHECK(cond, msg)                                                        \
  do {                                                                                             \
    if (!(cond)) __assert_fail(msg, __FILE__, static_cast<unsigned int>(__LINE__), __func__);     \
  } while (0)
#endif

namespace structalign {
namespace cuda {

// ---- shared memory ------------------------------------------------------------------------------------------------

// The block's dynamic shared memory (16-byte aligned).
__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef STRUCTALIGN_CUDA_EMULATION
  return emu::shared_memory();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return smem_raw;
#endif
}

// Lays consecutive arrays out in one buffer, each 16-byte aligned. Kernels and launchers build the same sequence of
// `take` calls, so that the launcher's byte count and the kernel's offsets agree.
struct SmemLayout {
  size_t bytes = 0;
  template <typename T>
  STRUCTALIGN_HD size_t take(int64_t count) {
    const size_t offset = bytes;
    bytes = (bytes + static_cast<size_t>(count) * sizeof(T) + 15) / 16 * 16;
    return offset;
  }
};

template <typename T>
__device__ __forceinline__ T* smem_array(unsigned char* base, size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

// ---- reductions ---------------------------------------------------------------------------------------------------

// Sum of x over aligned groups of `width` lanes (a power of two <= 32), by a butterfly: every lane of a group gets
// the same bits (IEEE addition is commutative), and the order is fixed, so the result is deterministic. Every lane
// of the warp must call it.
template <typename A>
__device__ __forceinline__ A group_sum(A x, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum of x over the lanes of the warp that agree modulo `stride` (a power of two <= 32): lane l gets the sum over
// lanes l % stride + k * stride, the same bits in each, in a fixed order. Every lane of the warp must call it.
template <typename A>
__device__ __forceinline__ A lane_class_sum(A x, int stride) {
  for (int offset = 16; offset >= stride; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum of x over the block (blockDim.x a multiple of 32); every thread gets the same total, added in a fixed order.
// scratch: one A per warp. Every thread must call it.
template <typename A>
__device__ A block_sum(A x, A* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = group_sum(x, 32);
  __syncthreads();  // earlier readers of scratch are done
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// ---- vector loads and stores --------------------------------------------------------------------------------------

// The raw register type of `Bytes` bytes: one 16 / 8 / 4 / 2-byte load or store.
template <int Bytes>
struct Raw;
template <>
struct Raw<16> {
  using type = uint4;
};
template <>
struct Raw<8> {
  using type = uint2;
};
template <>
struct Raw<4> {
  using type = unsigned int;
};
template <>
struct Raw<2> {
  using type = unsigned short;
};

// V consecutive elements of type T moved as one raw word (V * sizeof(T) in {2, 4, 8, 16}; the address must be
// aligned to it) and converted to / from V accumulation-type values.
template <typename T, int V>
struct Vec {
  using raw = typename Raw<static_cast<int>(sizeof(T)) * V>::type;
  using A = acc_t<T>;

  // Read-only (non-coherent, __ldg) load: for inputs the kernel does not write.
  static __device__ __forceinline__ raw load_ro(const T* p) {
    return __ldg(reinterpret_cast<const raw*>(p));
  }
  static __device__ __forceinline__ void store(T* p, raw x) {
#ifdef STRUCTALIGN_CUDA_EMULATION
    emu::check_aligned(p, sizeof(raw));
#endif
    *reinterpret_cast<raw*>(p) = x;
  }
  static __device__ __forceinline__ void unpack(raw x, A (&out)[V]) {
    T elems[V];
    memcpy(elems, &x, sizeof x);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = to_acc(elems[k]);
  }
  static __device__ __forceinline__ raw pack(const A (&in)[V]) {
    T elems[V];
#pragma unroll
    for (int k = 0; k < V; ++k) elems[k] = from_acc<T>(in[k]);
    raw x;
    memcpy(&x, elems, sizeof x);
    return x;
  }
};

// Elements per 16-byte vector of T.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

}  // namespace cuda
}  // namespace structalign
