// CUDA device code of relative_location_loss (launcher: relative_location_loss.cu). Torch-free: nvcc compiles it
// alone (tests/test_cuda_compile.py), and g++ compiles it for the CPU emulation of the kernels (csrc/testing/).
//
// A persistent grid: each block checks the relation tables once (and keeps int32 copies in shared memory when they
// fit), then loops over faces b = blockIdx.x, blockIdx.x + gridDim.x, ... For each face:
//   phase 0: the errors e = pred - target (prefetched into registers during the previous face) into shared memory;
//   phase 1: one thread per relation r: d_r = sum_m w_m e[member_m] - e[anchor_r], loss_r = criterion(d_r) and the
//            scaled gradient g_r = scale * rw_r * criterion'(d_r) (* grad_out[b, r]) into shared memory (or a
//            per-block global scratch when 2 R values do not fit);
//   phase 2: a group of lanes per landmark j gathers grad_pred[b, j] = sum_t point_coef[t] g[point_rel[t]] over j's
//            entries of the transposed index, and adds the group's lanes by a butterfly.
// No atomics: every sum has a fixed order, so gradients are bitwise reproducible. Each block adds its faces' loss
// and relation-weight sums in double and writes one partial; the launcher adds the partials in a fixed order.
#pragma once

#include <initializer_list>
#include <utility>

#include "cuda/common.cuh"
#include "relative_location_loss_math.h"

namespace structalign {
namespace rll {

constexpr int kThreads = 512;  // threads per block (a multiple of 32)
// Blocks an SM the registers must allow: 2 (<= 64 registers a thread); 1 in float64, whose criterion needs more.
template <typename A>
constexpr int kMinBlocks = sizeof(A) == 8 ? 1 : 2;
constexpr int kPrefetch = 2;   // error values per thread prefetched for the next face (all of them when N <= 512)

template <typename T, typename A>
struct KernelArgs {
  const T* pred;  // [B, N, 2], any strides
  const T* target;
  int64_t p_sb, p_sn, p_sc, t_sb, t_sn, t_sc;
  const A* landmark_weight;  // [B, N] contiguous, or null
  const int64_t* anchor;     // [R]
  const int64_t* indptr;     // [R + 1]
  const int64_t* member;     // [M]
  const A* weight;           // [M]
  const int64_t* point_ptr;  // [N + 1]
  const int64_t* point_rel;  // [R + M]
  const A* point_coef;       // [R + M]
  const A* grad_out;         // [B, R, 2] contiguous: the backward of reduction none, else null
  A* loss_none;              // [B, R, 2]: the forward of reduction none, else null
  A* grad_pred;              // [B, N, 2]: when a gradient is wanted, else null
  double* partial;           // [gridDim.x, 2]: each block's loss and relation-weight sums
  A* g_global;               // [gridDim.x, R, 2]: per-relation gradients when they do not fit shared memory
  int64_t batch;
  int n, r, m;
  CriterionParams<A> params;
  A grad_scale;
  int group;  // lanes per landmark in phase 2 (a power of two <= 32)
};

// Dynamic shared memory; the launcher sizes the buffer with the same layout.
template <typename A>
struct Smem {
  size_t reduce, err, lw, g, weight, pcoef, anchor, rptr, member, pptr, prel, bytes;
  STRUCTALIGN_HD Smem(int64_t n, int64_t r, int64_t m, bool weighted, bool g_shared, bool staged) {
    cuda::SmemLayout l;
    reduce = l.take<double>(kThreads / 32);         // block_sum scratch
    err = l.take<A>(2 * n);                         // [N][2]: e of the face
    lw = l.take<A>(weighted ? n : 0);               // [N]: landmark weights of the face
    g = l.take<A>(g_shared ? 2 * r : 0);            // [R][2]: scaled per-relation gradients
    weight = l.take<A>(staged ? m : 0);             // staged copies of the tables
    pcoef = l.take<A>(staged ? r + m : 0);
    anchor = l.take<int32_t>(staged ? r : 0);
    rptr = l.take<int32_t>(staged ? r + 1 : 0);
    member = l.take<int32_t>(staged ? m : 0);
    pptr = l.take<int32_t>(staged ? n + 1 : 0);
    prel = l.take<int32_t>(staged ? r + m : 0);
    bytes = l.bytes;
  }
};

// Host side: where the tables and the per-relation gradients live, and the launch's shared memory.
struct Plan {
  bool staged = false, g_shared = false;
  size_t smem = 0;
  int group = 1;
};

template <typename A>
inline Plan make_plan(int64_t n, int64_t r, int64_t m, bool weighted, size_t budget) {
  Plan p;
  for (const auto& [staged, g_shared] : {std::pair{true, true}, std::pair{false, true}, std::pair{false, false}}) {
    p.staged = staged;
    p.g_shared = g_shared;
    p.smem = Smem<A>(n, r, m, weighted, g_shared, staged).bytes;
    if (p.smem <= budget) break;
  }
  const int64_t per_landmark = n > 0 ? (r + m + n - 1) / n : 1;  // average entries per landmark
  while (p.group < 32 && p.group < per_landmark) p.group *= 2;
  return p;
}

// The relation tables as phase 1 and 2 read them: int32 copies in shared memory (kStaged), or the int64 originals
// through the read-only cache.
template <typename A, bool kStaged>
struct Tables;

template <typename A>
struct Tables<A, true> {
  int32_t *anchor, *rptr, *member, *pptr, *prel;
  A *weight, *pcoef;
  __device__ __forceinline__ int anchor_at(int i) const { return anchor[i]; }
  __device__ __forceinline__ int rptr_at(int i) const { return rptr[i]; }
  __device__ __forceinline__ int member_at(int i) const { return member[i]; }
  __device__ __forceinline__ A weight_at(int i) const { return weight[i]; }
  __device__ __forceinline__ int pptr_at(int i) const { return pptr[i]; }
  __device__ __forceinline__ int prel_at(int i) const { return prel[i]; }
  __device__ __forceinline__ A pcoef_at(int i) const { return pcoef[i]; }
};

template <typename A>
struct Tables<A, false> {
  const int64_t *anchor, *rptr, *member, *pptr, *prel;
  const A *weight, *pcoef;
  __device__ __forceinline__ int anchor_at(int i) const { return static_cast<int>(__ldg(anchor + i)); }
  __device__ __forceinline__ int rptr_at(int i) const { return static_cast<int>(__ldg(rptr + i)); }
  __device__ __forceinline__ int member_at(int i) const { return static_cast<int>(__ldg(member + i)); }
  __device__ __forceinline__ A weight_at(int i) const { return __ldg(weight + i); }
  __device__ __forceinline__ int pptr_at(int i) const { return static_cast<int>(__ldg(pptr + i)); }
  __device__ __forceinline__ int prel_at(int i) const { return static_cast<int>(__ldg(prel + i)); }
  __device__ __forceinline__ A pcoef_at(int i) const { return __ldg(pcoef + i); }
};

// Checks every table value the kernel indexes with (each block, once) and, when kStaged, copies the tables into
// shared memory as int32.
template <typename T, typename A, bool kStaged>
__device__ void check_tables(const KernelArgs<T, A>& a, const Tables<A, kStaged>& s) {
  const int n = a.n, r = a.r, m = a.m, t = a.r + a.m;
  for (int i = threadIdx.x; i < r; i += blockDim.x) {
    const int64_t lo = a.indptr[i], hi = a.indptr[i + 1], anchor = a.anchor[i];
    STRUCTALIGN_DEVICE_CHECK(lo >= 0 && lo <= hi && hi <= m,
                             "relative_location_loss: indptr must be non-decreasing within [0, M]");
    STRUCTALIGN_DEVICE_CHECK((i > 0 || lo == 0) && (i < r - 1 || hi == m),
                             "relative_location_loss: indptr must start at 0 and end at M");
    STRUCTALIGN_DEVICE_CHECK(anchor >= 0 && anchor < n, "relative_location_loss: anchor outside [0, N)");
    if constexpr (kStaged) {
      s.anchor[i] = static_cast<int32_t>(anchor);
      s.rptr[i] = static_cast<int32_t>(lo);
      if (i == r - 1) s.rptr[r] = m;
    }
  }
  for (int k = threadIdx.x; k < m; k += blockDim.x) {
    const int64_t member = a.member[k];
    STRUCTALIGN_DEVICE_CHECK(member >= 0 && member < n, "relative_location_loss: member outside [0, N)");
    if constexpr (kStaged) {
      s.member[k] = static_cast<int32_t>(member);
      s.weight[k] = a.weight[k];
    }
  }
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const int64_t lo = a.point_ptr[j], hi = a.point_ptr[j + 1];
    STRUCTALIGN_DEVICE_CHECK(lo >= 0 && lo <= hi && hi <= t,
                             "relative_location_loss: point_ptr must be non-decreasing within [0, R + M]");
    STRUCTALIGN_DEVICE_CHECK((j > 0 || lo == 0) && (j < n - 1 || hi == t),
                             "relative_location_loss: point_ptr must start at 0 and end at R + M");
    if constexpr (kStaged) {
      s.pptr[j] = static_cast<int32_t>(lo);
      if (j == n - 1) s.pptr[n] = t;
    }
  }
  for (int k = threadIdx.x; k < t; k += blockDim.x) {
    const int64_t rel = a.point_rel[k];
    STRUCTALIGN_DEVICE_CHECK(rel >= 0 && rel < r, "relative_location_loss: point_rel outside [0, R)");
    if constexpr (kStaged) {
      s.prel[k] = static_cast<int32_t>(rel);
      s.pcoef[k] = a.point_coef[k];
    }
  }
}

// Error component x (landmark x / 2, coordinate x % 2) of face b, or 0 past the problem.
template <typename T, typename A>
__device__ __forceinline__ A error_at(const KernelArgs<T, A>& a, int64_t b, int x) {
  if (b >= a.batch || x >= 2 * a.n) return A(0);
  const int64_t j = x >> 1, c = x & 1;
  return to_acc(__ldg(a.pred + b * a.p_sb + j * a.p_sn + c * a.p_sc)) -
         to_acc(__ldg(a.target + b * a.t_sb + j * a.t_sn + c * a.t_sc));
}

// grid: at most B blocks, block kThreads, dynamic shared memory Smem<A>.
template <typename T, typename A, int64_t C, bool kStaged>
__global__ void __launch_bounds__(kThreads, kMinBlocks<A>) relative_location_loss_kernel(const KernelArgs<T, A> a) {
  const bool staged_g = a.g_global == nullptr;
  const Smem<A> layout(a.n, a.r, a.m, a.landmark_weight != nullptr, staged_g, kStaged);
  unsigned char* smem = cuda::dynamic_smem();
  double* reduce = cuda::smem_array<double>(smem, layout.reduce);
  A* err = cuda::smem_array<A>(smem, layout.err);
  A* lw = cuda::smem_array<A>(smem, layout.lw);
  A* g = staged_g ? cuda::smem_array<A>(smem, layout.g) : a.g_global + static_cast<int64_t>(blockIdx.x) * 2 * a.r;
  Tables<A, kStaged> tab;
  if constexpr (kStaged) {
    tab = {cuda::smem_array<int32_t>(smem, layout.anchor), cuda::smem_array<int32_t>(smem, layout.rptr),
           cuda::smem_array<int32_t>(smem, layout.member), cuda::smem_array<int32_t>(smem, layout.pptr),
           cuda::smem_array<int32_t>(smem, layout.prel),   cuda::smem_array<A>(smem, layout.weight),
           cuda::smem_array<A>(smem, layout.pcoef)};
  } else {
    tab = {a.anchor, a.indptr, a.member, a.point_ptr, a.point_rel, a.weight, a.point_coef};
  }
  check_tables(a, tab);

  const int tid = threadIdx.x, threads = blockDim.x;
  const int groups = threads / a.group, gid = tid / a.group, glane = tid % a.group;  // phase 2's lane groups
  A next[kPrefetch];  // this thread's error values of the next face
#pragma unroll
  for (int q = 0; q < kPrefetch; ++q) next[q] = error_at(a, blockIdx.x, tid + q * threads);
  double loss_total = 0, weight_total = 0;
  for (int64_t b = blockIdx.x; b < a.batch; b += gridDim.x) {
    __syncthreads();  // the tables are checked / the previous face's readers of err, lw and g are done
#pragma unroll
    for (int q = 0; q < kPrefetch; ++q) {
      if (tid + q * threads < 2 * a.n) err[tid + q * threads] = next[q];
    }
    for (int x = tid + kPrefetch * threads; x < 2 * a.n; x += threads) err[x] = error_at(a, b, x);
    if (a.landmark_weight != nullptr) {
      for (int j = tid; j < a.n; j += threads) lw[j] = a.landmark_weight[b * a.n + j];
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kPrefetch; ++q) next[q] = error_at(a, b + gridDim.x, tid + q * threads);

    A face_loss = 0, face_weight = 0;
    for (int rel = tid; rel < a.r; rel += threads) {
      const int anchor = tab.anchor_at(rel), lo = tab.rptr_at(rel), hi = tab.rptr_at(rel + 1);
      A dx = -err[2 * anchor], dy = -err[2 * anchor + 1];
      A rw = a.landmark_weight != nullptr ? lw[anchor] : A(1);
      for (int k = lo; k < hi; ++k) {
        const int mem = tab.member_at(k);
        const A w = tab.weight_at(k);
        dx += w * err[2 * mem];
        dy += w * err[2 * mem + 1];
        if (a.landmark_weight != nullptr) rw *= lw[mem];
      }
      A lx, ly, gx, gy;
      criterion_value_grad<C>(dx, a.params, Log1pAcc(), lx, gx);
      criterion_value_grad<C>(dy, a.params, Log1pAcc(), ly, gy);
      const int64_t out = (b * a.r + rel) * 2;
      if (a.loss_none != nullptr) {
        a.loss_none[out] = rw * lx;
        a.loss_none[out + 1] = rw * ly;
      } else {
        face_loss += rw * (lx + ly);
        face_weight += rw;
      }
      if (a.grad_pred != nullptr) {
        A sx = a.grad_scale * rw, sy = sx;
        if (a.grad_out != nullptr) {
          sx *= a.grad_out[out];
          sy *= a.grad_out[out + 1];
        }
        g[2 * rel] = gx * sx;
        g[2 * rel + 1] = gy * sy;
      }
    }
    loss_total += static_cast<double>(face_loss);
    weight_total += static_cast<double>(face_weight);
    if (a.grad_pred == nullptr) continue;
    __syncthreads();
    for (int j0 = 0; j0 < a.n; j0 += groups) {  // the same trip count in every lane, for the butterfly
      const int j = j0 + gid;
      A sx = 0, sy = 0;
      if (j < a.n) {
        for (int t = tab.pptr_at(j) + glane; t < tab.pptr_at(j + 1); t += a.group) {
          const int rel = tab.prel_at(t);
          const A coef = tab.pcoef_at(t);
          sx += coef * g[2 * rel];
          sy += coef * g[2 * rel + 1];
        }
      }
      sx = cuda::group_sum(sx, a.group);
      sy = cuda::group_sum(sy, a.group);
      if (j < a.n && glane == 0) {
        a.grad_pred[(b * a.n + j) * 2] = sx;
        a.grad_pred[(b * a.n + j) * 2 + 1] = sy;
      }
    }
  }
  loss_total = cuda::block_sum(loss_total, reduce);
  weight_total = cuda::block_sum(weight_total, reduce);
  if (tid == 0) {
    a.partial[blockIdx.x * 2] = loss_total;
    a.partial[blockIdx.x * 2 + 1] = weight_total;
  }
}

}  // namespace rll
}  // namespace structalign

#ifdef STRUCTALIGN_INSTANTIATE_KERNELS
namespace structalign {
namespace rll {

#define STRUCTALIGN_RLL_INSTANTIATE(T, C, S) \
  template __global__ void relative_location_loss_kernel<T, acc_t<T>, C, S>(const KernelArgs<T, acc_t<T>>);
#define STRUCTALIGN_RLL_INSTANTIATE_TYPE(T)               \
  STRUCTALIGN_RLL_INSTANTIATE(T, kSoftWing, true)         \
  STRUCTALIGN_RLL_INSTANTIATE(T, kSoftWing, false)        \
  STRUCTALIGN_RLL_INSTANTIATE(T, kL1, true)               \
  STRUCTALIGN_RLL_INSTANTIATE(T, kL1, false)              \
  STRUCTALIGN_RLL_INSTANTIATE(T, kMse, true)              \
  STRUCTALIGN_RLL_INSTANTIATE(T, kMse, false)

STRUCTALIGN_RLL_INSTANTIATE_TYPE(float)
STRUCTALIGN_RLL_INSTANTIATE_TYPE(double)
template Plan make_plan<float>(int64_t, int64_t, int64_t, bool, size_t);
template Plan make_plan<double>(int64_t, int64_t, int64_t, bool, size_t);
STRUCTALIGN_RLL_INSTANTIATE_TYPE(__half)
STRUCTALIGN_RLL_INSTANTIATE_TYPE(__nv_bfloat16)
#undef STRUCTALIGN_RLL_INSTANTIATE_TYPE
#undef STRUCTALIGN_RLL_INSTANTIATE

}  // namespace rll
}  // namespace structalign
#endif
