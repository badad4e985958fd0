// Host-side argument checks and output bookkeeping of graph_message_passing shared by the CPU and CUDA
// implementations. The checks read metadata only (shapes, dtypes, devices); each backend checks the graph's values
// itself (the CPU on the host, CUDA in the kernels, without a host synchronisation).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace structalign {

// The graph arguments of both ops: CSR rows (indptr [N + 1], indices [E]), the transposed graph (in_ptr [N + 1],
// in_edges [E], edge_row [E]; node j's incoming edges are in_edges[in_ptr[j] .. in_ptr[j + 1]), ascending, and
// edge_row[e] is the row of edge e), and bounds on the row length (max_deg) and the in-degree (max_in_deg).
struct GraphArgs {
  const at::Tensor& indptr;
  const at::Tensor& indices;
  const at::Tensor& in_ptr;
  const at::Tensor& in_edges;
  const at::Tensor& edge_row;
  int64_t max_deg;
  int64_t max_in_deg;
};

// Checks h_self / h_nbr (Tensor[B, N, C]), logits (Tensor[E] or Tensor[B, E]), the graph and bias (Tensor[C] or
// none) against each other; `op` names the op in the errors, which also name the argument.
void check_graph_message_passing_args(const char* op, const at::Tensor& h_self, const at::Tensor& h_nbr,
                                      const at::Tensor& logits, const GraphArgs& graph,
                                      const c10::optional<at::Tensor>& bias);

// grad_out of the backward: h_self's shape, dtype and device.
void check_graph_message_passing_grad_out(const at::Tensor& grad_out, const at::Tensor& h_self);

// The backward's outputs. The constructor allocates grad_h_self / grad_h_nbr (h_self's shape and dtype) and
// grad_logits_faces (Tensor[B, E] in the accumulation dtype) where output_mask asks for them; the kernels fill them
// and the implementation sets grad_bias (Tensor[C], h_self's dtype), or `zero()` fills everything for an empty
// problem. `result` sums the logits' gradient over faces for shared logits and returns the schema's four tensors,
// masked-off ones as empty [0] tensors.
struct GraphBackwardGrads {
  GraphBackwardGrads(const at::Tensor& h_self, const at::Tensor& logits, std::array<bool, 4> output_mask);
  void zero();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result(const at::Tensor& logits) const;
  // Batch and row strides of grad_h_self / grad_h_nbr (the wanted ones share them; 0 when neither is wanted).
  int64_t grad_stride_b() const;
  int64_t grad_stride_n() const;

  bool need_h_self, need_h_nbr, need_logits, need_bias;
  int64_t channels;
  at::TensorOptions options;  // h_self's
  at::Tensor grad_h_self, grad_h_nbr, grad_logits_faces, grad_bias;
};

}  // namespace structalign
