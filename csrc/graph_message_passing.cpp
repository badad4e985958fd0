// Schema of graph_message_passing and its fused backward (implementations: csrc/cpu/, csrc/cuda/), and the
// host-side argument checks both implementations share.
//
// graph_message_passing: out_i = sum_{e in row i} A_e v_e (+ bias), A = softmax of the logits within each CSR row,
//   v_e = h_self_i for the self loop (indices[e] == i), h_nbr_j for a neighbour j = indices[e].
//   h_self, h_nbr: Tensor[B, N, C] (fp16 / bf16 / fp32 / fp64, unit channel stride read in place, else copied);
//   logits: Tensor[E] shared by all faces or Tensor[B, E] per face, any float dtype; bias: Tensor[C] or none.
//   Computed in the accumulation dtype (float64 for float64 features, float32 otherwise; logits cast to it).
//   The transposed graph and the degree bounds are used by the backward and checked by each op that reads them.
// graph_message_passing_backward: (grad_h_self, grad_h_nbr, grad_logits, grad_bias) for the outputs output_mask
//   selects, the others empty [0] tensors. grad_logits has the logits' shape and dtype (summed over faces for shared
//   logits); grad_bias has h_self's dtype. The softmax is recomputed from the logits.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "graph_message_passing.h"

namespace structalign {

void check_graph_message_passing_args(const char* op, const at::Tensor& h_self, const at::Tensor& h_nbr,
                                      const at::Tensor& logits, const GraphArgs& graph,
                                      const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(h_self.dim() == 3, op, ": h_self must have shape [B, N, C], got ", h_self.sizes());
  TORCH_CHECK(h_nbr.sizes() == h_self.sizes(), op, ": h_nbr must match h_self's shape ", h_self.sizes(), ", got ",
              h_nbr.sizes());
  TORCH_CHECK(is_float_type(h_self.scalar_type()), op, ": h_self must be float16, bfloat16, float32 or float64, got ",
              h_self.scalar_type());
  TORCH_CHECK(h_nbr.scalar_type() == h_self.scalar_type(), op, ": h_nbr has dtype ", h_nbr.scalar_type(),
              " but h_self has ", h_self.scalar_type());
  const int64_t b = h_self.size(0), n = h_self.size(1), c = h_self.size(2), e = graph.indices.numel();
  check_index_tensor(op, "indptr", graph.indptr, n + 1, "N + 1");
  check_index_tensor(op, "indices", graph.indices);
  check_index_tensor(op, "in_ptr", graph.in_ptr, n + 1, "N + 1");
  check_index_tensor(op, "in_edges", graph.in_edges, e, "E");
  check_index_tensor(op, "edge_row", graph.edge_row, e, "E");
  check_int32_size(op, "the number of edges E", e);
  check_int32_size(op, "the number of nodes N", n);
  check_int32_size(op, "max_deg", graph.max_deg);
  check_int32_size(op, "max_in_deg", graph.max_in_deg);
  TORCH_CHECK(is_float_type(logits.scalar_type()), op, ": logits must be a floating tensor, got ",
              logits.scalar_type());
  TORCH_CHECK((logits.dim() == 1 && logits.size(0) == e) ||
                  (logits.dim() == 2 && logits.size(0) == b && logits.size(1) == e),
              op, ": logits must have shape [", e, "] (shared) or [", b, ", ", e, "] (per face), got ",
              logits.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c, op, ": bias must have shape [", c, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == h_self.scalar_type(), op, ": bias has dtype ", bias->scalar_type(),
                " but h_self has ", h_self.scalar_type());
    check_same_device(op, "h_self", h_self, {{"bias", &*bias}});
  }
  check_same_device(op, "h_self", h_self,
                    {{"h_nbr", &h_nbr},
                     {"logits", &logits},
                     {"indptr", &graph.indptr},
                     {"indices", &graph.indices},
                     {"in_ptr", &graph.in_ptr},
                     {"in_edges", &graph.in_edges},
                     {"edge_row", &graph.edge_row}});
}

void check_graph_message_passing_grad_out(const at::Tensor& grad_out, const at::Tensor& h_self) {
  const char* op = "graph_message_passing_backward";
  TORCH_CHECK(grad_out.sizes() == h_self.sizes(), op, ": grad_out must have shape ", h_self.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == h_self.scalar_type(), op, ": grad_out has dtype ", grad_out.scalar_type(),
              " but h_self has ", h_self.scalar_type());
  check_same_device(op, "h_self", h_self, {{"grad_out", &grad_out}});
}

GraphBackwardGrads::GraphBackwardGrads(const at::Tensor& h_self, const at::Tensor& logits,
                                       std::array<bool, 4> output_mask)
    : need_h_self(output_mask[0]), need_h_nbr(output_mask[1]), need_logits(output_mask[2]),
      need_bias(output_mask[3]), channels(h_self.size(2)), options(h_self.options()) {
  const auto empty = [&] { return at::empty({0}, h_self.options()); };
  const int64_t b = h_self.size(0), e = logits.size(-1);
  grad_h_self = need_h_self ? at::empty(h_self.sizes(), h_self.options()) : empty();
  grad_h_nbr = need_h_nbr ? at::empty(h_self.sizes(), h_self.options()) : empty();
  grad_logits_faces =
      need_logits ? at::empty({b, e}, logits.options().dtype(acc_scalar_type(h_self.scalar_type()))) : at::Tensor();
  grad_bias = need_bias ? at::Tensor() : empty();
}

void GraphBackwardGrads::zero() {
  if (need_h_self) grad_h_self.zero_();
  if (need_h_nbr) grad_h_nbr.zero_();
  if (need_logits) grad_logits_faces.zero_();
  if (need_bias) grad_bias = at::zeros({channels}, options);
}

int64_t GraphBackwardGrads::grad_stride_b() const {
  TORCH_INTERNAL_ASSERT(!(need_h_self && need_h_nbr) || grad_h_self.strides() == grad_h_nbr.strides(),
                        "graph_message_passing_backward: grad_h_self and grad_h_nbr must share their strides");
  return need_h_self ? grad_h_self.stride(0) : need_h_nbr ? grad_h_nbr.stride(0) : 0;
}

int64_t GraphBackwardGrads::grad_stride_n() const {
  return need_h_self ? grad_h_self.stride(1) : need_h_nbr ? grad_h_nbr.stride(1) : 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> GraphBackwardGrads::result(const at::Tensor& logits) const {
  TORCH_INTERNAL_ASSERT(grad_bias.defined(), "graph_message_passing_backward: grad_bias was not computed");
  at::Tensor grad_logits = at::empty({0}, logits.options());
  if (need_logits) {
    grad_logits = (logits.dim() == 2 ? grad_logits_faces : grad_logits_faces.sum(0)).to(logits.scalar_type());
  }
  return {grad_h_self, grad_h_nbr, grad_logits, grad_bias};
}

}  // namespace structalign

TORCH_LIBRARY_FRAGMENT(structalign, m) {
  m.def(
      "graph_message_passing(Tensor h_self, Tensor h_nbr, Tensor logits, Tensor indptr, Tensor indices, "
      "Tensor in_ptr, Tensor in_edges, Tensor edge_row, Tensor? bias, int max_deg, int max_in_deg) -> Tensor");
  // Fused backward as its own op (so torch.compile and opcheck see it).
  m.def(
      "graph_message_passing_backward(Tensor grad_out, Tensor h_self, Tensor h_nbr, Tensor logits, Tensor indptr, "
      "Tensor indices, Tensor in_ptr, Tensor in_edges, Tensor edge_row, int max_deg, int max_in_deg, "
      "bool[4] output_mask) -> (Tensor grad_h_self, Tensor grad_h_nbr, Tensor grad_logits, Tensor grad_bias)");
}
