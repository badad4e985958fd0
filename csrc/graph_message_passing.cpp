// Schema of graph_message_passing and its fused backward (implementations: csrc/cpu/, csrc/cuda/), and the
// host-side argument checks both implementations share.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "graph_message_passing.h"

namespace structalign {

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

void check_graph_message_passing_args(const at::Tensor& h_self, const at::Tensor& h_nbr, const at::Tensor& logits,
                                      const at::Tensor& indptr, const at::Tensor& indices,
                                      const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(h_self.dim() == 3, "graph_message_passing: h_self must have shape [B, N, C], got ", h_self.sizes());
  TORCH_CHECK(h_nbr.sizes() == h_self.sizes(), "graph_message_passing: h_nbr must match h_self's shape ",
              h_self.sizes(), ", got ", h_nbr.sizes());
  TORCH_CHECK(is_float_type(h_self.scalar_type()),
              "graph_message_passing: h_self must be float16, bfloat16, float32 or float64, got ",
              h_self.scalar_type());
  TORCH_CHECK(h_nbr.scalar_type() == h_self.scalar_type(), "graph_message_passing: h_nbr has dtype ",
              h_nbr.scalar_type(), " but h_self has ", h_self.scalar_type());
  TORCH_CHECK(indptr.dim() == 1 && indptr.scalar_type() == at::kLong,
              "graph_message_passing: indptr must be a 1-D int64 tensor, got ", indptr.scalar_type(), " of shape ",
              indptr.sizes());
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong,
              "graph_message_passing: indices must be a 1-D int64 tensor, got ", indices.scalar_type(), " of shape ",
              indices.sizes());
  const int64_t b = h_self.size(0), n = h_self.size(1), c = h_self.size(2), e = indices.numel();
  TORCH_CHECK(indptr.numel() == n + 1, "graph_message_passing: indptr must have N + 1 = ", n + 1,
              " entries for N = ", n, " nodes, got ", indptr.numel());
  TORCH_CHECK(is_float_type(logits.scalar_type()), "graph_message_passing: logits must be a floating tensor, got ",
              logits.scalar_type());
  TORCH_CHECK((logits.dim() == 1 && logits.size(0) == e) || (logits.dim() == 2 && logits.size(0) == b &&
                                                               logits.size(1) == e),
              "graph_message_passing: logits must have shape [", e, "] (shared) or [", b, ", ", e,
              "] (per face), got ", logits.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c, "graph_message_passing: bias must have shape [", c,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == h_self.scalar_type(), "graph_message_passing: bias has dtype ",
                bias->scalar_type(), " but h_self has ", h_self.scalar_type());
    TORCH_CHECK(bias->device() == h_self.device(), "graph_message_passing: bias is on ", bias->device(),
                " but h_self is on ", h_self.device());
  }
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"h_nbr", &h_nbr}, {"logits", &logits}, {"indptr", &indptr}, {"indices", &indices}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->device() == h_self.device(), "graph_message_passing: ", name, " is on ", t->device(),
                " but h_self is on ", h_self.device());
  }
}

void check_graph_message_passing_backward_args(const at::Tensor& grad_out, const at::Tensor& h_self,
                                               const at::Tensor& h_nbr, const at::Tensor& logits,
                                               const at::Tensor& indptr, const at::Tensor& indices) {
  check_graph_message_passing_args(h_self, h_nbr, logits, indptr, indices, c10::nullopt);
  TORCH_CHECK(grad_out.sizes() == h_self.sizes(), "graph_message_passing_backward: grad_out must have shape ",
              h_self.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == h_self.scalar_type(), "graph_message_passing_backward: grad_out has dtype ",
              grad_out.scalar_type(), " but h_self has ", h_self.scalar_type());
  TORCH_CHECK(grad_out.device() == h_self.device(), "graph_message_passing_backward: grad_out is on ",
              grad_out.device(), " but h_self is on ", h_self.device());
}

at::ScalarType graph_acc_type(const at::Tensor& h_self) {
  return h_self.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

GraphBackwardGrads::GraphBackwardGrads(const at::Tensor& grad_out, const at::Tensor& h_self, const at::Tensor& logits,
                                       std::array<bool, 4> output_mask)
    : need_h_self(output_mask[0]), need_h_nbr(output_mask[1]), need_logits(output_mask[2]) {
  const auto empty = [&] { return at::empty({0}, h_self.options()); };
  const int64_t b = h_self.size(0), e = logits.size(-1);
  grad_h_self = need_h_self ? at::empty(h_self.sizes(), h_self.options()) : empty();
  grad_h_nbr = need_h_nbr ? at::empty(h_self.sizes(), h_self.options()) : empty();
  grad_logits_faces = need_logits ? at::empty({b, e}, logits.options().dtype(graph_acc_type(h_self))) : at::Tensor();
  grad_bias = output_mask[3] ? grad_out.sum({0, 1}, false, graph_acc_type(h_self)).to(h_self.scalar_type()) : empty();
}

void GraphBackwardGrads::zero() {
  if (need_h_self) grad_h_self.zero_();
  if (need_h_nbr) grad_h_nbr.zero_();
  if (need_logits) grad_logits_faces.zero_();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> GraphBackwardGrads::result(const at::Tensor& logits) const {
  at::Tensor grad_logits = at::empty({0}, logits.options());
  if (need_logits) {
    grad_logits = (logits.dim() == 2 ? grad_logits_faces : grad_logits_faces.sum(0)).to(logits.scalar_type());
  }
  return {grad_h_self, grad_h_nbr, grad_logits, grad_bias};
}

at::Tensor channels_contiguous(const at::Tensor& h) {
  return (h.stride(2) == 1 || h.size(2) <= 1) ? h : h.contiguous();
}

}  // namespace structalign

TORCH_LIBRARY_FRAGMENT(structalign, m) {
  m.def(
      "graph_message_passing(Tensor h_self, Tensor h_nbr, Tensor logits, Tensor indptr, Tensor indices, "
      "Tensor? bias) -> Tensor");
  // Fused backward as its own op (so torch.compile and opcheck see it). output_mask selects which of
  // (grad_h_self, grad_h_nbr, grad_logits, grad_bias) are computed; the others come back as empty tensors.
  m.def(
      "graph_message_passing_backward(Tensor grad_out, Tensor h_self, Tensor h_nbr, Tensor logits, Tensor indptr, "
      "Tensor indices, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}
