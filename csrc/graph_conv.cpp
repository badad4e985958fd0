// Schema of graph_conv and its fused backward (implementations: csrc/cpu/, csrc/cuda/), and the host-side pieces
// both implementations share.
//
// graph_conv: one graph-convolution layer after its matrix product h = x @ [W_self | W_nbr] (Tensor[B, N, 2C]):
//   y = graph_message_passing(h[..., :C], h[..., C:], logits) + bias          (the halves read in place)
//   out = relu?(BatchNorm(y)) (+ residual)
//   norm (GraphConvNorm): 0 no BatchNorm, 1 BatchNorm with the batch's statistics over the B * N rows (mean, biased
//   var; as nn.BatchNorm1d in training), 2 BatchNorm with the given mean / var (nn.BatchNorm1d in evaluation).
//   norm_weight / norm_bias: BatchNorm's affine parameters (none: 1 / 0). Returns (out Tensor[B, N, C] in h's
//   dtype, y Tensor[B, N, C] (kept for the backward; empty [0] when neither a BatchNorm nor relu follows), mean and
//   var Tensor[C] in the accumulation dtype (the batch's statistics for norm 1, else empty [0])). The running
//   statistics are updated by the caller from mean / var (structalign/ops/graph_conv.py).
// graph_conv_backward: (grad_h Tensor[B, N, 2C], grad_logits, grad_bias, grad_norm_weight, grad_norm_bias) for the
//   outputs output_mask selects (others empty [0]) from grad_out (d loss / d out), the forward's y and the mean / var
//   it normalised with; the residual's gradient is grad_out itself and stays with the caller.
#include "graph_conv.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"

#include <tuple>
#include <vector>

namespace structalign {

void check_graph_conv_args(const char* op, const at::Tensor& h, const at::Tensor& logits, const GraphArgs& graph,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& norm_weight,
                           const c10::optional<at::Tensor>& norm_bias, const c10::optional<at::Tensor>& mean,
                           const c10::optional<at::Tensor>& var, const c10::optional<at::Tensor>& residual,
                           int64_t norm, double eps) {
  TORCH_CHECK(h.dim() == 3 && h.size(2) % 2 == 0, op, ": h must have shape [B, N, 2C], got ", h.sizes());
  TORCH_CHECK(norm == kNormNone || norm == kNormBatch || norm == kNormGiven, op,
              ": norm must be 0 (none), 1 (batch statistics) or 2 (given statistics), got ", norm);
  TORCH_CHECK(norm == kNormNone || eps > 0, op, ": eps must be positive, got ", eps);
  const int64_t b = h.size(0), n = h.size(1), c = h.size(2) / 2;
  const at::Tensor half = h.narrow(2, 0, c);
  check_graph_message_passing_args(op, half, half, logits, graph, bias);
  TORCH_CHECK(norm != kNormBatch || b * n > 1, op, ": BatchNorm with the batch's statistics needs more than one ",
              "row (B * N = ", b * n, ")");
  const auto check_channel = [&](const char* name, const c10::optional<at::Tensor>& t) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == c, op, ": ", name, " must have shape [", c, "], got ", t->sizes());
    TORCH_CHECK(is_float_type(t->scalar_type()), op, ": ", name, " must be a floating tensor, got ",
                t->scalar_type());
    check_same_device(op, "h", h, {{name, &*t}});
  };
  check_channel("norm_weight", norm_weight);
  check_channel("norm_bias", norm_bias);
  check_channel("mean", mean);
  check_channel("var", var);
  TORCH_CHECK(norm != kNormGiven || (mean.has_value() && var.has_value()), op,
              ": norm = 2 (given statistics) needs mean and var");
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == half.sizes(), op, ": residual must have shape ", half.sizes(), ", got ",
                residual->sizes());
    TORCH_CHECK(residual->scalar_type() == h.scalar_type(), op, ": residual has dtype ", residual->scalar_type(),
                " but h has ", h.scalar_type());
    check_same_device(op, "h", h, {{"residual", &*residual}});
  }
}

void check_graph_conv_grad_args(const char* op, const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& y,
                                const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& var,
                                int64_t norm, bool relu) {
  const at::IntArrayRef rows = h.sizes().slice(0, 2);
  const std::vector<int64_t> shape{rows[0], rows[1], h.size(2) / 2};
  for (const auto& [name, t, needed] : {std::tuple<const char*, const at::Tensor*, bool>{"grad_out", &grad_out, true},
                                        {"y", &y, norm != kNormNone || relu}}) {
    if (!needed) continue;
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", at::IntArrayRef(shape),
                ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == h.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                " but h has ", h.scalar_type());
    check_same_device(op, "h", h, {{name, t}});
  }
  TORCH_CHECK(norm == kNormNone || (mean.has_value() && var.has_value()), op,
              ": the backward of a normalisation needs the mean and var it used");
}

std::pair<at::Tensor, at::Tensor> graph_conv_halves(const at::Tensor& h_in) {
  const at::Tensor h = channels_contiguous(h_in);
  const int64_t c = h.size(2) / 2;
  return {h.narrow(2, 0, c), h.narrow(2, c, c)};
}

ChannelAffine channel_affine(int64_t norm, const at::Tensor& mean, const at::Tensor& var,
                             const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias,
                             double eps, int64_t c, const at::TensorOptions& acc) {
  if (norm == kNormNone) return {at::ones({c}, acc), at::zeros({c}, acc), at::ones({c}, acc)};
  const at::Tensor invstd = (var.to(acc) + eps).rsqrt();
  const at::Tensor scale = norm_weight.has_value() ? norm_weight->to(acc) * invstd : invstd;
  const at::Tensor shift = norm_bias.has_value() ? norm_bias->to(acc) - mean.to(acc) * scale : -mean.to(acc) * scale;
  return {scale.contiguous(), shift.contiguous(), invstd.contiguous()};
}

GraphConvGrads::GraphConvGrads(const at::Tensor& h, std::array<bool, 5> output_mask)
    : need_h(output_mask[0]), need_logits(output_mask[1]), need_bias(output_mask[2]),
      need_norm_weight(output_mask[3]), need_norm_bias(output_mask[4]) {
  grad_h = need_h ? (h.numel() == 0 ? at::zeros(h.sizes(), h.options()) : at::empty(h.sizes(), h.options()))
                  : at::empty({0}, h.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> GraphConvGrads::result(
    const at::Tensor& h, const at::Tensor& logits, const c10::optional<at::Tensor>& norm_weight,
    const c10::optional<at::Tensor>& norm_bias) const {
  const auto cast = [&](bool need, const at::Tensor& sum, at::ScalarType dtype) {
    if (!need) return at::empty({0}, h.options());
    TORCH_INTERNAL_ASSERT(sum.defined(), "graph_conv_backward: a requested gradient was not computed");
    return sum.to(dtype);
  };
  return {grad_h, cast(need_logits, grad_logits, logits.scalar_type()), cast(need_bias, grad_bias_sum, h.scalar_type()),
          cast(need_norm_weight, sum_grad_z_xhat, norm_weight ? norm_weight->scalar_type() : h.scalar_type()),
          cast(need_norm_bias, sum_grad_z, norm_bias ? norm_bias->scalar_type() : h.scalar_type())};
}

}  // namespace structalign

TORCH_LIBRARY_FRAGMENT(structalign, m) {
  m.def(
      "graph_conv(Tensor h, Tensor logits, Tensor indptr, Tensor indices, Tensor in_ptr, Tensor in_edges, "
      "Tensor edge_row, Tensor? bias, Tensor? norm_weight, Tensor? norm_bias, Tensor? mean, Tensor? var, "
      "Tensor? residual, int norm, float eps, bool relu, int max_deg, int max_in_deg) "
      "-> (Tensor out, Tensor y, Tensor batch_mean, Tensor batch_var)");
  m.def(
      "graph_conv_backward(Tensor grad_out, Tensor h, Tensor y, Tensor logits, Tensor indptr, Tensor indices, "
      "Tensor in_ptr, Tensor in_edges, Tensor edge_row, Tensor? norm_weight, Tensor? norm_bias, Tensor? mean, "
      "Tensor? var, int norm, float eps, bool relu, int max_deg, int max_in_deg, bool[5] output_mask) "
      "-> (Tensor grad_h, Tensor grad_logits, Tensor grad_bias, Tensor grad_norm_weight, Tensor grad_norm_bias)");
}
