// Host-side input checks of graph_message_passing shared by the CPU and CUDA implementations. They read only
// metadata (shapes, dtypes, devices), never tensor values, so they cost nothing on the GPU.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace structalign {

// Checks h_self / h_nbr (Tensor[B, N, C]), logits (Tensor[E] or Tensor[B, E]), indptr (int64 Tensor[N + 1]),
// indices (int64 Tensor[E]) and bias (Tensor[C] or undefined) against each other; errors name the argument.
void check_graph_message_passing_args(const at::Tensor& h_self, const at::Tensor& h_nbr, const at::Tensor& logits,
                                      const at::Tensor& indptr, const at::Tensor& indices,
                                      const c10::optional<at::Tensor>& bias);

// The same for the backward, plus grad_out (Tensor[B, N, C], h_self's dtype and device).
void check_graph_message_passing_backward_args(const at::Tensor& grad_out, const at::Tensor& h_self,
                                               const at::Tensor& h_nbr, const at::Tensor& logits,
                                               const at::Tensor& indptr, const at::Tensor& indices);

// Accumulation dtype: float64 for float64 features, float32 otherwise.
at::ScalarType graph_acc_type(const at::Tensor& h_self);

// The backward's outputs, shared by the CPU and CUDA kernels. The constructor allocates what output_mask asks for
// (masked-off gradients are empty [0] tensors) and computes grad_bias; the kernels fill grad_h_self, grad_h_nbr and
// grad_logits_faces (Tensor[B, E] in the accumulation dtype), or `zero()` fills them for an empty problem;
// `result` sums the logits' gradient over faces for shared logits and returns the schema's four tensors.
struct GraphBackwardGrads {
  GraphBackwardGrads(const at::Tensor& grad_out, const at::Tensor& h_self, const at::Tensor& logits,
                     std::array<bool, 4> output_mask);
  bool any_kernel_output() const { return need_h_self || need_h_nbr || need_logits; }
  void zero();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result(const at::Tensor& logits) const;

  bool need_h_self, need_h_nbr, need_logits;
  at::Tensor grad_h_self, grad_h_nbr, grad_logits_faces, grad_bias;
};

// h with unit stride over channels (a view when it already has one), so kernels read rows through strides.
at::Tensor channels_contiguous(const at::Tensor& h);

}  // namespace structalign
