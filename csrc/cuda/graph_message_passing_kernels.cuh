// CUDA device code of graph_message_passing (launcher: graph_message_passing.cu). Torch-free: nvcc compiles it alone
// (tests/test_cuda_compile.py), and g++ compiles it for the CPU emulation of the kernels (csrc/testing/).
//
// Both kernels move channels in vectors of V elements (16 bytes when C, the strides and the pointers allow it, else
// one element) and work on channel tiles of tile_vecs vectors per node (a power of two, at most 128 bytes a row).
// Item t of a tile is (node t / tile_vecs, vector t % tile_vecs), so consecutive threads touch consecutive vectors
// of a row (coalesced), and a thread's vector lane t % tile_vecs never changes (blockDim is a multiple of it).
//
// Forward: one block per (face b, channel tile). Phase 1: one thread per row checks the row and computes its
// softmax (one exponential per edge) into shared memory, while all threads stage h_nbr[b] for the tile. Phase 2,
// per item (i, v): out[b, i, v] = bias + sum over row i's edges f of A_f x_f, x_f = h_self[b, i, v] for the self
// loop, else the staged h_nbr[b, j, v].
// Backward: one block per face b, looping over the channel tiles. Phase 1: rows and softmax as in the forward, and
// the transposed graph (checked against the rows) into shared memory. Per tile: stage grad_out[b]; item (k, v)
// gathers grad_h_nbr[b, k, v] = sum over edges f = (i -> k), i != k, of A_f g[b, i, v] from the staged rows (no
// atomics), writes grad_h_self[b, k, v] = A_kk g[b, k, v], and adds its vector's share of d_f = <g_i, x_f> for each
// of those edges to part[f][v % tile_vecs], which it alone writes; lanes with the same vector add their g for the
// face's grad-bias sums. After the tiles, one thread per row turns d into grad logits through the softmax Jacobian.
// Every sum has a fixed order, so results are bitwise reproducible.
#pragma once

#include <initializer_list>

#include "cuda/common.cuh"
#include "graph_message_passing_math.h"

namespace structalign {
namespace gmp {

constexpr int kThreads = 256;       // threads per block of both kernels (a multiple of 32)
// Blocks an SM the registers must allow (launch bounds): the forward 5 (<= 51 registers a thread), the backward 4
// (<= 64), 3 in float64 (<= 85). Tighter bounds make ptxas spill.
constexpr int kForwardMinBlocks = 5;
template <typename T>
constexpr int kBackwardMinBlocks = sizeof(T) == 8 ? 3 : 4;
constexpr int kMaxTileVecs = 32;    // vectors per row of a channel tile (a power of two <= 32)
constexpr int kMaxTileBytes = 128;  // bytes per row of a channel tile

template <typename T>
struct ForwardArgs {
  const T* h_self;  // [B, N, C], unit channel stride
  int64_t hs_sb, hs_sn;
  const T* h_nbr;  // [B, N, C], unit channel stride
  int64_t hn_sb, hn_sn;
  const acc_t<T>* logits;  // [E] (logits_sb = 0) or [B, E], accumulation type
  int64_t logits_sb;
  const int64_t* indptr;   // [N + 1]
  const int64_t* indices;  // [E]
  const T* bias;           // [C] or null
  T* out;                  // [B, N, C] contiguous
  int n, e, max_deg;
  int64_t c;
  int tile_vecs, tile_shift;  // tile_vecs = 1 << tile_shift
  int64_t c_vecs;             // C / V
};

template <typename T>
struct BackwardArgs {
  const T* grad_out;  // [B, N, C], unit channel stride
  int64_t go_sb, go_sn;
  const T* h_self;
  int64_t hs_sb, hs_sn;
  const T* h_nbr;
  int64_t hn_sb, hn_sn;
  const acc_t<T>* logits;
  int64_t logits_sb;
  const int64_t* indptr;
  const int64_t* indices;
  const int64_t* in_ptr;    // [N + 1]
  const int64_t* in_edges;  // [E]
  const int64_t* edge_row;  // [E]
  T* grad_h_self;           // [B, N, C] with unit channel stride, or null
  T* grad_h_nbr;            // [B, N, C] with unit channel stride (the same strides), or null
  int64_t gs_sb, gs_sn;     // batch and row strides of grad_h_self / grad_h_nbr
  acc_t<T>* grad_logits;    // [B, E], or null
  acc_t<T>* grad_bias;      // [B, C]: each face's sum over nodes, or null
  int n, e, max_deg, max_in_deg;
  int64_t c;
  int tile_vecs, tile_shift;
  int64_t c_vecs, tiles;
};

// Dynamic shared memory of each kernel; the launcher sizes the buffer with the same layout.
template <typename T, int V>
struct ForwardSmem {
  size_t tile, weight, rowptr, nbr, bytes;
  STRUCTALIGN_HD ForwardSmem(int64_t n, int64_t e, int tile_vecs) {
    cuda::SmemLayout l;
    tile = l.take<typename cuda::Vec<T, V>::raw>(n * tile_vecs);  // [N][tile_vecs]: h_nbr[b] in the tile
    weight = l.take<acc_t<T>>(e);                                 // [E]: softmax weight of each edge
    rowptr = l.take<int32_t>(n + 1);                              // [N + 1]
    nbr = l.take<int32_t>(e);                                     // [E]: neighbour of each edge
    bytes = l.bytes;
  }
};

template <typename T, int V>
struct BackwardSmem {
  size_t tile, weight, part, colsum, rowptr, in_ptr, in_edge, edge_row, bytes;
  STRUCTALIGN_HD BackwardSmem(int64_t n, int64_t e, int tile_vecs, int warps, bool logits, bool bias) {
    cuda::SmemLayout l;
    tile = l.take<typename cuda::Vec<T, V>::raw>(n * tile_vecs);  // [N][tile_vecs]: grad_out[b] in the tile
    weight = l.take<acc_t<T>>(e);
    part = l.take<acc_t<T>>(logits ? e * tile_vecs : 0);    // [E][tile_vecs]: d_f summed per vector lane
    colsum = l.take<acc_t<T>>(bias ? warps * tile_vecs * V : 0);  // [warps][tile channels]: sums of g
    rowptr = l.take<int32_t>(n + 1);
    in_ptr = l.take<int32_t>(n + 1);
    in_edge = l.take<int32_t>(e);
    edge_row = l.take<int32_t>(e);
    bytes = l.bytes;
  }
};

// Host side: whether V-element vectors can move the channels (C of them) of every [B, N, C] tensor given by its data
// pointer and its batch and row strides: C and the strides are multiples of V and the pointers 16-byte aligned.
inline bool can_vectorize(int vec, int64_t c, std::initializer_list<const void*> pointers,
                          std::initializer_list<int64_t> strides) {
  bool ok = c % vec == 0;
  for (const void* p : pointers) ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  for (int64_t s : strides) ok = ok && s % vec == 0;
  return ok;
}

// Host side: the channel tiling and shared memory of a launch.
struct Plan {
  int tile_vecs = 0, tile_shift = 0;  // 0 vectors: the graph does not fit the shared-memory budget
  int64_t c_vecs = 0, tiles = 0;
  size_t smem = 0;
};

// The widest tile (a power of two <= kMaxTileVecs vectors and <= kMaxTileBytes bytes a row, no wider than C needs)
// whose shared memory smem_of(tile_vecs) fits `budget` bytes.
template <typename SmemOf>
inline Plan make_plan(int64_t c, int vec, int vec_bytes, size_t budget, SmemOf smem_of) {
  Plan p;
  p.c_vecs = c / vec;
  int tv = 1;
  while (tv < p.c_vecs && tv * 2 <= kMaxTileVecs && tv * 2 * vec_bytes <= kMaxTileBytes) tv *= 2;
  while (tv > 0 && smem_of(tv) > budget) tv /= 2;
  if (tv == 0) return p;
  p.tile_vecs = tv;
  while ((1 << p.tile_shift) < tv) ++p.tile_shift;
  p.tiles = (p.c_vecs + tv - 1) / tv;
  p.smem = smem_of(tv);
  return p;
}

template <typename T, int V>
inline Plan forward_plan(int64_t n, int64_t e, int64_t c, size_t budget) {
  return make_plan(c, V, V * static_cast<int>(sizeof(T)), budget,
                   [&](int tv) { return ForwardSmem<T, V>(n, e, tv).bytes; });
}

template <typename T, int V>
inline Plan backward_plan(int64_t n, int64_t e, int64_t c, bool logits, bool bias, size_t budget) {
  return make_plan(c, V, V * static_cast<int>(sizeof(T)), budget,
                   [&](int tv) { return BackwardSmem<T, V>(n, e, tv, kThreads / 32, logits, bias).bytes; });
}

// Phase 1 of both kernels for row i of face logits `logits`: checks the row, then writes rowptr, the row's softmax
// weights and, when nbr is not null, its neighbours as int32. Every block checks what it reads; `check_duplicates`
// blocks also check that no neighbour repeats.
template <typename A>
__device__ void load_row(int i, const A* logits, const int64_t* indptr, const int64_t* indices, int n, int e,
                         int max_deg, bool check_duplicates, A* weight, int32_t* rowptr, int32_t* nbr) {
  const int64_t row = indptr[i], end = indptr[i + 1];
  STRUCTALIGN_DEVICE_CHECK(row >= 0 && row < end && end <= e,
                           "graph_message_passing: indptr must increase strictly within [0, E] (every row needs "
                           "at least its self loop)");
  STRUCTALIGN_DEVICE_CHECK((i > 0 || row == 0) && (i < n - 1 || end == e),
                           "graph_message_passing: indptr must start at 0 and end at E");
  STRUCTALIGN_DEVICE_CHECK(end - row <= max_deg, "graph_message_passing: a row has more than max_deg entries");
  rowptr[i] = static_cast<int32_t>(row);
  if (i == n - 1) rowptr[n] = e;
  for (int64_t f = row; f < end; ++f) {
    const int64_t j = indices[f];
    STRUCTALIGN_DEVICE_CHECK(j >= 0 && j < n, "graph_message_passing: indices holds a node outside [0, N)");
    if (check_duplicates) {
      for (int64_t g = row; g < f; ++g) {
        STRUCTALIGN_DEVICE_CHECK(indices[g] != j, "graph_message_passing: a row lists the same neighbour twice");
      }
    }
    if (nbr != nullptr) nbr[f] = static_cast<int32_t>(j);
  }
  row_softmax(logits + row, end - row, weight + row);
}

// Stages rows [0, N) of `src` (row r at src + r * stride_n) for the tile starting at vector v0 into tile[N][tv].
template <typename T, int V>
__device__ __forceinline__ void stage_tile(const T* src, int64_t stride_n, int n, int shift, int64_t v0,
                                           int64_t c_vecs, typename cuda::Vec<T, V>::raw* tile) {
  const int tv = 1 << shift;
  for (int t = threadIdx.x; t < (n << shift); t += blockDim.x) {
    const int64_t v = v0 + (t & (tv - 1));
    if (v < c_vecs) tile[t] = cuda::Vec<T, V>::load_ro(src + (t >> shift) * stride_n + v * V);
  }
}

template <typename A, int V>
__device__ __forceinline__ A dot(const A (&x)[V], const A (&y)[V]) {
  A d = 0;
#pragma unroll
  for (int k = 0; k < V; ++k) d += x[k] * y[k];
  return d;
}

// grid (B, tiles), block kThreads, dynamic shared memory ForwardSmem<T, V>.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kForwardMinBlocks)
    graph_message_passing_fwd_kernel(const ForwardArgs<T> a) {
  using A = acc_t<T>;
  using Vec = cuda::Vec<T, V>;
  using raw = typename Vec::raw;
  const int64_t b = blockIdx.x;
  const int tile = blockIdx.y, shift = a.tile_shift, tv = a.tile_vecs;
  const ForwardSmem<T, V> layout(a.n, a.e, tv);
  unsigned char* smem = cuda::dynamic_smem();
  raw* nbr_tile = cuda::smem_array<raw>(smem, layout.tile);
  A* weight = cuda::smem_array<A>(smem, layout.weight);
  int32_t* rowptr = cuda::smem_array<int32_t>(smem, layout.rowptr);
  int32_t* nbr = cuda::smem_array<int32_t>(smem, layout.nbr);
  const int64_t v0 = static_cast<int64_t>(tile) << shift;

  for (int i = threadIdx.x; i < a.n; i += blockDim.x) {
    load_row(i, a.logits + b * a.logits_sb, a.indptr, a.indices, a.n, a.e, a.max_deg, b == 0 && tile == 0, weight,
             rowptr, nbr);
  }
  stage_tile<T, V>(a.h_nbr + b * a.hn_sb, a.hn_sn, a.n, shift, v0, a.c_vecs, nbr_tile);
  __syncthreads();

  const int lane_vec = threadIdx.x & (tv - 1);
  for (int t = threadIdx.x; t < (a.n << shift); t += blockDim.x) {
    const int i = t >> shift;
    const int64_t v = v0 + lane_vec;
    if (v >= a.c_vecs) continue;
    const raw self = Vec::load_ro(a.h_self + b * a.hs_sb + i * a.hs_sn + v * V);
    A acc[V];
    if (a.bias != nullptr) {
      Vec::unpack(Vec::load_ro(a.bias + v * V), acc);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = 0;
    }
    for (int f = rowptr[i]; f < rowptr[i + 1]; ++f) {
      const int j = nbr[f];
      const A w = weight[f];
      A x[V];
      Vec::unpack(j == i ? self : nbr_tile[(j << shift) + lane_vec], x);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += w * x[k];
    }
    Vec::store(a.out + (b * a.n + i) * a.c + v * V, Vec::pack(acc));
  }
}

// Phase 1 of the backward for node k: checks k's incoming edges against the rows and stores them as int32.
__device__ __forceinline__ void load_in_edges(int k, const int64_t* in_ptr, const int64_t* in_edges,
                                              const int64_t* indices, int n, int e, int max_in_deg,
                                              int32_t* s_in_ptr, int32_t* s_in_edge) {
  const int64_t lo = in_ptr[k], hi = in_ptr[k + 1];
  STRUCTALIGN_DEVICE_CHECK(lo >= 0 && lo <= hi && hi <= e,
                           "graph_message_passing_backward: in_ptr must be non-decreasing within [0, E]");
  STRUCTALIGN_DEVICE_CHECK((k > 0 || lo == 0) && (k < n - 1 || hi == e),
                           "graph_message_passing_backward: in_ptr must start at 0 and end at E");
  STRUCTALIGN_DEVICE_CHECK(hi - lo <= max_in_deg,
                           "graph_message_passing_backward: a node has more than max_in_deg incoming edges");
  s_in_ptr[k] = static_cast<int32_t>(lo);
  if (k == n - 1) s_in_ptr[n] = e;
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t f = in_edges[t];
    STRUCTALIGN_DEVICE_CHECK(f >= 0 && f < e && indices[f] == k && (t == lo || f > in_edges[t - 1]),
                             "graph_message_passing_backward: in_edges must list each node's incoming edges in "
                             "ascending order");
    s_in_edge[t] = static_cast<int32_t>(f);
  }
}

// grid B, block kThreads, dynamic shared memory BackwardSmem<T, V>.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocks<T>)
    graph_message_passing_bwd_kernel(const BackwardArgs<T> a) {
  using A = acc_t<T>;
  using Vec = cuda::Vec<T, V>;
  using raw = typename Vec::raw;
  const int64_t b = blockIdx.x;
  const int shift = a.tile_shift, tv = a.tile_vecs, warps = blockDim.x / 32;
  const bool need_logits = a.grad_logits != nullptr, need_bias = a.grad_bias != nullptr;
  const BackwardSmem<T, V> layout(a.n, a.e, tv, warps, need_logits, need_bias);
  unsigned char* smem = cuda::dynamic_smem();
  raw* g_tile = cuda::smem_array<raw>(smem, layout.tile);
  A* weight = cuda::smem_array<A>(smem, layout.weight);
  A* part = cuda::smem_array<A>(smem, layout.part);
  A* colsum = cuda::smem_array<A>(smem, layout.colsum);
  int32_t* rowptr = cuda::smem_array<int32_t>(smem, layout.rowptr);
  int32_t* in_ptr = cuda::smem_array<int32_t>(smem, layout.in_ptr);
  int32_t* in_edge = cuda::smem_array<int32_t>(smem, layout.in_edge);
  int32_t* edge_row = cuda::smem_array<int32_t>(smem, layout.edge_row);

  for (int i = threadIdx.x; i < a.n; i += blockDim.x) {
    load_row(i, a.logits + b * a.logits_sb, a.indptr, a.indices, a.n, a.e, a.max_deg, b == 0, weight, rowptr,
             static_cast<int32_t*>(nullptr));
    load_in_edges(i, a.in_ptr, a.in_edges, a.indices, a.n, a.e, a.max_in_deg, in_ptr, in_edge);
  }
  for (int f = threadIdx.x; f < a.e; f += blockDim.x) {
    const int64_t r = a.edge_row[f];
    STRUCTALIGN_DEVICE_CHECK(r >= 0 && r < a.n && a.indptr[r] <= f && f < a.indptr[r + 1],
                             "graph_message_passing_backward: edge_row[e] must be the row of edge e");
    edge_row[f] = static_cast<int32_t>(r);
  }
  if (need_logits) {
    for (int x = threadIdx.x; x < (a.e << shift); x += blockDim.x) part[x] = 0;
  }

  const int lane_vec = threadIdx.x & (tv - 1);
  for (int64_t tile = 0; tile < a.tiles; ++tile) {
    const int64_t v0 = tile << shift;
    const int64_t v = v0 + lane_vec;
    __syncthreads();  // phase 1 is done / the previous tile's readers of g_tile and colsum are done
    stage_tile<T, V>(a.grad_out + b * a.go_sb, a.go_sn, a.n, shift, v0, a.c_vecs, g_tile);
    __syncthreads();
    A gsum[V];  // this thread's items' g, for grad bias
#pragma unroll
    for (int k = 0; k < V; ++k) gsum[k] = 0;
    for (int t = threadIdx.x; t < (a.n << shift) && v < a.c_vecs; t += blockDim.x) {
      const int k = t >> shift;
      A g[V], gn[V];
      Vec::unpack(g_tile[t], g);
      raw hs{}, hn{};
      if (need_logits) {
        hs = Vec::load_ro(a.h_self + b * a.hs_sb + k * a.hs_sn + v * V);
        hn = Vec::load_ro(a.h_nbr + b * a.hn_sb + k * a.hn_sn + v * V);
      }
#pragma unroll
      for (int q = 0; q < V; ++q) gn[q] = 0;
      A a_self = 0;
      for (int s = in_ptr[k]; s < in_ptr[k + 1]; ++s) {
        const int f = in_edge[s], i = edge_row[f];
        const A w = weight[f];
        A x[V];
        if (i == k) {  // the self loop: A_kk for grad h_self, d_f = <g_k, h_self[b, k]>
          a_self = w;
          if (need_logits) {
            Vec::unpack(hs, x);
            part[(f << shift) + lane_vec] += dot(g, x);
          }
        } else {
          A gi[V];
          Vec::unpack(g_tile[(i << shift) + lane_vec], gi);
#pragma unroll
          for (int q = 0; q < V; ++q) gn[q] += w * gi[q];
          if (need_logits) {
            Vec::unpack(hn, x);
            part[(f << shift) + lane_vec] += dot(gi, x);
          }
        }
      }
      const int64_t out = b * a.gs_sb + k * a.gs_sn + v * V;
      if (a.grad_h_self != nullptr) {
        A gs[V];
#pragma unroll
        for (int q = 0; q < V; ++q) gs[q] = a_self * g[q];
        Vec::store(a.grad_h_self + out, Vec::pack(gs));
      }
      if (a.grad_h_nbr != nullptr) Vec::store(a.grad_h_nbr + out, Vec::pack(gn));
#pragma unroll
      for (int q = 0; q < V; ++q) gsum[q] += g[q];
    }
    if (need_bias) {
      // Lanes that agree modulo tile_vecs hold the same channels: sum them per warp, then the warps in order.
      const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, width = tv * V;
#pragma unroll
      for (int q = 0; q < V; ++q) gsum[q] = cuda::lane_class_sum(gsum[q], tv);
      if (lane < tv) {
#pragma unroll
        for (int q = 0; q < V; ++q) colsum[warp * width + lane * V + q] = gsum[q];
      }
      __syncthreads();
      for (int x = threadIdx.x; x < width; x += blockDim.x) {
        const int64_t ch = v0 * V + x;
        if (ch >= a.c) continue;
        A s = 0;
        for (int w = 0; w < warps; ++w) s += colsum[w * width + x];
        a.grad_bias[b * a.c + ch] = s;
      }
    }
  }
  if (need_logits) {
    __syncthreads();
    for (int i = threadIdx.x; i < a.n; i += blockDim.x) {
      A weighted = 0;
      for (int f = rowptr[i]; f < rowptr[i + 1]; ++f) {
        A d = 0;
        for (int q = 0; q < tv; ++q) d += part[(f << shift) + q];
        part[f << shift] = d;
        weighted += weight[f] * d;
      }
      for (int f = rowptr[i]; f < rowptr[i + 1]; ++f) {
        a.grad_logits[b * a.e + f] = softmax_backward(weight[f], part[f << shift], weighted);
      }
    }
  }
}

}  // namespace gmp
}  // namespace structalign

#ifdef STRUCTALIGN_INSTANTIATE_KERNELS
namespace structalign {
namespace gmp {

#define STRUCTALIGN_GMP_INSTANTIATE(T, V)                                                                \
  template __global__ void graph_message_passing_fwd_kernel<T, V>(const ForwardArgs<T>);                 \
  template __global__ void graph_message_passing_bwd_kernel<T, V>(const BackwardArgs<T>);                \
  template Plan forward_plan<T, V>(int64_t, int64_t, int64_t, size_t);                                   \
  template Plan backward_plan<T, V>(int64_t, int64_t, int64_t, bool, bool, size_t);
#define STRUCTALIGN_GMP_INSTANTIATE_TYPE(T)  \
  STRUCTALIGN_GMP_INSTANTIATE(T, cuda::kVec16<T>) \
  STRUCTALIGN_GMP_INSTANTIATE(T, 1)

STRUCTALIGN_GMP_INSTANTIATE_TYPE(float)
STRUCTALIGN_GMP_INSTANTIATE_TYPE(double)
STRUCTALIGN_GMP_INSTANTIATE_TYPE(__half)
STRUCTALIGN_GMP_INSTANTIATE_TYPE(__nv_bfloat16)
#undef STRUCTALIGN_GMP_INSTANTIATE_TYPE
#undef STRUCTALIGN_GMP_INSTANTIATE

}  // namespace gmp
}  // namespace structalign
#endif
