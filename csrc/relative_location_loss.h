// Host-side input checks of relative_location_loss shared by the CPU and CUDA implementations. They read only
// metadata (shapes, dtypes, devices), never tensor values, so they cost nothing on the GPU; the CPU kernel also
// checks the relation indices' values.
#pragma once

#include <ATen/ATen.h>

namespace structalign {

// Checks pred / target (Tensor[B, N, 2], same float dtype), anchor (int64 Tensor[R]), indptr (int64 Tensor[R + 1]),
// member (int64 Tensor[M]), weight (float32 Tensor[M]), landmark_weight (float Tensor[B, N] or none), the criterion
// and reduction codes and the soft-wing parameters; `op` names the calling op in the errors.
void check_relative_location_loss_args(const char* op, const at::Tensor& pred, const at::Tensor& target,
                                       const at::Tensor& anchor, const at::Tensor& indptr, const at::Tensor& member,
                                       const at::Tensor& weight, const c10::optional<at::Tensor>& landmark_weight,
                                       int64_t criterion, double omega1, double omega2, double epsilon);

// The reduction code is 0 (mean), 1 (sum) or 2 (none).
void check_relative_location_loss_reduction(int64_t reduction);

// grad_out of relative_location_loss_backward: a float Tensor[B, R, 2] on pred's device.
void check_relative_location_loss_grad_out(const at::Tensor& grad_out, const at::Tensor& pred,
                                           const at::Tensor& anchor);

// Accumulation dtype of the loss and the gradient: float64 for float64 inputs, float32 otherwise.
at::ScalarType relative_location_loss_acc_type(const at::Tensor& pred);

}  // namespace structalign
