// CPU kernels of graph_message_passing: the forward (row softmax + weighted aggregation + bias in one pass per
// output row) and the fused backward (grad h_self, a race-free gather for grad h_nbr over the transposed graph the
// caller passes, grad logits through the softmax Jacobian, grad bias). Nothing of size N x N is built.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common.h"
#include "graph_message_passing.h"
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

// Channel loops over one row: y = a x (+ bias), y += a x, <x, y>, and y = a x stored in T. Generic versions go
// through the accumulation type; the fp32 overloads are the multi-ISA hot path.
template <typename T, typename A>
void scale_into(A a, const T* x, const T* bias, A* y, int64_t c) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) y[ch] = a * to_acc(x[ch]) + to_acc(bias[ch]);
  } else {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) y[ch] = a * to_acc(x[ch]);
  }
}
template <typename T, typename A>
void axpy(A a, const T* x, A* y, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) y[ch] += a * to_acc(x[ch]);
}
template <typename T>
acc_t<T> dot(const T* x, const T* y, int64_t c) {
  acc_t<T> d = 0;
#pragma omp simd reduction(+ : d)
  for (int64_t ch = 0; ch < c; ++ch) d += to_acc(x[ch]) * to_acc(y[ch]);
  return d;
}
template <typename T, typename A>
void scale_store(A a, const T* x, T* y, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) y[ch] = from_acc<T>(a * to_acc(x[ch]));
}

STRUCTALIGN_CPU_CLONES void scale_into(float a, const float* x, const float* bias, float* y, int64_t c) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) y[ch] = a * x[ch] + bias[ch];
  } else {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) y[ch] = a * x[ch];
  }
}
STRUCTALIGN_CPU_CLONES void axpy(float a, const float* x, float* y, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) y[ch] += a * x[ch];
}
STRUCTALIGN_CPU_CLONES float dot(const float* x, const float* y, int64_t c) {
  float d = 0;
#pragma omp simd reduction(+ : d)
  for (int64_t ch = 0; ch < c; ++ch) d += x[ch] * y[ch];
  return d;
}
STRUCTALIGN_CPU_CLONES void scale_store(float a, const float* x, float* y, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) y[ch] = a * x[ch];
}

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

// out (Tensor[B, N, C]) row by row: out_i = sum_e A_e v_e (+ bias).
template <typename T>
void forward_kernel(const T* h_self, Rows hs, const T* h_nbr, Rows hn, const acc_t<T>* logits,
                    const acc_t<T>* shared_attn, bool per_face, const int64_t* indptr, const int64_t* indices,
                    const T* bias, T* out, int64_t b_size, int64_t n, int64_t c, int64_t e) {
  using A = acc_t<T>;
  at::parallel_for(0, b_size, face_grain(n, c), [&](int64_t b_begin, int64_t b_end) {
    std::vector<A> scratch(std::is_same_v<T, A> ? 0 : c), attn_scratch(per_face ? e : 0);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const A* attn = face_attn(logits, shared_attn, per_face, b, indptr, n, e, attn_scratch);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = indptr[i], deg = indptr[i + 1] - row;
        T* o = out + (b * n + i) * c;
        A* acc = accumulator(o, scratch);
        for (int64_t k = 0; k < deg; ++k) {
          const int64_t j = indices[row + k];
          const T* v = j == i ? hs.at(h_self, b, i) : hn.at(h_nbr, b, j);
          if (k == 0) {
            scale_into(attn[row + k], v, bias, acc, c);
          } else {
            axpy(attn[row + k], v, acc, c);
          }
        }
        store_row(acc, o, c);
      }
    }
  });
}

// The transposed graph: node j's incoming edges are in_edges[in_ptr[j] .. in_ptr[j + 1]); edge_row[e] is e's row.
struct Transposed {
  const int64_t* in_ptr;
  const int64_t* in_edges;
  const int64_t* edge_row;
};

template <typename T>
void backward_kernel(const T* grad_out, Rows go, const T* h_self, Rows hs, const T* h_nbr, Rows hn,
                     const acc_t<T>* logits, const acc_t<T>* shared_attn, bool per_face, const int64_t* indptr,
                     const int64_t* indices, Transposed tg, T* grad_h_self, T* grad_h_nbr, acc_t<T>* grad_logits,
                     int64_t b_size, int64_t n, int64_t c, int64_t e) {
  using A = acc_t<T>;
  at::parallel_for(0, b_size, face_grain(n, c), [&](int64_t b_begin, int64_t b_end) {
    std::vector<A> scratch(std::is_same_v<T, A> ? 0 : c), attn_scratch(per_face ? e : 0);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const A* a_b = face_attn(logits, shared_attn, per_face, b, indptr, n, e, attn_scratch);
      for (int64_t k = 0; k < n; ++k) {
        const int64_t r = b * n + k, row = indptr[k], row_end = indptr[k + 1];
        const T* g = go.at(grad_out, b, k);
        if (grad_h_self != nullptr) {
          A a_self = 0;
          for (int64_t f = row; f < row_end; ++f) a_self += indices[f] == k ? a_b[f] : A(0);
          scale_store(a_self, g, grad_h_self + r * c, c);
        }
        if (grad_logits != nullptr) {
          // d_f = <g_k, v_f> for the row's edges, kept in grad_logits until the row's weighted sum is known.
          A* gl = grad_logits + b * e;
          A weighted = 0;
          for (int64_t f = row; f < row_end; ++f) {
            const int64_t j = indices[f];
            gl[f] = dot(g, j == k ? hs.at(h_self, b, k) : hn.at(h_nbr, b, j), c);
            weighted += a_b[f] * gl[f];
          }
          for (int64_t f = row; f < row_end; ++f) gl[f] = gmp::softmax_backward(a_b[f], gl[f], weighted);
        }
        if (grad_h_nbr != nullptr) {
          T* gn = grad_h_nbr + r * c;
          A* acc = accumulator(gn, scratch);
          bool first = true;
          for (int64_t t = tg.in_ptr[k]; t < tg.in_ptr[k + 1]; ++t) {
            const int64_t f = tg.in_edges[t], i = tg.edge_row[f];
            if (i == k) continue;  // the self loop reads h_self, not h_nbr
            const T* gi = go.at(grad_out, b, i);
            if (first) {
              scale_into(a_b[f], gi, static_cast<const T*>(nullptr), acc, c);
            } else {
              axpy(a_b[f], gi, acc, c);
            }
            first = false;
          }
          if (first) {
            std::fill(acc, acc + c, A(0));
          }
          store_row(acc, gn, c);
        }
      }
    }
  });
}

at::Tensor graph_message_passing_cpu(const at::Tensor& h_self_in, const at::Tensor& h_nbr_in,
                                     const at::Tensor& logits_in, const at::Tensor& indptr_in,
                                     const at::Tensor& indices_in, const at::Tensor& in_ptr,
                                     const at::Tensor& in_edges, const at::Tensor& edge_row,
                                     const c10::optional<at::Tensor>& bias_in, int64_t max_deg, int64_t max_in_deg) {
  const char* op = "graph_message_passing";
  check_graph_message_passing_args(op, h_self_in, h_nbr_in, logits_in,
                                   {indptr_in, indices_in, in_ptr, in_edges, edge_row, max_deg, max_in_deg}, bias_in);
  TORCH_INTERNAL_ASSERT(h_self_in.device().is_cpu());
  const int64_t b = h_self_in.size(0), n = h_self_in.size(1), c = h_self_in.size(2);
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  check_rows(op, indptr, indices, n, max_deg);
  at::Tensor out = at::empty({b, n, c}, h_self_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor h_self = channels_contiguous(h_self_in), h_nbr = channels_contiguous(h_nbr_in);
  const at::Tensor logits = logits_in.to(acc_scalar_type(h_self.scalar_type())).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const bool per_face = logits.dim() == 2;
  const int64_t e = indices.numel();
  // Shared logits: one softmax for all faces, here; per-face logits: each face's inside the parallel loop.
  at::Tensor shared_attn = at::empty({per_face ? 0 : e}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_self.scalar_type(), "graph_message_passing_cpu", [&] {
    using A = acc_t<scalar_t>;
    if (!per_face) graph_softmax(logits.data_ptr<A>(), indptr.data_ptr<int64_t>(), n, shared_attn.data_ptr<A>());
    forward_kernel<scalar_t>(h_self.data_ptr<scalar_t>(), Rows::of(h_self), h_nbr.data_ptr<scalar_t>(),
                             Rows::of(h_nbr), logits.data_ptr<A>(), shared_attn.data_ptr<A>(), per_face,
                             indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(),
                             bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), b, n, c,
                             e);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_message_passing_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& h_self_in, const at::Tensor& h_nbr_in,
    const at::Tensor& logits_in, const at::Tensor& indptr_in, const at::Tensor& indices_in,
    const at::Tensor& in_ptr_in, const at::Tensor& in_edges_in, const at::Tensor& edge_row_in, int64_t max_deg,
    int64_t max_in_deg, std::array<bool, 4> output_mask) {
  const char* op = "graph_message_passing_backward";
  check_graph_message_passing_args(
      op, h_self_in, h_nbr_in, logits_in,
      {indptr_in, indices_in, in_ptr_in, in_edges_in, edge_row_in, max_deg, max_in_deg}, c10::nullopt);
  check_graph_message_passing_grad_out(grad_out_in, h_self_in);
  TORCH_INTERNAL_ASSERT(h_self_in.device().is_cpu());
  const int64_t b = h_self_in.size(0), n = h_self_in.size(1), c = h_self_in.size(2), e = indices_in.numel();
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor in_ptr = in_ptr_in.contiguous(), in_edges = in_edges_in.contiguous();
  const at::Tensor edge_row = edge_row_in.contiguous();
  check_rows(op, indptr, indices, n, max_deg);
  check_transposed(op, indptr, indices, in_ptr, in_edges, edge_row, n, max_in_deg);
  GraphBackwardGrads grads(h_self_in, logits_in, output_mask);
  const at::ScalarType acc = acc_scalar_type(h_self_in.scalar_type());
  const bool per_face = logits_in.dim() == 2;
  if (b * n * c == 0) {
    grads.zero();
    return grads.result(logits_in);
  }
  const at::Tensor grad_out = channels_contiguous(grad_out_in);
  if (grads.need_bias) grads.grad_bias = grad_out.sum({0, 1}, false, acc).to(h_self_in.scalar_type());
  if (grads.need_h_self || grads.need_h_nbr || grads.need_logits) {
    const at::Tensor h_self = channels_contiguous(h_self_in), h_nbr = channels_contiguous(h_nbr_in);
    const at::Tensor logits = logits_in.to(acc).contiguous();
    at::Tensor shared_attn = at::empty({per_face ? 0 : e}, logits.options());
    const Transposed tg{in_ptr.data_ptr<int64_t>(), in_edges.data_ptr<int64_t>(), edge_row.data_ptr<int64_t>()};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_self.scalar_type(),
                                    "graph_message_passing_backward_cpu", [&] {
      using A = acc_t<scalar_t>;
      if (!per_face) graph_softmax(logits.data_ptr<A>(), indptr.data_ptr<int64_t>(), n, shared_attn.data_ptr<A>());
      backward_kernel<scalar_t>(
          grad_out.data_ptr<scalar_t>(), Rows::of(grad_out), h_self.data_ptr<scalar_t>(), Rows::of(h_self),
          h_nbr.data_ptr<scalar_t>(), Rows::of(h_nbr), logits.data_ptr<A>(), shared_attn.data_ptr<A>(), per_face,
          indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), tg,
          grads.need_h_self ? grads.grad_h_self.data_ptr<scalar_t>() : nullptr,
          grads.need_h_nbr ? grads.grad_h_nbr.data_ptr<scalar_t>() : nullptr,
          grads.need_logits ? grads.grad_logits_faces.data_ptr<A>() : nullptr, b, n, c, e);
    });
  }
  return grads.result(logits_in);
}

}  // namespace

}  // namespace structalign

TORCH_LIBRARY_IMPL(structalign, CPU, m) {
  m.impl("graph_message_passing", &structalign::graph_message_passing_cpu);
  m.impl("graph_message_passing_backward", &structalign::graph_message_passing_backward_cpu);
}
