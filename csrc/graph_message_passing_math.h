// Math of graph_message_passing shared by the CPU kernels (g++) and the CUDA kernels (nvcc): the softmax over one
// CSR row and its gradient. Torch-free, so that csrc/cuda/graph_message_passing_kernels.cuh compiles with nvcc
// alone.
#pragma once

#include <cstdint>

#include "common_math.h"

namespace structalign {
namespace gmp {

// attn[k] = softmax(row_logits[0..deg))[k]: shifted by the row's maximum so that large logits cannot overflow, one
// exponential per edge and one division per row.
template <typename A>
STRUCTALIGN_HD void row_softmax(const A* row_logits, int64_t deg, A* attn) {
  A peak = row_logits[0];
  for (int64_t k = 1; k < deg; ++k) peak = row_logits[k] > peak ? row_logits[k] : peak;
  A total = 0;
  for (int64_t k = 0; k < deg; ++k) {
    attn[k] = exp_acc(row_logits[k] - peak);
    total += attn[k];
  }
  const A inv = A(1) / total;
  for (int64_t k = 0; k < deg; ++k) attn[k] *= inv;
}

// d loss / d logit_e through the row softmax: a_e * (d_e - sum_f a_f d_f), where d_e = <grad_out_i, v_e> and
// weighted_sum = sum_f a_f d_f over the row.
template <typename A>
STRUCTALIGN_HD A softmax_backward(A a, A d, A weighted_sum) {
  return a * (d - weighted_sum);
}

}  // namespace gmp
}  // namespace structalign
