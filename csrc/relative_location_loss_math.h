// Math of relative_location_loss shared by the CPU kernels (g++) and the CUDA kernels (nvcc): the criterion codes,
// the element criterion with its derivative, and the loss scale of each reduction. Torch-free, so that
// csrc/cuda/relative_location_loss_kernels.cuh compiles with nvcc alone.
#pragma once

#include <cmath>
#include <cstdint>

#include "common_math.h"

namespace structalign {
namespace rll {

// Integer codes of the schema's `criterion` and `reduction` arguments: the index of each name in CRITERIA / REDUCTIONS
// of structalign/ops/reference.py (tests/ops/test_op_codes.py checks that they agree).
enum Criterion : int64_t { kSoftWing = 0, kL1 = 1, kMse = 2 };
enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

// Smallest denominator of the weighted mean, as relative_location_loss_reference (all weights zero -> loss 0).
constexpr double kMinWeightSum = 1e-12;

// The criterion's constants in the accumulation type A (float64 for float64 inputs), from the schema's doubles.
template <typename A>
struct CriterionParams {
  A omega1, omega2, epsilon;
  A wing_b;  // soft-wing offset B = omega1 - omega2 * ln(1 + omega1 / epsilon), continuity at |d| = omega1

  CriterionParams(double w1, double w2, double eps)
      : omega1(A(w1)), omega2(A(w2)), epsilon(A(eps)),
        wing_b(A(w1 - w2 * std::log1p(w1 / eps))) {}
};

// log1p of the accumulation type (device code).
struct Log1pAcc {
  template <typename A>
  STRUCTALIGN_HD A operator()(A x) const {
    return log1p_acc(x);
  }
};

// Loss of one residual component d and its derivative d loss / d d, for criterion C:
//   soft_wing: |d| if |d| < omega1 else omega2 ln(1 + |d|/epsilon) + B   (method.md §2.1)
//   l1: |d|      mse: d^2
// The derivative of |d| at d = 0 is taken as 0, as torch.abs does. Both soft-wing branches are evaluated and one is
// selected, so that loops over lanes vectorise on the CPU and warps do not diverge on the GPU.
template <int64_t C, typename A, typename Log1p>
STRUCTALIGN_HD void criterion_value_grad(A d, const CriterionParams<A>& p, const Log1p& log1p_fn, A& loss, A& grad) {
  const A x = d < A(0) ? -d : d;
  const A sign = d > A(0) ? A(1) : (d < A(0) ? A(-1) : A(0));
  if constexpr (C == kMse) {
    loss = d * d;
    grad = A(2) * d;
  } else if constexpr (C == kL1) {
    loss = x;
    grad = sign;
  } else {
    const bool linear = x < p.omega1;
    const A wing = p.omega2 * log1p_fn(x / p.epsilon) + p.wing_b;
    const A slope = p.omega2 / (p.epsilon + x);
    loss = linear ? x : wing;
    grad = sign * (linear ? A(1) : slope);
  }
}

}  // namespace rll
}  // namespace structalign
