// Schemas of the relative-location loss ops (implementations: csrc/cpu/, csrc/cuda/) and the host-side argument
// checks both implementations share. structalign/ops/relative_location_loss.py is the Python contract.
//
// relative_location_loss: loss of criterion(delta_r(pred) - delta_r(target)) over relations r, with
//   delta_r(P) = sum_m weight[m] P[member[m]] - P[anchor[r]]   (members of r: indptr[r] .. indptr[r + 1]);
//   point_ptr / point_rel / point_coef index the same relations by landmark (relative_location_loss.h).
//   criterion: 0 soft_wing, 1 l1, 2 mse; reduction: 0 mean, 1 sum, 2 none (relative_location_loss_math.h).
//   Computed in the accumulation dtype: float64 when pred is float64 (weight, point_coef and the soft-wing
//   constants included), else float32. Returns (loss, grad_pred). loss: a 0-dim tensor for mean / sum,
//   Tensor[B, R, 2] for none, in the accumulation dtype. grad_pred: d loss / d pred (Tensor[B, N, 2], accumulation
//   dtype) computed in the same pass when need_grad and the reduction is mean or sum (the loss is then its only
//   consumer, so the backward is grad_out * grad_pred); an empty Tensor[0] otherwise. Gradients are bitwise
//   identical from run to run.
// relative_location_loss_backward: d(sum grad_out * loss) / d pred for reduction none (grad_out Tensor[B, R, 2]).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "relative_location_loss.h"
#include "relative_location_loss_math.h"

namespace structalign {

void check_relative_location_loss_args(const char* op, const at::Tensor& pred, const at::Tensor& target,
                                       const RelationArgs& rel, const c10::optional<at::Tensor>& landmark_weight,
                                       int64_t criterion, double omega1, double omega2, double epsilon) {
  TORCH_CHECK(pred.dim() == 3 && pred.size(2) == 2, op, ": pred must have shape [B, N, 2], got ", pred.sizes());
  TORCH_CHECK(is_float_type(pred.scalar_type()), op, ": pred must be float16, bfloat16, float32 or float64, got ",
              pred.scalar_type());
  TORCH_CHECK(target.sizes() == pred.sizes(), op, ": target must match pred's shape ", pred.sizes(), ", got ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == pred.scalar_type(), op, ": target has dtype ", target.scalar_type(),
              " but pred has ", pred.scalar_type());
  const int64_t n = pred.size(1), r = rel.anchor.numel(), m = rel.member.numel();
  const at::ScalarType acc = acc_scalar_type(pred.scalar_type());
  check_index_tensor(op, "anchor", rel.anchor);
  check_index_tensor(op, "indptr", rel.indptr, r + 1, "R + 1");
  check_index_tensor(op, "member", rel.member);
  check_vector_tensor(op, "weight (in the accumulation dtype)", rel.weight, acc, m, "M");
  check_index_tensor(op, "point_ptr", rel.point_ptr, n + 1, "N + 1");
  check_index_tensor(op, "point_rel", rel.point_rel, r + m, "R + M");
  check_vector_tensor(op, "point_coef (in the accumulation dtype)", rel.point_coef, acc, r + m, "R + M");
  check_int32_size(op, "the number of landmarks N", n);
  check_int32_size(op, "the number of relation entries R + M", r + m);
  check_same_device(op, "pred", pred,
                    {{"target", &target},
                     {"anchor", &rel.anchor},
                     {"indptr", &rel.indptr},
                     {"member", &rel.member},
                     {"weight", &rel.weight},
                     {"point_ptr", &rel.point_ptr},
                     {"point_rel", &rel.point_rel},
                     {"point_coef", &rel.point_coef}});
  if (landmark_weight.has_value()) {
    const at::Tensor& lw = *landmark_weight;
    TORCH_CHECK(lw.dim() == 2 && lw.size(0) == pred.size(0) && lw.size(1) == n, op,
                ": landmark_weight must have shape [", pred.size(0), ", ", n, "], got ", lw.sizes());
    TORCH_CHECK(is_float_type(lw.scalar_type()), op, ": landmark_weight must be a floating tensor, got ",
                lw.scalar_type());
    check_same_device(op, "pred", pred, {{"landmark_weight", &lw}});
  }
  TORCH_CHECK(criterion == rll::kSoftWing || criterion == rll::kL1 || criterion == rll::kMse, op,
              ": criterion must be 0 (soft_wing), 1 (l1) or 2 (mse), got ", criterion);
  if (criterion == rll::kSoftWing) {
    TORCH_CHECK(epsilon > 0, op, ": epsilon must be > 0, got ", epsilon);
    TORCH_CHECK(omega1 > 0 && omega2 > 0, op, ": omega1 and omega2 must be > 0, got ", omega1, ", ", omega2);
  }
}

void check_relative_location_loss_reduction(int64_t reduction) {
  TORCH_CHECK(reduction == rll::kMean || reduction == rll::kSum || reduction == rll::kNone,
              "relative_location_loss: reduction must be 0 (mean), 1 (sum) or 2 (none), got ", reduction);
}

void check_relative_location_loss_grad_out(const at::Tensor& grad_out, const at::Tensor& pred,
                                           const at::Tensor& anchor) {
  const char* op = "relative_location_loss_backward";
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == pred.size(0) && grad_out.size(1) == anchor.numel() &&
                  grad_out.size(2) == 2,
              op, ": grad_out must have shape [", pred.size(0), ", ", anchor.numel(), ", 2], got ",
              grad_out.sizes());
  TORCH_CHECK(is_float_type(grad_out.scalar_type()), op, ": grad_out must be a floating tensor, got ",
              grad_out.scalar_type());
  check_same_device(op, "pred", pred, {{"grad_out", &grad_out}});
}

}  // namespace structalign

TORCH_LIBRARY_FRAGMENT(structalign, m) {
  m.def(
      "relative_location_loss(Tensor pred, Tensor target, Tensor anchor, Tensor indptr, Tensor member, "
      "Tensor weight, Tensor point_ptr, Tensor point_rel, Tensor point_coef, Tensor? landmark_weight, "
      "int criterion, float omega1, float omega2, float epsilon, int reduction, bool need_grad) -> (Tensor, Tensor)");
  m.def(
      "relative_location_loss_backward(Tensor grad_out, Tensor pred, Tensor target, Tensor anchor, Tensor indptr, "
      "Tensor member, Tensor weight, Tensor point_ptr, Tensor point_rel, Tensor point_coef, "
      "Tensor? landmark_weight, int criterion, float omega1, float omega2, float epsilon) -> Tensor");
}
