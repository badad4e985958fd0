// Host-side argument checks and per-channel constants of graph_conv shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

#include "graph_message_passing.h"

namespace structalign {

// What follows the aggregation (the `norm` argument of both ops): nothing, BatchNorm with the batch's statistics
// (training), or BatchNorm with given statistics (running statistics, evaluation).
enum GraphConvNorm : int64_t { kNormNone = 0, kNormBatch = 1, kNormGiven = 2 };

// Checks h (Tensor[B, N, 2C]) against the graph, logits, bias (Tensor[C], h's dtype), the normalisation's affine
// parameters and statistics (Tensor[C] each, any float dtype; mean / var required by kNormGiven) and residual
// (Tensor[B, N, C], h's dtype); `op` names the op in the errors.
void check_graph_conv_args(const char* op, const at::Tensor& h, const at::Tensor& logits, const GraphArgs& graph,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& norm_weight,
                           const c10::optional<at::Tensor>& norm_bias, const c10::optional<at::Tensor>& mean,
                           const c10::optional<at::Tensor>& var, const c10::optional<at::Tensor>& residual,
                           int64_t norm, double eps);

// The backward's own arguments: grad_out (Tensor[B, N, C], h's dtype), the forward's y (the same, or empty [0] when
// neither a normalisation nor relu follows the aggregation) and the statistics it normalised with (any norm but 0).
void check_graph_conv_grad_args(const char* op, const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& y,
                                const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& var,
                                int64_t norm, bool relu);

// The self and neighbour halves of h (Tensor[B, N, 2C]) as views with unit channel stride (a copy only when h's
// channels are strided).
std::pair<at::Tensor, at::Tensor> graph_conv_halves(const at::Tensor& h);

// out = act(scale * y + shift) (+ residual) per channel: scale = weight / sqrt(var + eps), shift = bias - mean *
// scale for a normalisation (weight 1 and bias 0 when absent), scale 1 and shift 0 without one; also invstd =
// 1 / sqrt(var + eps) (ones without a normalisation). Tensor[C] each, in the accumulation dtype `acc`.
struct ChannelAffine {
  at::Tensor scale, shift, invstd;
};
ChannelAffine channel_affine(int64_t norm, const at::Tensor& mean, const at::Tensor& var,
                             const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias,
                             double eps, int64_t c, const at::TensorOptions& acc);

// The backward's outputs: grad_h allocated where output_mask asks for it (h's shape and dtype, zero-filled for an
// empty problem); the implementation fills it and sets grad_logits and the per-channel sums (accumulation dtype),
// which `result` casts to the inputs' dtypes, masked-off gradients as empty [0] tensors.
struct GraphConvGrads {
  GraphConvGrads(const at::Tensor& h, std::array<bool, 5> output_mask);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> result(
      const at::Tensor& h, const at::Tensor& logits, const c10::optional<at::Tensor>& norm_weight,
      const c10::optional<at::Tensor>& norm_bias) const;

  bool need_h, need_logits, need_bias, need_norm_weight, need_norm_bias;
  at::Tensor grad_h;
  at::Tensor grad_logits;                    // the logits' shape, accumulation dtype (summed over faces if shared)
  at::Tensor grad_bias_sum;                  // [C], accumulation dtype: sum of grad y over the rows
  at::Tensor sum_grad_z, sum_grad_z_xhat;    // [C], accumulation dtype: grad of the normalisation's bias, weight
};

}  // namespace structalign
