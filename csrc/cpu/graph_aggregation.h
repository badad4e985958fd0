// CPU building blocks of the graph aggregation shared by graph_message_passing (csrc/cpu/graph_message_passing.cpp)
// and the fused graph convolution (csrc/cpu/graph_conv.cpp): checks of the graph's values, channel loops, the
// softmax of a face's logits, and one face's aggregation forward and backward. Each including file gets its own
// copies (anonymous namespace), so the multi-ISA clones stay local to it.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "graph_message_passing_math.h"

namespace structalign {

namespace {

// Output rows (one face, one node; about deg x C multiply-adds each) per parallel_for task: enough channels per
// task that small problems run inline instead of paying for a thread hand-off.
int64_t row_grain(int64_t c) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1));
}

// Checks the CSR rows' values (they come from Python unchecked when the op is called directly): indptr runs from 0
// to E, every row is non-empty and at most max_deg long, neighbours are in [0, N) and distinct within a row.
void check_rows(const char* op, const at::Tensor& indptr, const at::Tensor& indices, int64_t n, int64_t max_deg) {
  const int64_t* ptr = indptr.data_ptr<int64_t>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t e = indices.numel();
  TORCH_CHECK(ptr[0] == 0 && ptr[n] == e, op, ": indptr must start at 0 and end at E = ", e, ", got ", ptr[0],
              "..", ptr[n]);
  std::vector<int64_t> seen(n, -1);  // seen[j]: the last row that listed j
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ptr[i + 1] > ptr[i], op, ": node ", i,
                " has no entry in indptr/indices (every row needs at least its self loop)");
    TORCH_CHECK(ptr[i + 1] - ptr[i] <= max_deg, op, ": row ", i, " has ", ptr[i + 1] - ptr[i],
                " entries, more than max_deg = ", max_deg);
    for (int64_t k = ptr[i]; k < ptr[i + 1]; ++k) {
      TORCH_CHECK(idx[k] >= 0 && idx[k] < n, op, ": indices[", k, "] = ", idx[k], " is outside [0, ", n, ")");
      TORCH_CHECK(seen[idx[k]] != i, op, ": row ", i, " lists neighbour ", idx[k], " twice");
      seen[idx[k]] = i;
    }
  }
}

// Checks the transposed graph against the (checked) rows: node j's in_edges are the edges into j in ascending order,
// at most max_in_deg of them, and edge_row[e] is the row of edge e.
void check_transposed(const char* op, const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& in_ptr,
                      const at::Tensor& in_edges, const at::Tensor& edge_row, int64_t n, int64_t max_in_deg) {
  const int64_t* ptr = indptr.data_ptr<int64_t>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t* iptr = in_ptr.data_ptr<int64_t>();
  const int64_t* iedge = in_edges.data_ptr<int64_t>();
  const int64_t* erow = edge_row.data_ptr<int64_t>();
  const int64_t e = indices.numel();
  TORCH_CHECK(iptr[0] == 0 && iptr[n] == e, op, ": in_ptr must start at 0 and end at E = ", e, ", got ", iptr[0],
              "..", iptr[n]);
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(iptr[j + 1] >= iptr[j] && iptr[j + 1] - iptr[j] <= max_in_deg, op, ": node ", j, " has ",
                iptr[j + 1] - iptr[j], " incoming edges in in_ptr, outside [0, max_in_deg = ", max_in_deg, "]");
    for (int64_t t = iptr[j]; t < iptr[j + 1]; ++t) {
      const int64_t f = iedge[t];
      TORCH_CHECK(f >= 0 && f < e && idx[f] == j && (t == iptr[j] || f > iedge[t - 1]), op, ": in_edges[", t,
                  "] = ", f, " is not the next edge into node ", j,
                  " (in_edges must list each node's incoming edges in ascending order)");
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t f = ptr[i]; f < ptr[i + 1]; ++f) {
      TORCH_CHECK(erow[f] == i, op, ": edge_row[", f, "] = ", erow[f], " but edge ", f, " is in row ", i);
    }
  }
}

// ---- channel loops, up to kGroup rows per pass over the channels ------------------------------------------------
// (each pass loads y / g once for kGroup rows: the aggregation is load-bound, and one row at a time would load and
// store the accumulator row once per edge). Generic versions go through the accumulation type; the fp32 overloads
// are compiled per ISA (STRUCTALIGN_CPU_CLONES) around the same always-inlined loops.

constexpr int kGroup = 4;
enum class Start { kZero, kInit, kAccumulate };  // y = 0 / init / y, then + sum_k a_k x_k

#define STRUCTALIGN_ALWAYS_INLINE inline __attribute__((always_inline))

template <int K, typename T, typename A>
STRUCTALIGN_ALWAYS_INLINE void combine_k(Start start, const A* a, const T* const* x, const T* init, A* y,
                                         int64_t c) {
  // Weights and row pointers in locals (unused ones repeat row 0 with weight 0), so the loop is plain streams.
  const T* __restrict__ x0 = x[0];
  const T* __restrict__ x1 = K > 1 ? x[1] : x0;
  const T* __restrict__ x2 = K > 2 ? x[2] : x0;
  const T* __restrict__ x3 = K > 3 ? x[3] : x0;
  const A a0 = K > 0 ? a[0] : A(0), a1 = K > 1 ? a[1] : A(0), a2 = K > 2 ? a[2] : A(0), a3 = K > 3 ? a[3] : A(0);
  // The three starts as one loop each (the start is uniform across the row).
#define STRUCTALIGN_COMBINE_TERMS(s)                 \
  if constexpr (K > 0) s += a0 * to_acc(x0[ch]);     \
  if constexpr (K > 1) s += a1 * to_acc(x1[ch]);     \
  if constexpr (K > 2) s += a2 * to_acc(x2[ch]);     \
  if constexpr (K > 3) s += a3 * to_acc(x3[ch]);
  if (start == Start::kAccumulate) {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) {
      A s = y[ch];
      STRUCTALIGN_COMBINE_TERMS(s)
      y[ch] = s;
    }
  } else if (start == Start::kInit) {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) {
      A s = to_acc(init[ch]);
      STRUCTALIGN_COMBINE_TERMS(s)
      y[ch] = s;
    }
  } else {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) {
      A s = 0;
      STRUCTALIGN_COMBINE_TERMS(s)
      y[ch] = s;
    }
  }
#undef STRUCTALIGN_COMBINE_TERMS
}

// y = (0 | init | y) + sum_{k < n} a_k x_k, n <= kGroup.
template <typename T, typename A>
STRUCTALIGN_ALWAYS_INLINE void combine_impl(int n, Start start, const A* a, const T* const* x, const T* init, A* y,
                                            int64_t c) {
  switch (n) {
    case 0: return combine_k<0>(start, a, x, init, y, c);
    case 1: return combine_k<1>(start, a, x, init, y, c);
    case 2: return combine_k<2>(start, a, x, init, y, c);
    case 3: return combine_k<3>(start, a, x, init, y, c);
    default: return combine_k<kGroup>(start, a, x, init, y, c);
  }
}
template <typename T, typename A>
void combine(int n, Start start, const A* a, const T* const* x, const T* init, A* y, int64_t c) {
  combine_impl(n, start, a, x, init, y, c);
}
STRUCTALIGN_CPU_CLONES void combine(int n, Start start, const float* a, const float* const* x, const float* init,
                                    float* y, int64_t c) {
  combine_impl(n, start, a, x, init, y, c);
}

// out[k] = <g, x_k> for k < n, n <= kGroup.
template <int K, typename T, typename A>
STRUCTALIGN_ALWAYS_INLINE void dots_k(const T* g, const T* const* x, A* out, int64_t c) {
  const T* __restrict__ x0 = x[0];
  const T* __restrict__ x1 = K > 1 ? x[1] : x0;
  const T* __restrict__ x2 = K > 2 ? x[2] : x0;
  const T* __restrict__ x3 = K > 3 ? x[3] : x0;
  A d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
  for (int64_t ch = 0; ch < c; ++ch) {
    const A gv = to_acc(g[ch]);
    d0 += gv * to_acc(x0[ch]);
    if constexpr (K > 1) d1 += gv * to_acc(x1[ch]);
    if constexpr (K > 2) d2 += gv * to_acc(x2[ch]);
    if constexpr (K > 3) d3 += gv * to_acc(x3[ch]);
  }
  const A d[4] = {d0, d1, d2, d3};
  for (int k = 0; k < K; ++k) out[k] = d[k];
}

template <typename T, typename A>
STRUCTALIGN_ALWAYS_INLINE void dots_impl(int n, const T* g, const T* const* x, A* out, int64_t c) {
  switch (n) {
    case 1: return dots_k<1>(g, x, out, c);
    case 2: return dots_k<2>(g, x, out, c);
    case 3: return dots_k<3>(g, x, out, c);
    default: return dots_k<kGroup>(g, x, out, c);
  }
}
template <typename T, typename A>
void dots(int n, const T* g, const T* const* x, A* out, int64_t c) {
  dots_impl(n, g, x, out, c);
}
STRUCTALIGN_CPU_CLONES void dots(int n, const float* g, const float* const* x, float* out, int64_t c) {
  dots_impl(n, g, x, out, c);
}

// y = a x, stored in T.
template <typename T, typename A>
void scale_store(A a, const T* x, T* y, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) y[ch] = from_acc<T>(a * to_acc(x[ch]));
}
STRUCTALIGN_CPU_CLONES void scale_store(float a, const float* x, float* y, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) y[ch] = a * x[ch];
}

// y = init (or 0) + sum of the rows added, kGroup rows per pass over the channels.
template <typename T>
class RowSum {
 public:
  using A = acc_t<T>;
  RowSum(A* y, const T* init, int64_t c) : y_(y), init_(init), c_(c) {}
  void add(A a, const T* x) {
    a_[n_] = a;
    x_[n_] = x;
    if (++n_ == kGroup) flush();
  }
  void finish() {
    if (n_ > 0 || !started_) flush();
  }

 private:
  void flush() {
    combine(n_, started_ ? Start::kAccumulate : (init_ != nullptr ? Start::kInit : Start::kZero), a_, x_, init_, y_,
            c_);
    started_ = true;
    n_ = 0;
  }
  A* y_;
  const T* init_;
  int64_t c_;
  A a_[kGroup];
  const T* x_[kGroup];
  int n_ = 0;
  bool started_ = false;
};

// Copies an accumulator row into the output row unless they are the same memory (fp32 / fp64 accumulate in place).
template <typename T, typename A>
void store_row(const A* acc, T* out, int64_t c) {
  if constexpr (!std::is_same_v<T, A>) {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) out[ch] = from_acc<T>(acc[ch]);
  }
}

// The accumulator of an output row: the row itself when T is the accumulation type, else a scratch buffer.
template <typename T, typename A>
A* accumulator(T* out_row, std::vector<A>& scratch) {
  if constexpr (std::is_same_v<T, A>) {
    return out_row;
  } else {
    return scratch.data();
  }
}

// A row of an [B, N, C] tensor whose channels have unit stride (any batch / row strides).
struct Rows {
  int64_t stride_b, stride_n;
  template <typename T>
  const T* at(const T* base, int64_t b, int64_t i) const {
    return base + b * stride_b + i * stride_n;
  }
  static Rows of(const at::Tensor& t) {
    return {t.stride(0), t.stride(1)};
  }
};

// Softmax of every row of one logit set (Tensor[E], acc type) into attn (Tensor[E]).
template <typename A>
void graph_softmax(const A* logits, const int64_t* indptr, int64_t n, A* attn) {
  for (int64_t i = 0; i < n; ++i) {
    gmp::row_softmax(logits + indptr[i], indptr[i + 1] - indptr[i], attn + indptr[i]);
  }
}

// Faces per parallel_for task. Tasks own whole faces so that per-face softmaxes are computed inside the one
// parallel region (each extra region costs a thread hand-off, and a scheduler time slice on a loaded machine).
int64_t face_grain(int64_t n, int64_t c) {
  return std::max<int64_t>(1, row_grain(c) / std::max<int64_t>(n, 1));
}

// The softmax of face b: the shared one, or face b's computed into `scratch` when the logits are per face.
template <typename A>
const A* face_attn(const A* logits, const A* shared_attn, bool per_face, int64_t b, const int64_t* indptr, int64_t n,
                   int64_t e, std::vector<A>& scratch) {
  if (!per_face) return shared_attn;
  graph_softmax(logits + b * e, indptr, n, scratch.data());
  return scratch.data();
}

// The transposed graph: node j's incoming edges are in_edges[in_ptr[j] .. in_ptr[j + 1]); edge_row[e] is e's row.
struct Transposed {
  const int64_t* in_ptr;
  const int64_t* in_edges;
  const int64_t* edge_row;
};

// Face b's rows out_i = sum_e A_e v_e (+ bias) for i in [0, N), written through `out` rows (unit channel stride).
// attn: the face's softmax weights [E]; scratch: C accumulators when T is not the accumulation type.
template <typename T>
void aggregate_face(const T* h_self, Rows hs, const T* h_nbr, Rows hn, const acc_t<T>* attn, const int64_t* indptr,
                    const int64_t* indices, const T* bias, T* out, Rows os, int64_t b, int64_t n, int64_t c,
                    std::vector<acc_t<T>>& scratch) {
  for (int64_t i = 0; i < n; ++i) {
    T* o = out + b * os.stride_b + i * os.stride_n;
    auto* acc = accumulator(o, scratch);
    RowSum<T> sum(acc, bias, c);
    for (int64_t e = indptr[i]; e < indptr[i + 1]; ++e) {
      const int64_t j = indices[e];
      sum.add(attn[e], j == i ? hs.at(h_self, b, i) : hn.at(h_nbr, b, j));
    }
    sum.finish();
    store_row(acc, o, c);
  }
}

// Face b's share of the aggregation's backward for the upstream gradient g (rows through `go`): grad_h_self and
// grad_h_nbr rows (through `gs`, either pointer null when not wanted), and d loss / d logit_e of the face into
// grad_logits[E] (null when not wanted). grad h_nbr is a gather over the transposed graph: no two rows race.
template <typename T>
void aggregate_face_backward(const T* grad_out, Rows go, const T* h_self, Rows hs, const T* h_nbr, Rows hn,
                             const acc_t<T>* attn, const int64_t* indptr, const int64_t* indices, Transposed tg,
                             T* grad_h_self, T* grad_h_nbr, Rows gs, acc_t<T>* grad_logits, int64_t b, int64_t n,
                             int64_t c, std::vector<acc_t<T>>& scratch) {
  using A = acc_t<T>;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t row = indptr[k], row_end = indptr[k + 1];
    const T* g = go.at(grad_out, b, k);
    if (grad_h_self != nullptr) {
      A a_self = 0;
      for (int64_t f = row; f < row_end; ++f) a_self += indices[f] == k ? attn[f] : A(0);
      scale_store(a_self, g, grad_h_self + b * gs.stride_b + k * gs.stride_n, c);
    }
    if (grad_logits != nullptr) {
      // d_f = <g_k, v_f> for the row's edges (kGroup at a time), kept in grad_logits until the row's weighted sum
      // is known.
      for (int64_t f0 = row; f0 < row_end; f0 += kGroup) {
        const int cnt = static_cast<int>(std::min<int64_t>(kGroup, row_end - f0));
        const T* v[kGroup];
        for (int q = 0; q < cnt; ++q) {
          const int64_t j = indices[f0 + q];
          v[q] = j == k ? hs.at(h_self, b, k) : hn.at(h_nbr, b, j);
        }
        dots(cnt, g, v, grad_logits + f0, c);
      }
      A weighted = 0;
      for (int64_t f = row; f < row_end; ++f) weighted += attn[f] * grad_logits[f];
      for (int64_t f = row; f < row_end; ++f) grad_logits[f] = gmp::softmax_backward(attn[f], grad_logits[f], weighted);
    }
    if (grad_h_nbr != nullptr) {
      T* gn = grad_h_nbr + b * gs.stride_b + k * gs.stride_n;
      A* acc = accumulator(gn, scratch);
      RowSum<T> sum(acc, static_cast<const T*>(nullptr), c);
      for (int64_t t = tg.in_ptr[k]; t < tg.in_ptr[k + 1]; ++t) {
        const int64_t f = tg.in_edges[t], i = tg.edge_row[f];
        if (i != k) sum.add(attn[f], go.at(grad_out, b, i));  // the self loop reads h_self, not h_nbr
      }
      sum.finish();
      store_row(acc, gn, c);
    }
  }
}

}  // namespace

}  // namespace structalign
