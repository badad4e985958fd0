// CUDA implementation of relative_location_loss and its backward (schemas in csrc/relative_location_loss.cpp):
// checks, allocation and launch around the torch-free kernel of relative_location_loss_kernels.cuh. The relation
// tables' values are checked in the kernel (device asserts), and the per-block partial sums are added by at::sum
// (a fixed order, so the loss is deterministic), both without a host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common.h"
#include "cuda/launch.h"
#include "cuda/relative_location_loss_kernels.cuh"
#include "relative_location_loss.h"

namespace structalign {

namespace {

template <typename T, typename A, int64_t C, bool kStaged>
void launch(rll::KernelArgs<T, A>& args, const rll::Plan& plan, at::Tensor& partial, at::Tensor& g_global,
            const at::TensorOptions& opts) {
  const auto kernel = rll::relative_location_loss_kernel<T, A, C, kStaged>;
  allow_shared_memory(kernel, plan.smem);
  // A persistent grid: as many blocks as fit on the device at once, at most one a face.
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, rll::kThreads, plan.smem));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t grid = std::min<int64_t>(args.batch, std::max<int64_t>(1, per_sm) * sms);
  partial = at::empty({grid, 2}, opts.dtype(at::kDouble));
  if (!plan.g_shared) g_global = at::empty({grid, args.r, 2}, opts);
  args.partial = partial.data_ptr<double>();
  args.g_global = plan.g_shared ? nullptr : g_global.data_ptr<A>();
  kernel<<<static_cast<unsigned int>(grid), rll::kThreads, plan.smem, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename A, int64_t C>
void launch_staged_or_not(rll::KernelArgs<T, A>& args, const rll::Plan& plan, at::Tensor& partial,
                          at::Tensor& g_global, const at::TensorOptions& opts) {
  if (plan.staged) {
    launch<T, A, C, true>(args, plan, partial, g_global, opts);
  } else {
    launch<T, A, C, false>(args, plan, partial, g_global, opts);
  }
}

// Forward (grad_out undefined) or the backward of reduction none. Returns (loss, grad_pred) as the schema describes.
std::tuple<at::Tensor, at::Tensor> run_cuda(const at::Tensor& grad_out, const at::Tensor& pred,
                                            const at::Tensor& target, const RelationArgs& rel,
                                            const c10::optional<at::Tensor>& landmark_weight, int64_t criterion,
                                            double omega1, double omega2, double epsilon, int64_t reduction,
                                            bool need_grad) {
  TORCH_INTERNAL_ASSERT(pred.device().is_cuda());
  const c10::cuda::CUDAGuard guard(pred.device());
  const int64_t b = pred.size(0), n = pred.size(1), r = rel.anchor.numel(), m = rel.member.numel();
  const at::ScalarType acc = acc_scalar_type(pred.scalar_type());
  const auto opts = pred.options().dtype(acc);
  const bool backward = grad_out.defined();
  const bool none = reduction == rll::kNone;
  at::Tensor loss_none = none && !backward ? at::empty({b, r, 2}, opts) : at::Tensor();
  at::Tensor grad_pred = need_grad ? at::empty({b, n, 2}, opts) : at::empty({0}, opts);
  at::Tensor partial, g_global;
  if (b > 0 && r > 0) {
    const at::Tensor anchor = rel.anchor.contiguous(), indptr = rel.indptr.contiguous();
    const at::Tensor member = rel.member.contiguous(), weight = rel.weight.contiguous();
    const at::Tensor point_ptr = rel.point_ptr.contiguous(), point_rel = rel.point_rel.contiguous();
    const at::Tensor point_coef = rel.point_coef.contiguous();
    const at::Tensor lw = landmark_weight.has_value() ? landmark_weight->to(acc).contiguous() : at::Tensor();
    const at::Tensor go = backward ? grad_out.to(acc).contiguous() : at::Tensor();
    const double count = static_cast<double>(b) * r * 2;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "relative_location_loss_cuda", [&] {
      using T = typename CudaType<scalar_t>::type;
      using A = acc_t<T>;
      const A grad_scale = (!backward && reduction == rll::kMean && !lw.defined()) ? static_cast<A>(1.0 / count)
                                                                                    : A(1);
      const size_t budget = shared_memory_budget();
      const rll::Plan plan = rll::make_plan<A>(n, r, m, lw.defined(), budget);
      TORCH_CHECK(plan.smem <= budget, "relative_location_loss: ", r, " relations of ", n,
                  " landmarks do not fit the CUDA kernel's shared memory (", budget, " bytes a block on this device)");
      rll::KernelArgs<T, A> args{cuda_ptr<scalar_t>(pred),
                                 cuda_ptr<scalar_t>(target),
                                 pred.stride(0),
                                 pred.stride(1),
                                 pred.stride(2),
                                 target.stride(0),
                                 target.stride(1),
                                 target.stride(2),
                                 lw.defined() ? lw.data_ptr<A>() : nullptr,
                                 anchor.data_ptr<int64_t>(),
                                 indptr.data_ptr<int64_t>(),
                                 member.data_ptr<int64_t>(),
                                 weight.data_ptr<A>(),
                                 point_ptr.data_ptr<int64_t>(),
                                 point_rel.data_ptr<int64_t>(),
                                 point_coef.data_ptr<A>(),
                                 backward ? go.data_ptr<A>() : nullptr,
                                 loss_none.defined() ? loss_none.data_ptr<A>() : nullptr,
                                 need_grad ? grad_pred.data_ptr<A>() : nullptr,
                                 nullptr,
                                 nullptr,
                                 b,
                                 static_cast<int>(n),
                                 static_cast<int>(r),
                                 static_cast<int>(m),
                                 rll::CriterionParams<A>(omega1, omega2, epsilon),
                                 grad_scale,
                                 plan.group};
      if (criterion == rll::kMse) {
        launch_staged_or_not<T, A, rll::kMse>(args, plan, partial, g_global, opts);
      } else if (criterion == rll::kL1) {
        launch_staged_or_not<T, A, rll::kL1>(args, plan, partial, g_global, opts);
      } else {
        launch_staged_or_not<T, A, rll::kSoftWing>(args, plan, partial, g_global, opts);
      }
    });
  } else {
    partial = at::zeros({1, 2}, opts.dtype(at::kDouble));
    if (need_grad) grad_pred.zero_();
  }
  if (backward) {
    return {at::Tensor(), grad_pred};
  }
  if (none) {
    return {loss_none, grad_pred};
  }
  const at::Tensor sums = partial.sum(0);  // float64: [loss sum, relation-weight sum]
  at::Tensor loss = sums[0];
  if (reduction == rll::kMean) {
    if (landmark_weight.has_value()) {
      // The gradient was accumulated unscaled: the weight sum is only known after the pass.
      const at::Tensor scale = (sums[1] * 2.0).clamp_min(rll::kMinWeightSum).reciprocal();
      loss = loss * scale;
      if (need_grad) grad_pred.mul_(scale);
    } else {
      loss = loss / std::max(static_cast<double>(b) * r * 2, 1.0);
    }
  }
  return {loss.to(acc, /*non_blocking=*/false, /*copy=*/true), grad_pred};
}

std::tuple<at::Tensor, at::Tensor> relative_location_loss_cuda(
    const at::Tensor& pred, const at::Tensor& target, const at::Tensor& anchor, const at::Tensor& indptr,
    const at::Tensor& member, const at::Tensor& weight, const at::Tensor& point_ptr, const at::Tensor& point_rel,
    const at::Tensor& point_coef, const c10::optional<at::Tensor>& landmark_weight, int64_t criterion, double omega1,
    double omega2, double epsilon, int64_t reduction, bool need_grad) {
  const RelationArgs rel{anchor, indptr, member, weight, point_ptr, point_rel, point_coef};
  check_relative_location_loss_args("relative_location_loss", pred, target, rel, landmark_weight, criterion, omega1,
                                    omega2, epsilon);
  check_relative_location_loss_reduction(reduction);
  return run_cuda(at::Tensor(), pred, target, rel, landmark_weight, criterion, omega1, omega2, epsilon, reduction,
                  need_grad && reduction != rll::kNone);
}

at::Tensor relative_location_loss_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& pred, const at::Tensor& target, const at::Tensor& anchor,
    const at::Tensor& indptr, const at::Tensor& member, const at::Tensor& weight, const at::Tensor& point_ptr,
    const at::Tensor& point_rel, const at::Tensor& point_coef, const c10::optional<at::Tensor>& landmark_weight,
    int64_t criterion, double omega1, double omega2, double epsilon) {
  const RelationArgs rel{anchor, indptr, member, weight, point_ptr, point_rel, point_coef};
  check_relative_location_loss_args("relative_location_loss_backward", pred, target, rel, landmark_weight,
                                    criterion, omega1, omega2, epsilon);
  check_relative_location_loss_grad_out(grad_out, pred, anchor);
  return std::get<1>(run_cuda(grad_out, pred, target, rel, landmark_weight, criterion, omega1, omega2, epsilon,
                              rll::kNone, true));
}

}  // namespace

}  // namespace structalign

TORCH_LIBRARY_IMPL(structalign, CUDA, m) {
  m.impl("relative_location_loss", &structalign::relative_location_loss_cuda);
  m.impl("relative_location_loss_backward", &structalign::relative_location_loss_backward_cuda);
}
