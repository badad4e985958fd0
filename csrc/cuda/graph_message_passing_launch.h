// The CUDA launchers of graph_message_passing as building blocks for other ops (graph_conv): the caller has
// checked the arguments and set the device guard. Implemented in csrc/cuda/graph_message_passing.cu.
#pragma once

#include <ATen/ATen.h>

#include "graph_message_passing.h"

namespace structalign {

// out (Tensor[B, N, C], contiguous, allocated by the caller) = the aggregation of h_self / h_nbr (+ bias).
void graph_message_passing_forward_into(const at::Tensor& h_self, const at::Tensor& h_nbr, const at::Tensor& logits,
                                        const at::Tensor& indptr, const at::Tensor& indices,
                                        const c10::optional<at::Tensor>& bias, at::Tensor& out, int64_t max_deg);

// Fills `grads` (allocated by the caller, its gradient tensors possibly strided views with unit channel stride).
void graph_message_passing_backward_into(const at::Tensor& grad_out, const at::Tensor& h_self,
                                         const at::Tensor& h_nbr, const at::Tensor& logits, const GraphArgs& graph,
                                         GraphBackwardGrads& grads);

}  // namespace structalign
