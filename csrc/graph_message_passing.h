// Host-side input checks of graph_message_passing shared by the CPU and CUDA implementations. They read only
// metadata (shapes, dtypes, devices), never tensor values, so they cost nothing on the GPU.
#pragma once

#include <ATen/ATen.h>

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

// The logits' gradient from the per-face accumulation faces (Tensor[B, E], fp32/fp64): as is for per-face logits,
// summed over the batch for shared ones, in the logits' dtype; an empty [0] tensor when it is not needed.
at::Tensor grad_logits_from_faces(const at::Tensor& faces, const at::Tensor& logits, bool needed);

// h with unit stride over channels (a view when it already has one), so kernels read rows through strides.
at::Tensor channels_contiguous(const at::Tensor& h);

}  // namespace structalign
