// CUDA device code of relative_location_loss (launcher: relative_location_loss.cu). Torch-free: it needs only the
// CUDA headers and relative_location_loss_math.h, so tests/test_cuda_compile.py compiles it alone with nvcc.
//
// One thread block per face. The face's errors e = pred - target and its gradient live in shared memory when 4 N
// values fit (else they are read from / added to global memory); threads stride over the relations, each computing
//   d_rc = sum_m w_m e[member_m, c] - e[anchor_r, c],  loss_rc = criterion(d_rc),
//   grad e[anchor_r] -= g_rc,  grad e[member_m] += w_m g_rc,  g_rc = scale * rw_r * criterion'(d_rc) (* grad_out),
// then the block reduces its loss and relation-weight sums to one partial per face, which the launcher adds in a
// fixed order. Gradient scatters use atomicAdd (relations share landmarks), so gradients may differ in the last
// bits between runs; the loss does not.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>

#include "relative_location_loss_math.h"

namespace structalign {
namespace rll {

// Largest shared-memory footprint the kernel asks for (the default per-block limit).
constexpr int64_t kMaxSharedBytes = 48 * 1024;
constexpr int kThreads = 256;

// torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__, so the half types convert through intrinsics.
__device__ __forceinline__ float to_acc(float x) {
  return x;
}
__device__ __forceinline__ double to_acc(double x) {
  return x;
}
__device__ __forceinline__ float to_acc(__half x) {
  return __half2float(x);
}
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Same behaviour as torch's CUDA_KERNEL_ASSERT: a device-side assert that surfaces as a CUDA error naming the check.
__device__ __forceinline__ void check_index(bool ok, const char* what) {
  if (!ok) {
    __assert_fail(what, __FILE__, __LINE__, __func__);
  }
}

template <typename A>
__device__ __forceinline__ A block_sum(A value, A* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    scratch[warp] = value;
  }
  __syncthreads();
  value = threadIdx.x < (blockDim.x >> 5) ? scratch[threadIdx.x] : A(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  __syncthreads();
  return value;
}

struct Log1pDevice {
  __device__ __forceinline__ float operator()(float x) const {
    return log1pf(x);
  }
  __device__ __forceinline__ double operator()(double x) const {
    return log1p(x);
  }
};

template <typename scalar_t, typename A>
struct KernelArgs {
  const scalar_t* pred;
  const scalar_t* target;
  const A* landmark_weight;  // [B, N] contiguous, or null
  const int64_t* anchor;
  const int64_t* indptr;
  const int64_t* member;
  const float* weight;
  const A* grad_out;  // [B, R, 2] contiguous: backward of reduction none, else null
  A* loss_none;       // [B, R, 2]: forward of reduction none, else null
  A* grad_pred;       // [B, N, 2] contiguous, zeroed: when a gradient is wanted, else null
  A* partial;         // [B, 2]: per-face loss sum and relation-weight sum
  int64_t batch, points, relations;
  int64_t stride_pb, stride_pn, stride_pc, stride_tb, stride_tn, stride_tc;
  CriterionParams<A> params;
  A grad_scale;
  bool shared;  // errors and gradient staged in shared memory
};

template <typename scalar_t, typename A, int64_t C>
__global__ void __launch_bounds__(kThreads) relative_location_loss_kernel(KernelArgs<scalar_t, A> args) {
  extern __shared__ unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  __shared__ A scratch[32];
  const int64_t b = blockIdx.x, n = args.points;
  const scalar_t* pred = args.pred + b * args.stride_pb;
  const scalar_t* target = args.target + b * args.stride_tb;
  const A* lw = args.landmark_weight != nullptr ? args.landmark_weight + b * n : nullptr;
  A* err = args.shared ? smem : nullptr;
  A* grad = args.grad_pred == nullptr ? nullptr : (args.shared ? smem + 2 * n : args.grad_pred + b * n * 2);
  if (args.shared) {
    for (int64_t i = threadIdx.x; i < n * 2; i += blockDim.x) {
      const int64_t j = i >> 1, c = i & 1;
      err[i] = to_acc(pred[j * args.stride_pn + c * args.stride_pc]) -
               to_acc(target[j * args.stride_tn + c * args.stride_tc]);
      if (grad != nullptr) {
        grad[i] = A(0);
      }
    }
    __syncthreads();
  }
  auto error_of = [&](int64_t j, int64_t c) -> A {
    return args.shared ? err[j * 2 + c]
                       : to_acc(pred[j * args.stride_pn + c * args.stride_pc]) -
                             to_acc(target[j * args.stride_tn + c * args.stride_tc]);
  };
  A loss_sum = 0, weight_sum = 0;
  for (int64_t r = threadIdx.x; r < args.relations; r += blockDim.x) {
    const int64_t a = args.anchor[r], begin = args.indptr[r], end = args.indptr[r + 1];
    check_index(a >= 0 && a < n, "relative_location_loss: anchor index outside [0, N)");
    A dx = -error_of(a, 0), dy = -error_of(a, 1);
    A rw = lw != nullptr ? lw[a] : A(1);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t m = args.member[k];
      check_index(m >= 0 && m < n, "relative_location_loss: member index outside [0, N)");
      const A w = static_cast<A>(args.weight[k]);
      dx += w * error_of(m, 0);
      dy += w * error_of(m, 1);
      if (lw != nullptr) {
        rw *= lw[m];
      }
    }
    A lx, ly, gx, gy;
    criterion_value_grad<C>(dx, args.params, Log1pDevice(), lx, gx);
    criterion_value_grad<C>(dy, args.params, Log1pDevice(), ly, gy);
    const int64_t out = (b * args.relations + r) * 2;
    if (args.loss_none != nullptr) {
      args.loss_none[out] = rw * lx;
      args.loss_none[out + 1] = rw * ly;
    }
    loss_sum += rw * (lx + ly);
    weight_sum += rw;
    if (grad == nullptr) {
      continue;
    }
    A sx = args.grad_scale * rw, sy = sx;
    if (args.grad_out != nullptr) {
      sx *= args.grad_out[out];
      sy *= args.grad_out[out + 1];
    }
    gx *= sx;
    gy *= sy;
    atomicAdd(&grad[a * 2], -gx);
    atomicAdd(&grad[a * 2 + 1], -gy);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t m = args.member[k];
      const A w = static_cast<A>(args.weight[k]);
      atomicAdd(&grad[m * 2], w * gx);
      atomicAdd(&grad[m * 2 + 1], w * gy);
    }
  }
  loss_sum = block_sum(loss_sum, scratch);
  weight_sum = block_sum(weight_sum, scratch);
  if (threadIdx.x == 0) {
    args.partial[b * 2] = loss_sum;
    args.partial[b * 2 + 1] = weight_sum;
  }
  if (args.shared && grad != nullptr) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n * 2; i += blockDim.x) {
      args.grad_pred[b * n * 2 + i] = grad[i];
    }
  }
}

// Bytes of dynamic shared memory for N points (0: the kernel works in global memory).
template <typename A>
inline int64_t shared_bytes(int64_t points) {
  const int64_t bytes = 4 * points * static_cast<int64_t>(sizeof(A));
  return bytes <= kMaxSharedBytes ? bytes : 0;
}

// Launches one block per face on `stream`; the caller checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK).
template <typename scalar_t, typename A>
void launch_relative_location_loss(const KernelArgs<scalar_t, A>& args, int64_t criterion, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.batch)), block(kThreads);
  const size_t smem = args.shared ? static_cast<size_t>(shared_bytes<A>(args.points)) : 0;
  if (criterion == kMse) {
    relative_location_loss_kernel<scalar_t, A, kMse><<<grid, block, smem, stream>>>(args);
  } else if (criterion == kL1) {
    relative_location_loss_kernel<scalar_t, A, kL1><<<grid, block, smem, stream>>>(args);
  } else {
    relative_location_loss_kernel<scalar_t, A, kSoftWing><<<grid, block, smem, stream>>>(args);
  }
}

}  // namespace rll
}  // namespace structalign

#ifdef STRUCTALIGN_INSTANTIATE_KERNELS
template void structalign::rll::launch_relative_location_loss<float, float>(
    const structalign::rll::KernelArgs<float, float>&, int64_t, cudaStream_t);
template void structalign::rll::launch_relative_location_loss<double, double>(
    const structalign::rll::KernelArgs<double, double>&, int64_t, cudaStream_t);
template void structalign::rll::launch_relative_location_loss<__half, float>(
    const structalign::rll::KernelArgs<__half, float>&, int64_t, cudaStream_t);
template void structalign::rll::launch_relative_location_loss<__nv_bfloat16, float>(
    const structalign::rll::KernelArgs<__nv_bfloat16, float>&, int64_t, cudaStream_t);
#endif
