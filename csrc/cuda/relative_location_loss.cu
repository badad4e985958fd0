// CUDA implementation of relative_location_loss and its backward (schemas in csrc/relative_location_loss.cpp): checks,
// allocation and launch around the torch-free kernels of relative_location_loss_kernels.cuh. The per-face partial
// sums are added by at::sum (a fixed order, so the loss is deterministic), without a host synchronisation.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/cuda_type.h"
#include "cuda/relative_location_loss_kernels.cuh"
#include "relative_location_loss.h"

namespace structalign {

namespace {

// Forward (grad_out undefined) or the backward of reduction none. Returns (loss, grad_pred) as the schema describes.
std::tuple<at::Tensor, at::Tensor> run_cuda(const at::Tensor& grad_out, const at::Tensor& pred,
                                            const at::Tensor& target, const at::Tensor& anchor_in,
                                            const at::Tensor& indptr_in, const at::Tensor& member_in,
                                            const at::Tensor& weight_in,
                                            const c10::optional<at::Tensor>& landmark_weight, int64_t criterion,
                                            double omega1, double omega2, double epsilon, int64_t reduction,
                                            bool need_grad) {
  TORCH_INTERNAL_ASSERT(pred.device().is_cuda());
  const c10::cuda::CUDAGuard guard(pred.device());
  const int64_t b = pred.size(0), n = pred.size(1), r = anchor_in.numel();
  const at::ScalarType acc = relative_location_loss_acc_type(pred);
  const auto opts = pred.options().dtype(acc);
  const bool backward = grad_out.defined();
  const bool none = reduction == rll::kNone;
  at::Tensor loss_none = none && !backward ? at::empty({b, r, 2}, opts) : at::Tensor();
  at::Tensor grad_pred = need_grad ? at::zeros({b, n, 2}, opts) : at::empty({0}, opts);
  at::Tensor partial = at::zeros({b, 2}, opts);
  if (b > 0 && r > 0) {
    const at::Tensor anchor = anchor_in.contiguous(), indptr = indptr_in.contiguous();
    const at::Tensor member = member_in.contiguous(), weight = weight_in.contiguous();
    at::Tensor lw = landmark_weight.has_value() ? landmark_weight->to(acc).contiguous() : at::Tensor();
    at::Tensor go = backward ? grad_out.to(acc).contiguous() : at::Tensor();
    const double count = static_cast<double>(b) * r * 2;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "relative_location_loss_cuda", [&] {
      using T = typename CudaType<scalar_t>::type;
      using A = at::opmath_type<scalar_t>;
      const A grad_scale = (!backward && reduction == rll::kMean && !lw.defined()) ? static_cast<A>(1.0 / count)
                                                                                    : A(1);
      const rll::KernelArgs<T, A> args{
          reinterpret_cast<const T*>(pred.data_ptr<scalar_t>()),
          reinterpret_cast<const T*>(target.data_ptr<scalar_t>()),
          lw.defined() ? lw.data_ptr<A>() : nullptr, anchor.data_ptr<int64_t>(), indptr.data_ptr<int64_t>(),
          member.data_ptr<int64_t>(), weight.data_ptr<float>(), backward ? go.data_ptr<A>() : nullptr,
          loss_none.defined() ? loss_none.data_ptr<A>() : nullptr, need_grad ? grad_pred.data_ptr<A>() : nullptr,
          partial.data_ptr<A>(), b, n, r, pred.stride(0), pred.stride(1), pred.stride(2), target.stride(0),
          target.stride(1), target.stride(2), rll::CriterionParams<A>(omega1, omega2, epsilon), grad_scale,
          rll::shared_bytes<A>(n) > 0};
      rll::launch_relative_location_loss<T, A>(args, criterion, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (backward) {
    return {at::Tensor(), grad_pred};
  }
  if (none) {
    return {loss_none, grad_pred};
  }
  const at::Tensor sums = partial.sum(0);
  at::Tensor loss = sums[0];
  if (reduction == rll::kMean) {
    if (landmark_weight.has_value()) {
      // The gradient was accumulated unscaled: the weight sum is only known after the pass.
      const at::Tensor scale = (sums[1] * 2.0).clamp_min(rll::kMinWeightSum).reciprocal();
      loss = loss * scale;
      if (need_grad) {
        grad_pred.mul_(scale);
      }
    } else {
      loss = loss / std::max(static_cast<double>(b) * r * 2, 1.0);
    }
  }
  return {loss.clone(), grad_pred};
}

std::tuple<at::Tensor, at::Tensor> relative_location_loss_cuda(
    const at::Tensor& pred, const at::Tensor& target, const at::Tensor& anchor, const at::Tensor& indptr,
    const at::Tensor& member, const at::Tensor& weight, const c10::optional<at::Tensor>& landmark_weight,
    int64_t criterion, double omega1, double omega2, double epsilon, int64_t reduction, bool need_grad) {
  check_relative_location_loss_args("relative_location_loss", pred, target, anchor, indptr, member, weight,
                                    landmark_weight, criterion, omega1, omega2, epsilon);
  check_relative_location_loss_reduction(reduction);
  return run_cuda(at::Tensor(), pred, target, anchor, indptr, member, weight, landmark_weight, criterion, omega1,
                  omega2, epsilon, reduction, need_grad && reduction != rll::kNone);
}

at::Tensor relative_location_loss_backward_cuda(const at::Tensor& grad_out, const at::Tensor& pred,
                                                const at::Tensor& target, const at::Tensor& anchor,
                                                const at::Tensor& indptr, const at::Tensor& member,
                                                const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& landmark_weight, int64_t criterion,
                                                double omega1, double omega2, double epsilon) {
  check_relative_location_loss_args("relative_location_loss_backward", pred, target, anchor, indptr, member, weight,
                                    landmark_weight, criterion, omega1, omega2, epsilon);
  check_relative_location_loss_grad_out(grad_out, pred, anchor);
  return std::get<1>(run_cuda(grad_out, pred, target, anchor, indptr, member, weight, landmark_weight, criterion,
                              omega1, omega2, epsilon, rll::kNone, true));
}

}  // namespace

}  // namespace structalign

TORCH_LIBRARY_IMPL(structalign, CUDA, m) {
  m.impl("relative_location_loss", &structalign::relative_location_loss_cuda);
  m.impl("relative_location_loss_backward", &structalign::relative_location_loss_backward_cuda);
}
