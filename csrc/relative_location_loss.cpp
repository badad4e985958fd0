// Schemas of the relative-location loss ops (implementations: csrc/cpu/, csrc/cuda/) and the host-side argument
// checks both implementations share. structalign/ops/relative_location_loss.py is the Python contract.
//
// relative_location_loss: loss of criterion(delta_r(pred) - delta_r(target)) over relations r, with
//   delta_r(P) = sum_m weight[m] P[member[m]] - P[anchor[r]]   (members of r: indptr[r] .. indptr[r + 1]).
//   criterion: 0 soft_wing, 1 l1, 2 mse; reduction: 0 mean, 1 sum, 2 none (relative_location_loss_math.h).
//   Returns (loss, grad_pred). loss: a 0-dim tensor for mean / sum, Tensor[B, R, 2] for none; float64 when pred
//   is float64, else float32. grad_pred: d loss / d pred (Tensor[B, N, 2], loss dtype) computed in the same pass
//   when need_grad and the reduction is mean or sum (the loss is then its only consumer, so the backward is
//   grad_out * grad_pred); an empty Tensor[0] otherwise.
// relative_location_loss_backward: d(sum grad_out * loss) / d pred for reduction none (grad_out Tensor[B, R, 2]).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "relative_location_loss.h"
#include "relative_location_loss_math.h"

namespace structalign {

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_index(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong, op, ": ", name, " must be a 1-D int64 tensor, got ",
              t.scalar_type(), " of shape ", t.sizes());
}

}  // namespace

void check_relative_location_loss_args(const char* op, const at::Tensor& pred, const at::Tensor& target,
                                       const at::Tensor& anchor, const at::Tensor& indptr, const at::Tensor& member,
                                       const at::Tensor& weight, const c10::optional<at::Tensor>& landmark_weight,
                                       int64_t criterion, double omega1, double omega2, double epsilon) {
  TORCH_CHECK(pred.dim() == 3 && pred.size(2) == 2, op, ": pred must have shape [B, N, 2], got ", pred.sizes());
  TORCH_CHECK(is_float_type(pred.scalar_type()), op, ": pred must be float16, bfloat16, float32 or float64, got ",
              pred.scalar_type());
  TORCH_CHECK(target.sizes() == pred.sizes(), op, ": target must match pred's shape ", pred.sizes(), ", got ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == pred.scalar_type(), op, ": target has dtype ", target.scalar_type(),
              " but pred has ", pred.scalar_type());
  check_index(op, "anchor", anchor);
  check_index(op, "indptr", indptr);
  check_index(op, "member", member);
  TORCH_CHECK(indptr.numel() == anchor.numel() + 1, op, ": indptr must have R + 1 = ", anchor.numel() + 1,
              " entries for R = ", anchor.numel(), " relations, got ", indptr.numel());
  TORCH_CHECK(weight.dim() == 1 && weight.scalar_type() == at::kFloat, op,
              ": weight must be a 1-D float32 tensor, got ", weight.scalar_type(), " of shape ", weight.sizes());
  TORCH_CHECK(weight.numel() == member.numel(), op, ": weight must have one entry per member (", member.numel(),
              "), got ", weight.numel());
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"target", &target}, {"anchor", &anchor}, {"indptr", &indptr}, {"member", &member}, {"weight", &weight}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->device() == pred.device(), op, ": ", name, " is on ", t->device(), " but pred is on ",
                pred.device());
  }
  if (landmark_weight.has_value()) {
    const at::Tensor& lw = *landmark_weight;
    TORCH_CHECK(lw.dim() == 2 && lw.size(0) == pred.size(0) && lw.size(1) == pred.size(1), op,
                ": landmark_weight must have shape [", pred.size(0), ", ", pred.size(1), "], got ", lw.sizes());
    TORCH_CHECK(is_float_type(lw.scalar_type()), op, ": landmark_weight must be a floating tensor, got ",
                lw.scalar_type());
    TORCH_CHECK(lw.device() == pred.device(), op, ": landmark_weight is on ", lw.device(), " but pred is on ",
                pred.device());
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
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == pred.size(0) && grad_out.size(1) == anchor.numel() &&
                  grad_out.size(2) == 2,
              "relative_location_loss_backward: grad_out must have shape [", pred.size(0), ", ", anchor.numel(),
              ", 2], got ", grad_out.sizes());
  TORCH_CHECK(is_float_type(grad_out.scalar_type()),
              "relative_location_loss_backward: grad_out must be a floating tensor, got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == pred.device(), "relative_location_loss_backward: grad_out is on ",
              grad_out.device(), " but pred is on ", pred.device());
}

at::ScalarType relative_location_loss_acc_type(const at::Tensor& pred) {
  return pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace structalign

TORCH_LIBRARY_FRAGMENT(structalign, m) {
  m.def(
      "relative_location_loss(Tensor pred, Tensor target, Tensor anchor, Tensor indptr, Tensor member, "
      "Tensor weight, Tensor? landmark_weight, int criterion, float omega1, float omega2, float epsilon, "
      "int reduction, bool need_grad) -> (Tensor, Tensor)");
  m.def(
      "relative_location_loss_backward(Tensor grad_out, Tensor pred, Tensor target, Tensor anchor, Tensor indptr, "
      "Tensor member, Tensor weight, Tensor? landmark_weight, int criterion, float omega1, float omega2, "
      "float epsilon) -> Tensor");
}
