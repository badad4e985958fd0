// CPU kernels of graph_conv (schema: csrc/graph_conv.cpp). The matrix product is the caller's; everything after it
// runs here in at most two passes over the rows each way.
// Forward, per face (parallel): the softmax-weighted aggregation of the two halves of h (read in place) plus bias
// into y, and, for BatchNorm with the batch's statistics, the face's per-channel mean and sum of squared deviations
// from y in one pass while its rows are in cache, in double. The faces' statistics are merged in a fixed order
// (Chan et al.'s pairwise update: deterministic, no E[y^2] - E[y]^2 cancellation). Epilogue, per row:
// out = relu?(scale * y + shift) (+ residual); it runs inside the face loop when the statistics are known in advance
// (none or given), else as a second pass.
// Backward: a reduction pass for BatchNorm's per-channel sums (sum of grad z and of grad z * x_hat, z the
// pre-activation), then per face (parallel) the prologue writes grad y for the face's rows into a cache-resident
// buffer, and the aggregation's backward gathers from it into both halves of grad_h and the logits' gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/graph_aggregation.h"
#include "graph_conv.h"
#include "graph_conv_math.h"

namespace structalign {

namespace {

// ---- channel loops of the epilogue and prologue over one row (math: graph_conv_math.h) -------------------------

// out = act(scale * y + shift) (+ res).
template <typename T, typename A>
void epilogue_row(const T* y, const A* scale, const A* shift, bool relu, const T* res, T* out, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) {
    out[ch] = from_acc<T>(gconv::epilogue(to_acc(y[ch]), scale[ch], shift[ch], relu,
                                          res != nullptr ? to_acc(res[ch]) : A(0)));
  }
}
STRUCTALIGN_CPU_CLONES void epilogue_row(const float* y, const float* scale, const float* shift, bool relu,
                                         const float* res, float* out, int64_t c) {
  if (res != nullptr) {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) out[ch] = gconv::epilogue(y[ch], scale[ch], shift[ch], relu, res[ch]);
  } else {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) out[ch] = gconv::epilogue(y[ch], scale[ch], shift[ch], relu, 0.0f);
  }
}

// sum_gz += grad z, sum_gzx += grad z * (y - mean) for one row.
template <typename T, typename A>
void bn_sums_row(const T* g, const T* y, const A* scale, const A* shift, const A* mean, bool relu, A* sum_gz,
                 A* sum_gzx, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) {
    const A yv = to_acc(y[ch]);
    const A gz = gconv::grad_z(to_acc(g[ch]), yv, scale[ch], shift[ch], relu);
    sum_gz[ch] += gz;
    sum_gzx[ch] += gz * (yv - mean[ch]);
  }
}
STRUCTALIGN_CPU_CLONES void bn_sums_row(const float* g, const float* y, const float* scale, const float* shift,
                                        const float* mean, bool relu, float* sum_gz, float* sum_gzx, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) {
    const float gz = gconv::grad_z(g[ch], y[ch], scale[ch], shift[ch], relu);
    sum_gz[ch] += gz;
    sum_gzx[ch] += gz * (y[ch] - mean[ch]);
  }
}

// The prologue for one row: grad y stored in T (what the aggregation's backward reads), added to bias_sum.
template <typename T, typename A>
void prologue_row(const T* g, const T* y, const A* scale, const A* shift, const A* mean, const A* k0, const A* ky,
                  bool relu, T* gy, A* bias_sum, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) {
    const T stored = from_acc<T>(
        gconv::prologue(to_acc(g[ch]), to_acc(y[ch]), scale[ch], shift[ch], mean[ch], k0[ch], ky[ch], relu));
    gy[ch] = stored;
    bias_sum[ch] += to_acc(stored);
  }
}
STRUCTALIGN_CPU_CLONES void prologue_row(const float* g, const float* y, const float* scale, const float* shift,
                                         const float* mean, const float* k0, const float* ky, bool relu, float* gy,
                                         float* bias_sum, int64_t c) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) {
    gy[ch] = gconv::prologue(g[ch], y[ch], scale[ch], shift[ch], mean[ch], k0[ch], ky[ch], relu);
    bias_sum[ch] += gy[ch];
  }
}

// The batch statistics accumulate in double, as ATen's CPU BatchNorm does (at::acc_type<float, false>).
using StatT = double;

// Per-face statistics of y's rows [0, N): mean and the sum of squared deviations from it, per channel, in one pass
// over the rows shifted by the face's first row (in double, the shift leaves no cancellation to speak of).
template <typename T>
void face_moments(const T* y, int64_t n, int64_t c, StatT* mean, StatT* m2) {
  std::fill(mean, mean + c, StatT(0));
  std::fill(m2, m2 + c, StatT(0));
  for (int64_t i = 1; i < n; ++i) {
    const T* row = y + i * c;
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) {
      const StatT d = static_cast<StatT>(to_acc(row[ch])) - static_cast<StatT>(to_acc(y[ch]));
      mean[ch] += d;
      m2[ch] += d * d;
    }
  }
  const StatT inv = StatT(1) / static_cast<StatT>(n);
  for (int64_t ch = 0; ch < c; ++ch) {
    const StatT s1 = mean[ch];
    mean[ch] = static_cast<StatT>(to_acc(y[ch])) + s1 * inv;
    m2[ch] = std::max(m2[ch] - s1 * s1 * inv, StatT(0));
  }
}

// Merges the faces' (mean, M2) over N rows each, in face order, into the batch's mean and biased variance.
template <typename A>
void merge_moments(const StatT* face_stats, int64_t b_size, int64_t n, int64_t c, A* mean_out, A* var_out) {
  std::vector<StatT> mean(c, StatT(0)), m2(c, StatT(0));
  for (int64_t b = 0; b < b_size; ++b) {
    const StatT* fm = face_stats + b * 2 * c;
    const StatT* fm2 = fm + c;
    const StatT count = static_cast<StatT>(b * n), total = static_cast<StatT>((b + 1) * n);
    const StatT w = static_cast<StatT>(n) / total;
    for (int64_t ch = 0; ch < c; ++ch) {
      const StatT delta = fm[ch] - mean[ch];
      mean[ch] += delta * w;
      m2[ch] += fm2[ch] + delta * delta * count * w;
    }
  }
  const StatT inv = StatT(1) / static_cast<StatT>(b_size * n);
  for (int64_t ch = 0; ch < c; ++ch) {
    mean_out[ch] = static_cast<A>(mean[ch]);
    var_out[ch] = static_cast<A>(m2[ch] * inv);
  }
}

// Sums of [B, K] per-face partials over the faces, in face order (deterministic whatever the threading).
template <typename A>
void sum_faces(const A* partial, int64_t b_size, int64_t k, A* out) {
  std::fill(out, out + k, A(0));
  for (int64_t b = 0; b < b_size; ++b) {
    for (int64_t x = 0; x < k; ++x) out[x] += partial[b * k + x];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_conv_cpu(
    const at::Tensor& h_in, const at::Tensor& logits_in, const at::Tensor& indptr_in, const at::Tensor& indices_in,
    const at::Tensor& in_ptr, const at::Tensor& in_edges, const at::Tensor& edge_row,
    const c10::optional<at::Tensor>& bias_in, const c10::optional<at::Tensor>& norm_weight,
    const c10::optional<at::Tensor>& norm_bias, const c10::optional<at::Tensor>& mean_in,
    const c10::optional<at::Tensor>& var_in, const c10::optional<at::Tensor>& residual_in, int64_t norm, double eps,
    bool relu, int64_t max_deg, int64_t max_in_deg) {
  const char* op = "graph_conv";
  check_graph_conv_args(op, h_in, logits_in, {indptr_in, indices_in, in_ptr, in_edges, edge_row, max_deg, max_in_deg},
                        bias_in, norm_weight, norm_bias, mean_in, var_in, residual_in, norm, eps);
  TORCH_INTERNAL_ASSERT(h_in.device().is_cpu());
  const int64_t b = h_in.size(0), n = h_in.size(1), c = h_in.size(2) / 2;
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  check_rows(op, indptr, indices, n, max_deg);
  const at::ScalarType acc_type = acc_scalar_type(h_in.scalar_type());
  const at::TensorOptions acc = h_in.options().dtype(acc_type);
  const bool keep_y = norm != kNormNone || relu;
  at::Tensor out = at::empty({b, n, c}, h_in.options());
  at::Tensor y = keep_y ? at::empty({b, n, c}, h_in.options()) : at::empty({0}, h_in.options());
  at::Tensor batch_mean = at::empty({norm == kNormBatch ? c : 0}, acc);
  at::Tensor batch_var = at::empty({norm == kNormBatch ? c : 0}, acc);
  if (out.numel() == 0) return {out, y, batch_mean, batch_var};
  const auto halves = graph_conv_halves(h_in);
  const at::Tensor &h_self = halves.first, &h_nbr = halves.second;
  const at::Tensor logits = logits_in.to(acc_type).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const at::Tensor residual = residual_in.has_value() ? residual_in->contiguous() : at::Tensor();
  const bool per_face = logits.dim() == 2;
  const int64_t e = indices.numel();
  at::Tensor shared_attn = at::empty({per_face ? 0 : e}, acc);
  at::Tensor face_stats = at::empty({norm == kNormBatch ? b : 0, 2, c}, acc.dtype(at::kDouble));
  // Statistics known before the aggregation (none / given): the epilogue runs on each face's rows right away.
  ChannelAffine affine;
  if (norm != kNormBatch) {
    affine = channel_affine(norm, norm == kNormGiven ? *mean_in : at::Tensor(),
                            norm == kNormGiven ? *var_in : at::Tensor(), norm_weight, norm_bias, eps, c, acc);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_self.scalar_type(), "graph_conv_cpu", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* hs = h_self.data_ptr<T>();
    const T* hn = h_nbr.data_ptr<T>();
    const T* bias_ptr = bias.defined() ? bias.data_ptr<T>() : nullptr;
    const T* res = residual.defined() ? residual.data_ptr<T>() : nullptr;
    T* out_ptr = out.data_ptr<T>();
    T* agg = keep_y ? y.data_ptr<T>() : out_ptr;  // where the aggregation writes
    const A* lg = logits.data_ptr<A>();
    const int64_t* ptr = indptr.data_ptr<int64_t>();
    const int64_t* idx = indices.data_ptr<int64_t>();
    if (!per_face) graph_softmax(lg, ptr, n, shared_attn.data_ptr<A>());
    const A* scale = norm != kNormBatch ? affine.scale.data_ptr<A>() : nullptr;
    const A* shift = norm != kNormBatch ? affine.shift.data_ptr<A>() : nullptr;
    StatT* stats = norm == kNormBatch ? face_stats.data_ptr<StatT>() : nullptr;
    at::parallel_for(0, b, face_grain(n, c), [&](int64_t b_begin, int64_t b_end) {
      std::vector<A> scratch(std::is_same_v<T, A> ? 0 : c), attn_scratch(per_face ? e : 0);
      for (int64_t f = b_begin; f < b_end; ++f) {
        const A* attn = face_attn(lg, shared_attn.data_ptr<A>(), per_face, f, ptr, n, e, attn_scratch);
        aggregate_face(hs, Rows::of(h_self), hn, Rows::of(h_nbr), attn, ptr, idx, bias_ptr, agg, Rows{n * c, c}, f,
                       n, c, scratch);
        T* face_y = agg + f * n * c;
        if (stats != nullptr) {
          face_moments(face_y, n, c, stats + f * 2 * c, stats + f * 2 * c + c);
        } else if (keep_y || res != nullptr) {
          for (int64_t i = 0; i < n; ++i) {
            const int64_t r = (f * n + i) * c;
            epilogue_row(face_y + i * c, scale, shift, relu, res == nullptr ? nullptr : res + r, out_ptr + r, c);
          }
        }
      }
    });
    if (norm == kNormBatch) {
      merge_moments(stats, b, n, c, batch_mean.data_ptr<A>(), batch_var.data_ptr<A>());
      affine = channel_affine(norm, batch_mean, batch_var, norm_weight, norm_bias, eps, c, acc);
      const A* sc = affine.scale.data_ptr<A>();
      const A* sh = affine.shift.data_ptr<A>();
      const T* yp = y.data_ptr<T>();
      at::parallel_for(0, b * n, row_grain(c), [&](int64_t r_begin, int64_t r_end) {
        for (int64_t r = r_begin; r < r_end; ++r) {
          epilogue_row(yp + r * c, sc, sh, relu, res == nullptr ? nullptr : res + r * c, out_ptr + r * c, c);
        }
      });
    }
  });
  return {out, y, batch_mean, batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_conv_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& h_in, const at::Tensor& y_in, const at::Tensor& logits_in,
    const at::Tensor& indptr_in, const at::Tensor& indices_in, const at::Tensor& in_ptr_in,
    const at::Tensor& in_edges_in, const at::Tensor& edge_row_in, const c10::optional<at::Tensor>& norm_weight,
    const c10::optional<at::Tensor>& norm_bias, const c10::optional<at::Tensor>& mean_in,
    const c10::optional<at::Tensor>& var_in, int64_t norm, double eps, bool relu, int64_t max_deg,
    int64_t max_in_deg, std::array<bool, 5> output_mask) {
  const char* op = "graph_conv_backward";
  check_graph_conv_args(op, h_in, logits_in,
                        {indptr_in, indices_in, in_ptr_in, in_edges_in, edge_row_in, max_deg, max_in_deg},
                        c10::nullopt, norm_weight, norm_bias, mean_in, var_in, c10::nullopt, norm, eps);
  check_graph_conv_grad_args(op, grad_out_in, h_in, y_in, mean_in, var_in, norm, relu);
  TORCH_INTERNAL_ASSERT(h_in.device().is_cpu());
  const int64_t b = h_in.size(0), n = h_in.size(1), c = h_in.size(2) / 2, e = indices_in.numel();
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor in_ptr = in_ptr_in.contiguous(), in_edges = in_edges_in.contiguous();
  const at::Tensor edge_row = edge_row_in.contiguous();
  check_rows(op, indptr, indices, n, max_deg);
  check_transposed(op, indptr, indices, in_ptr, in_edges, edge_row, n, max_in_deg);
  GraphConvGrads grads(h_in, output_mask);
  const at::ScalarType acc_type = acc_scalar_type(h_in.scalar_type());
  const at::TensorOptions acc = h_in.options().dtype(acc_type);
  const bool norm_sums = norm == kNormBatch || grads.need_norm_weight || grads.need_norm_bias;
  if (b * n * c == 0) {
    grads.grad_logits = at::zeros(logits_in.sizes(), acc);
    grads.grad_bias_sum = at::zeros({c}, acc);
    grads.sum_grad_z = at::zeros({c}, acc);
    grads.sum_grad_z_xhat = at::zeros({c}, acc);
    return grads.result(h_in, logits_in, norm_weight, norm_bias);
  }
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor y = y_in.defined() && y_in.numel() ? y_in.contiguous() : grad_out;  // y unused when empty
  const auto halves = graph_conv_halves(h_in);
  const at::Tensor &h_self = halves.first, &h_nbr = halves.second;
  const at::Tensor logits = logits_in.to(acc_type).contiguous();
  const at::Tensor mean = norm != kNormNone ? mean_in->to(acc_type).contiguous() : at::zeros({c}, acc);
  const ChannelAffine affine = channel_affine(norm, mean, norm != kNormNone ? *var_in : at::Tensor(), norm_weight,
                                              norm_bias, eps, c, acc);
  const bool per_face = logits.dim() == 2;
  at::Tensor shared_attn = at::empty({per_face ? 0 : e}, acc);
  at::Tensor norm_partial = at::empty({norm_sums ? b : 0, 2 * c}, acc);  // per face: sum grad z, grad z (y - mean)
  at::Tensor bias_partial = at::empty({b, c}, acc);                       // per face: sum grad y
  at::Tensor k0 = at::zeros({c}, acc), ky = at::zeros({c}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_self.scalar_type(), "graph_conv_backward_cpu", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* g = grad_out.data_ptr<T>();
    const T* yp = y.data_ptr<T>();
    const A* sc = affine.scale.data_ptr<A>();
    const A* sh = affine.shift.data_ptr<A>();
    const A* mu = mean.data_ptr<A>();
    const bool act = relu;
    if (norm_sums) {
      at::parallel_for(0, b, face_grain(n, c), [&](int64_t b_begin, int64_t b_end) {
        for (int64_t f = b_begin; f < b_end; ++f) {
          A* sum_gz = norm_partial.data_ptr<A>() + f * 2 * c;
          std::fill(sum_gz, sum_gz + 2 * c, A(0));
          for (int64_t i = 0; i < n; ++i) {
            const int64_t r = (f * n + i) * c;
            bn_sums_row(g + r, yp + r, sc, sh, mu, act, sum_gz, sum_gz + c, c);
          }
        }
      });
      at::Tensor sums = at::empty({2 * c}, acc);
      sum_faces(norm_partial.data_ptr<A>(), b, 2 * c, sums.data_ptr<A>());
      grads.sum_grad_z = sums.narrow(0, 0, c);
      grads.sum_grad_z_xhat = sums.narrow(0, c, c) * affine.invstd;  // sum grad z * x_hat
      if (norm == kNormBatch) {
        const A inv_rows = A(1) / static_cast<A>(b * n);
        k0.copy_(affine.scale * grads.sum_grad_z * inv_rows);
        ky.copy_(affine.scale * affine.invstd * grads.sum_grad_z_xhat * inv_rows);
      }
    }
    const A* k0p = k0.data_ptr<A>();
    const A* kyp = ky.data_ptr<A>();
    const A* lg = logits.data_ptr<A>();
    const int64_t* ptr = indptr.data_ptr<int64_t>();
    const int64_t* idx = indices.data_ptr<int64_t>();
    const Transposed tg{in_ptr.data_ptr<int64_t>(), in_edges.data_ptr<int64_t>(), edge_row.data_ptr<int64_t>()};
    if (!per_face) graph_softmax(lg, ptr, n, shared_attn.data_ptr<A>());
    T* gh = grads.need_h ? grads.grad_h.data_ptr<T>() : nullptr;
    // Per-face gradients of the logits, summed over the faces afterwards when the logits are shared.
    at::Tensor logits_faces = at::empty({grads.need_logits ? b : 0, e}, acc);
    A* gl = grads.need_logits ? logits_faces.data_ptr<A>() : nullptr;
    const bool aggregate = gh != nullptr || gl != nullptr;
    at::parallel_for(0, b, face_grain(n, c), [&](int64_t b_begin, int64_t b_end) {
      std::vector<A> scratch(std::is_same_v<T, A> ? 0 : c), attn_scratch(per_face ? e : 0);
      std::vector<T> face_grad(n * c);  // grad y of the face's rows
      for (int64_t f = b_begin; f < b_end; ++f) {
        A* bias_sum = bias_partial.data_ptr<A>() + f * c;
        std::fill(bias_sum, bias_sum + c, A(0));
        for (int64_t i = 0; i < n; ++i) {
          const int64_t r = (f * n + i) * c;
          prologue_row(g + r, yp + r, sc, sh, mu, k0p, kyp, act, face_grad.data() + i * c, bias_sum, c);
        }
        if (!aggregate) continue;
        const A* attn = face_attn(lg, shared_attn.data_ptr<A>(), per_face, f, ptr, n, e, attn_scratch);
        aggregate_face_backward(face_grad.data(), Rows{0, c}, h_self.data_ptr<T>(), Rows::of(h_self),
                                h_nbr.data_ptr<T>(), Rows::of(h_nbr), attn, ptr, idx, tg, gh,
                                gh == nullptr ? nullptr : gh + c, Rows{n * 2 * c, 2 * c},
                                gl == nullptr ? nullptr : gl + f * e, f, n, c, scratch);
      }
    });
    grads.grad_bias_sum = at::empty({c}, acc);
    sum_faces(bias_partial.data_ptr<A>(), b, c, grads.grad_bias_sum.data_ptr<A>());
    if (grads.need_logits && !per_face) {
      grads.grad_logits = at::empty({e}, acc);
      sum_faces(gl, b, e, grads.grad_logits.data_ptr<A>());
    } else if (grads.need_logits) {
      grads.grad_logits = logits_faces;
    }
  });
  return grads.result(h_in, logits_in, norm_weight, norm_bias);
}

}  // namespace

}  // namespace structalign

TORCH_LIBRARY_IMPL(structalign, CPU, m) {
  m.impl("graph_conv", &structalign::graph_conv_cpu);
  m.impl("graph_conv_backward", &structalign::graph_conv_backward_cpu);
}
