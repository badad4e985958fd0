// CPU kernels of graph_message_passing: the forward (row softmax + weighted aggregation + bias in one pass per
// output row) and the fused backward (grad h_self, a race-free gather for grad h_nbr over the transposed graph,
// grad logits through the softmax Jacobian, grad bias). Nothing of size N x N is built.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "graph_message_passing.h"
#include "graph_message_passing_math.h"

namespace structalign {

namespace {

using gmp::Acc;

// Output rows (one face, one node; about deg x C multiply-adds each) per parallel_for task: enough channels per
// task that small problems run inline instead of paying for a thread hand-off.
int64_t row_grain(int64_t c) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1));
}

// Checks the CSR values (they come from Python unchecked when the op is called directly).
void check_csr_values(const at::Tensor& indptr, const at::Tensor& indices, int64_t n) {
  const int64_t* ptr = indptr.data_ptr<int64_t>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t e = indices.numel();
  TORCH_CHECK(ptr[0] == 0 && ptr[n] == e, "graph_message_passing: indptr must start at 0 and end at E = ", e,
              ", got ", ptr[0], "..", ptr[n]);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ptr[i + 1] > ptr[i], "graph_message_passing: node ", i,
                " has no entry in indptr/indices (every row needs at least its self loop)");
  }
  for (int64_t k = 0; k < e; ++k) {
    TORCH_CHECK(idx[k] >= 0 && idx[k] < n, "graph_message_passing: indices[", k, "] = ", idx[k],
                " is outside [0, ", n, ")");
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The fp32 loops are compiled for AVX-512, AVX2 and the baseline ISA (the extension is built without -march); the
// dynamic loader picks the widest the CPU supports.
#define STRUCTALIGN_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define STRUCTALIGN_SIMD_CLONES
#endif

// Channel loops over one row: y = a x (+ bias), y += a x, <x, y>, and y = a x stored in T. Generic versions go
// through the accumulation type; the fp32 overloads are the multi-ISA hot path.
template <typename T, typename A>
void scale_into(A a, const T* x, const T* bias, A* y, int64_t c) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) y[ch] = a * gmp::load(x[ch]) + gmp::load(bias[ch]);
  } else {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) y[ch] = a * gmp::load(x[ch]);
  }
}
template <typename T, typename A>
void axpy(A a, const T* x, A* y, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) y[ch] += a * gmp::load(x[ch]);
}
template <typename T>
typename Acc<T>::type dot(const T* x, const T* y, int64_t c) {
  typename Acc<T>::type d = 0;
#pragma omp simd reduction(+ : d)
  for (int64_t ch = 0; ch < c; ++ch) d += gmp::load(x[ch]) * gmp::load(y[ch]);
  return d;
}
template <typename T, typename A>
void scale_store(A a, const T* x, T* y, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) y[ch] = gmp::store<T>(a * gmp::load(x[ch]));
}

STRUCTALIGN_SIMD_CLONES void scale_into(float a, const float* x, const float* bias, float* y, int64_t c) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) y[ch] = a * x[ch] + bias[ch];
  } else {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) y[ch] = a * x[ch];
  }
}
STRUCTALIGN_SIMD_CLONES void axpy(float a, const float* x, float* y, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) y[ch] += a * x[ch];
}
STRUCTALIGN_SIMD_CLONES float dot(const float* x, const float* y, int64_t c) {
  float d = 0;
#pragma omp simd reduction(+ : d)
  for (int64_t ch = 0; ch < c; ++ch) d += x[ch] * y[ch];
  return d;
}
STRUCTALIGN_SIMD_CLONES void scale_store(float a, const float* x, float* y, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) y[ch] = a * x[ch];
}

// Copies an accumulator row into the output row unless they are the same memory (fp32 / fp64 accumulate in place).
template <typename T, typename A>
void store_row(const A* acc, T* out, int64_t c) {
  if constexpr (!std::is_same_v<T, A>) {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) out[ch] = gmp::store<T>(acc[ch]);
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

// A row of an [B, N, C] tensor whose channels have unit stride.
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
void forward_kernel(const T* h_self, Rows hs, const T* h_nbr, Rows hn, const typename Acc<T>::type* logits,
                    const typename Acc<T>::type* shared_attn, bool per_face, const int64_t* indptr,
                    const int64_t* indices, const T* bias, T* out, int64_t b_size, int64_t n, int64_t c, int64_t e) {
  using A = typename Acc<T>::type;
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

// The transposed graph: for node j, in_edges[in_ptr[j]..in_ptr[j + 1]) are the edges e with indices[e] == j.
struct Transposed {
  std::vector<int64_t> in_ptr, in_edges, edge_row;
};

Transposed transpose(const int64_t* indptr, const int64_t* indices, int64_t n, int64_t e) {
  Transposed t{std::vector<int64_t>(n + 1, 0), std::vector<int64_t>(e), std::vector<int64_t>(e)};
  for (int64_t k = 0; k < e; ++k) ++t.in_ptr[indices[k] + 1];
  for (int64_t j = 0; j < n; ++j) t.in_ptr[j + 1] += t.in_ptr[j];
  std::vector<int64_t> fill(t.in_ptr.begin(), t.in_ptr.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = indptr[i]; k < indptr[i + 1]; ++k) {
      t.edge_row[k] = i;
      t.in_edges[fill[indices[k]]++] = k;
    }
  }
  return t;
}

template <typename T>
void backward_kernel(const T* grad_out, Rows go, const T* h_self, Rows hs, const T* h_nbr, Rows hn,
                     const typename Acc<T>::type* logits, const typename Acc<T>::type* shared_attn, bool per_face,
                     const int64_t* indptr, const int64_t* indices, const Transposed& tg, T* grad_h_self,
                     T* grad_h_nbr, typename Acc<T>::type* grad_logits, int64_t b_size, int64_t n, int64_t c,
                     int64_t e) {
  using A = typename Acc<T>::type;
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
                                     const at::Tensor& indices_in, const c10::optional<at::Tensor>& bias_in) {
  check_graph_message_passing_args(h_self_in, h_nbr_in, logits_in, indptr_in, indices_in, bias_in);
  TORCH_INTERNAL_ASSERT(h_self_in.device().is_cpu());
  const int64_t b = h_self_in.size(0), n = h_self_in.size(1), c = h_self_in.size(2);
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  check_csr_values(indptr, indices, n);
  at::Tensor out = at::empty({b, n, c}, h_self_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor h_self = channels_contiguous(h_self_in), h_nbr = channels_contiguous(h_nbr_in);
  const at::Tensor logits = logits_in.to(graph_acc_type(h_self)).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const bool per_face = logits.dim() == 2;
  const int64_t e = indices.numel();
  // Shared logits: one softmax for all faces, here; per-face logits: each face's inside the parallel loop.
  at::Tensor shared_attn = at::empty({per_face ? 0 : e}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_self.scalar_type(), "graph_message_passing_cpu", [&] {
    using A = typename Acc<scalar_t>::type;
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
    std::array<bool, 4> output_mask) {
  check_graph_message_passing_backward_args(grad_out_in, h_self_in, h_nbr_in, logits_in, indptr_in, indices_in);
  TORCH_INTERNAL_ASSERT(h_self_in.device().is_cpu());
  const int64_t b = h_self_in.size(0), n = h_self_in.size(1), c = h_self_in.size(2), e = indices_in.numel();
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  check_csr_values(indptr, indices, n);
  GraphBackwardGrads grads(grad_out_in, h_self_in, logits_in, output_mask);
  const at::ScalarType acc = graph_acc_type(h_self_in);
  const bool per_face = logits_in.dim() == 2;
  if (b * n * c > 0 && grads.any_kernel_output()) {
    const at::Tensor grad_out = channels_contiguous(grad_out_in);
    const at::Tensor h_self = channels_contiguous(h_self_in), h_nbr = channels_contiguous(h_nbr_in);
    const at::Tensor logits = logits_in.to(acc).contiguous();
    at::Tensor shared_attn = at::empty({per_face ? 0 : e}, logits.options());
    const Transposed tg = transpose(indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), n, e);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_self.scalar_type(),
                                    "graph_message_passing_backward_cpu", [&] {
      using A = typename Acc<scalar_t>::type;
      if (!per_face) graph_softmax(logits.data_ptr<A>(), indptr.data_ptr<int64_t>(), n, shared_attn.data_ptr<A>());
      backward_kernel<scalar_t>(
          grad_out.data_ptr<scalar_t>(), Rows::of(grad_out), h_self.data_ptr<scalar_t>(), Rows::of(h_self),
          h_nbr.data_ptr<scalar_t>(), Rows::of(h_nbr), logits.data_ptr<A>(), shared_attn.data_ptr<A>(), per_face,
          indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), tg,
          grads.need_h_self ? grads.grad_h_self.data_ptr<scalar_t>() : nullptr,
          grads.need_h_nbr ? grads.grad_h_nbr.data_ptr<scalar_t>() : nullptr,
          grads.need_logits ? grads.grad_logits_faces.data_ptr<A>() : nullptr, b, n, c, e);
    });
  } else {
    grads.zero();
  }
  return grads.result(logits_in);
}

}  // namespace

}  // namespace structalign

TORCH_LIBRARY_IMPL(structalign, CPU, m) {
  m.impl("graph_message_passing", &structalign::graph_message_passing_cpu);
  m.impl("graph_message_passing_backward", &structalign::graph_message_passing_backward_cpu);
}
