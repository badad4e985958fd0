// Host-side argument checks of relative_location_loss shared by the CPU and CUDA implementations. They read
// metadata only (shapes, dtypes, devices); each backend checks the relation tables' values itself (the CPU on the
// host, CUDA in the kernel, without a host synchronisation).
#pragma once

#include <ATen/ATen.h>

namespace structalign {

// The relation arguments of both ops: relation r is delta_r = sum_m weight[m] P[member[m]] - P[anchor[r]] over its
// members m in indptr[r] .. indptr[r + 1], and the transposed index: landmark j's entries point_ptr[j] ..
// point_ptr[j + 1] say relation point_rel[t] uses j with coefficient point_coef[t] (-1 as anchor, weight[m] as
// member m), sorted by relation (the anchor's entry, then the members' in member order). weight and point_coef
// are in the accumulation dtype.
struct RelationArgs {
  const at::Tensor& anchor;
  const at::Tensor& indptr;
  const at::Tensor& member;
  const at::Tensor& weight;
  const at::Tensor& point_ptr;
  const at::Tensor& point_rel;
  const at::Tensor& point_coef;
};

// Checks pred / target (Tensor[B, N, 2], same float dtype), the relations (int64 index tensors; weight and
// point_coef Tensor[M] / Tensor[R + M] in the accumulation dtype), landmark_weight (float Tensor[B, N] or none),
// the criterion code and the soft-wing parameters; `op` names the calling op in the errors.
void check_relative_location_loss_args(const char* op, const at::Tensor& pred, const at::Tensor& target,
                                       const RelationArgs& rel, const c10::optional<at::Tensor>& landmark_weight,
                                       int64_t criterion, double omega1, double omega2, double epsilon);

// The reduction code is 0 (mean), 1 (sum) or 2 (none).
void check_relative_location_loss_reduction(int64_t reduction);

// grad_out of relative_location_loss_backward: a float Tensor[B, R, 2] on pred's device.
void check_relative_location_loss_grad_out(const at::Tensor& grad_out, const at::Tensor& pred,
                                           const at::Tensor& anchor);

}  // namespace structalign
