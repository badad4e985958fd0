// CUDA launchers of graph_conv (schema: csrc/graph_conv.cpp; kernels: graph_conv_kernels.cuh and the
// graph_message_passing kernels, reused through cuda/graph_message_passing_launch.h).
// Forward: the aggregation kernel writes y (bias included) from the two halves of h read in place; batch statistics
// are one Welford reduction over y (at::var_mean, the exact statistics BatchNorm's CUDA kernels compute); the
// epilogue kernel applies BatchNorm, relu and the residual. Backward: the sums kernel (BatchNorm's per-channel
// sums), the prologue kernel (grad y), then the aggregation's backward kernel writes both halves of grad_h in place
// (strided) with the logits' and the bias's gradients. No host synchronisation anywhere.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/graph_conv_kernels.cuh"
#include "cuda/graph_message_passing_launch.h"
#include "cuda/launch.h"
#include "graph_conv.h"

namespace structalign {

namespace {

template <typename S>
const acc_t<typename CudaType<S>::type>* acc_ptr(const at::Tensor& t) {
  return t.data_ptr<acc_t<typename CudaType<S>::type>>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_conv_cuda(
    const at::Tensor& h_in, const at::Tensor& logits, const at::Tensor& indptr, const at::Tensor& indices,
    const at::Tensor& in_ptr, const at::Tensor& in_edges, const at::Tensor& edge_row,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& norm_weight,
    const c10::optional<at::Tensor>& norm_bias, const c10::optional<at::Tensor>& mean_in,
    const c10::optional<at::Tensor>& var_in, const c10::optional<at::Tensor>& residual_in, int64_t norm, double eps,
    bool relu, int64_t max_deg, int64_t max_in_deg) {
  const char* op = "graph_conv";
  check_graph_conv_args(op, h_in, logits, {indptr, indices, in_ptr, in_edges, edge_row, max_deg, max_in_deg}, bias,
                        norm_weight, norm_bias, mean_in, var_in, residual_in, norm, eps);
  TORCH_INTERNAL_ASSERT(h_in.is_cuda());
  const c10::cuda::CUDAGuard guard(h_in.device());
  const int64_t b = h_in.size(0), n = h_in.size(1), c = h_in.size(2) / 2;
  const at::ScalarType acc_type = acc_scalar_type(h_in.scalar_type());
  const at::TensorOptions acc = h_in.options().dtype(acc_type);
  const bool keep_y = norm != kNormNone || relu;
  at::Tensor out = at::empty({b, n, c}, h_in.options());
  at::Tensor y = keep_y ? at::empty({b, n, c}, h_in.options()) : at::empty({0}, h_in.options());
  at::Tensor batch_mean = at::empty({norm == kNormBatch ? c : 0}, acc);
  at::Tensor batch_var = at::empty({norm == kNormBatch ? c : 0}, acc);
  if (out.numel() == 0) return {out, y, batch_mean, batch_var};
  const auto halves = graph_conv_halves(h_in);
  at::Tensor agg = keep_y ? y : out;
  graph_message_passing_forward_into(halves.first, halves.second, logits, indptr, indices, bias, agg, max_deg);
  if (!keep_y && !residual_in.has_value()) return {out, y, batch_mean, batch_var};
  at::Tensor mean = norm == kNormGiven ? *mean_in : batch_mean, var = norm == kNormGiven ? *var_in : batch_var;
  if (norm == kNormBatch) {
    const auto [v, m] = at::var_mean(y.view({b * n, c}).to(acc_type), {0}, /*correction=*/0, /*keepdim=*/false);
    batch_mean.copy_(m);
    batch_var.copy_(v);
  }
  const ChannelAffine affine = channel_affine(norm, mean, var, norm_weight, norm_bias, eps, c, acc);
  const at::Tensor residual = residual_in.has_value() ? residual_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_in.scalar_type(), "graph_conv_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    const gconv::EpilogueArgs<T> args{cuda_ptr<scalar_t>(agg), acc_ptr<scalar_t>(affine.scale),
                                      acc_ptr<scalar_t>(affine.shift),
                                      residual.defined() ? cuda_ptr<scalar_t>(residual) : nullptr,
                                      cuda_ptr<scalar_t>(out), b * n, c, relu};
    gconv::graph_conv_epilogue_kernel<T>
        <<<static_cast<unsigned int>(gconv::elementwise_blocks(b * n * c)), gconv::kThreads, 0,
           at::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, y, batch_mean, batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_conv_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& h_in, const at::Tensor& y_in, const at::Tensor& logits,
    const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& in_ptr, const at::Tensor& in_edges,
    const at::Tensor& edge_row, const c10::optional<at::Tensor>& norm_weight,
    const c10::optional<at::Tensor>& norm_bias, const c10::optional<at::Tensor>& mean_in,
    const c10::optional<at::Tensor>& var_in, int64_t norm, double eps, bool relu, int64_t max_deg,
    int64_t max_in_deg, std::array<bool, 5> output_mask) {
  const char* op = "graph_conv_backward";
  const GraphArgs graph{indptr, indices, in_ptr, in_edges, edge_row, max_deg, max_in_deg};
  check_graph_conv_args(op, h_in, logits, graph, c10::nullopt, norm_weight, norm_bias, mean_in, var_in,
                        c10::nullopt, norm, eps);
  check_graph_conv_grad_args(op, grad_out_in, h_in, y_in, mean_in, var_in, norm, relu);
  TORCH_INTERNAL_ASSERT(h_in.is_cuda());
  const c10::cuda::CUDAGuard guard(h_in.device());
  const int64_t b = h_in.size(0), n = h_in.size(1), c = h_in.size(2) / 2, rows = b * n;
  GraphConvGrads grads(h_in, output_mask);
  const at::ScalarType acc_type = acc_scalar_type(h_in.scalar_type());
  const at::TensorOptions acc = h_in.options().dtype(acc_type);
  if (rows * c == 0) {
    grads.grad_logits = at::zeros(logits.sizes(), acc);
    grads.grad_bias_sum = at::zeros({c}, acc);
    grads.sum_grad_z = at::zeros({c}, acc);
    grads.sum_grad_z_xhat = at::zeros({c}, acc);
    return grads.result(h_in, logits, norm_weight, norm_bias);
  }
  const at::Tensor grad_out = grad_out_in.contiguous();
  const bool has_y = norm != kNormNone || relu;
  const at::Tensor y = has_y ? y_in.contiguous() : grad_out;  // y is read only when it exists
  const at::Tensor mean = norm != kNormNone ? mean_in->to(acc_type).contiguous() : at::zeros({c}, acc);
  const ChannelAffine affine = channel_affine(norm, mean, norm != kNormNone ? *var_in : at::Tensor(), norm_weight,
                                              norm_bias, eps, c, acc);
  at::Tensor k0 = at::zeros({c}, acc), ky = at::zeros({c}, acc);
  at::Tensor grad_y = grad_out;  // no normalisation, no relu: grad y is grad out
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_in.scalar_type(), "graph_conv_backward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    const auto stream = at::cuda::getCurrentCUDAStream();
    if (norm == kNormBatch || grads.need_norm_weight || grads.need_norm_bias) {
      at::Tensor partial = at::empty({gconv::sums_blocks(rows), 2 * c}, acc);
      const gconv::SumsArgs<T> args{cuda_ptr<scalar_t>(grad_out), cuda_ptr<scalar_t>(y),
                                    acc_ptr<scalar_t>(affine.scale), acc_ptr<scalar_t>(affine.shift),
                                    acc_ptr<scalar_t>(mean), partial.data_ptr<acc_t<T>>(), rows, c,
                                    gconv::kRowsPerBlock, relu};
      gconv::graph_conv_sums_kernel<T>
          <<<static_cast<unsigned int>(partial.size(0)), gconv::kThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor sums = partial.sum(0);
      grads.sum_grad_z = sums.narrow(0, 0, c);
      grads.sum_grad_z_xhat = sums.narrow(0, c, c) * affine.invstd;
      if (norm == kNormBatch) {
        k0 = affine.scale * grads.sum_grad_z / static_cast<double>(rows);
        ky = affine.scale * affine.invstd * grads.sum_grad_z_xhat / static_cast<double>(rows);
      }
    }
    if (has_y) {
      grad_y = at::empty({b, n, c}, h_in.options());
      const gconv::PrologueArgs<T> args{cuda_ptr<scalar_t>(grad_out), cuda_ptr<scalar_t>(y),
                                        acc_ptr<scalar_t>(affine.scale), acc_ptr<scalar_t>(affine.shift),
                                        acc_ptr<scalar_t>(mean), acc_ptr<scalar_t>(k0), acc_ptr<scalar_t>(ky),
                                        cuda_ptr<scalar_t>(grad_y), rows, c, relu};
      gconv::graph_conv_prologue_kernel<T>
          <<<static_cast<unsigned int>(gconv::elementwise_blocks(rows * c)), gconv::kThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  // The aggregation's backward writes straight into the two halves of grad_h (row stride 2C); grad bias is its
  // per-face sums of grad y.
  const auto halves = graph_conv_halves(h_in);
  GraphBackwardGrads agg(halves.first, logits, {false, false, grads.need_logits, true});
  if (grads.need_h) {
    agg.need_h_self = agg.need_h_nbr = true;
    agg.grad_h_self = grads.grad_h.narrow(2, 0, c);
    agg.grad_h_nbr = grads.grad_h.narrow(2, c, c);
  }
  graph_message_passing_backward_into(grad_y, halves.first, halves.second, logits, graph, agg);
  if (grads.need_logits) {
    grads.grad_logits = logits.dim() == 2 ? agg.grad_logits_faces : agg.grad_logits_faces.sum(0);
  }
  grads.grad_bias_sum = agg.grad_bias.to(acc_type);
  return grads.result(h_in, logits, norm_weight, norm_bias);
}

}  // namespace

}  // namespace structalign

TORCH_LIBRARY_IMPL(structalign, CUDA, m) {
  m.impl("graph_conv", &structalign::graph_conv_cuda);
  m.impl("graph_conv_backward", &structalign::graph_conv_backward_cuda);
}
