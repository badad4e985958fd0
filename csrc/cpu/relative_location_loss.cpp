// CPU implementation of relative_location_loss and its backward (schemas in csrc/relative_location_loss.cpp).
//
// Faces are processed in blocks of kLanes: a block's errors e = pred - target are transposed to
// [N][2][kLanes] so that every relation is a handful of unit-stride loops over the faces of the block (no gathers
// in the inner loops, which the compiler vectorises), and the gradient is accumulated the same way before being
// transposed back. at::parallel_for runs the blocks; each block writes its own partial sums, which are added in
// block order afterwards, so the loss does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common.h"
#include "relative_location_loss.h"

// Without this, gcc keeps the float compares of the criterion's selects as branches (a compare may raise an FP
// exception flag) and the lane loops stay scalar; nothing here reads the FP exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "relative_location_loss_math.h"

namespace structalign {

namespace {

using rll::CriterionParams;

constexpr int64_t kLanes = 32;

// log1p(u) for u >= 0 in float, branch-free so that loops over lanes vectorise (std::log1p does not): log(1 + u)
// by the range reduction and polynomial of musl's logf (< 1 ulp). Rounding 1 + u costs at most 2^-24 in absolute
// terms (omega2 * 2^-24 in the loss), which is below float resolution of the loss itself, so the usual log1p
// correction (a division) is left out.
inline float log1p_nonneg(float u) {
  const float y = 1.0f + u;
  uint32_t bits;
  std::memcpy(&bits, &y, sizeof bits);
  bits += 0x3f800000u - 0x3f3504f3u;  // so that the mantissa lands in [sqrt(2)/2, sqrt(2))
  const float k = static_cast<float>(static_cast<int32_t>(bits >> 23) - 0x7f);
  bits = (bits & 0x007fffffu) + 0x3f3504f3u;
  float m;
  std::memcpy(&m, &bits, sizeof m);
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s, w = z * z;
  const float t1 = w * (0.40000972152f + w * 0.24279078841f);
  const float t2 = z * (0.66666662693f + w * 0.28498786688f);
  const float hfsq = 0.5f * f * f;
  return s * (hfsq + t1 + t2) + k * 9.0580006145e-06f - hfsq + f + k * 6.9313812256e-01f;
}

struct Log1pLanes {
  float operator()(float u) const {
    return log1p_nonneg(u);
  }
  double operator()(double u) const {
    return std::log1p(u);
  }
};

template <typename A>
struct Relations {
  const int64_t* anchor;
  const int64_t* indptr;
  const int64_t* member;
  const A* weight;
  int64_t count;
};

// Where one block's results go. loss_none / grad_out are [B, R, 2]; grad_pred is [B, N, 2]; null when unused.
template <typename A>
struct BlockIO {
  A* loss_none;
  const A* grad_out;
  A* grad_pred;
  A grad_scale;
};

template <typename scalar_t, typename A, int64_t C>
struct Block {
  std::vector<A> err, grad, lw;

  Block(int64_t n, bool weighted) : err(n * 2 * kLanes), grad(n * 2 * kLanes), lw(weighted ? n * kLanes : 0) {}

  // Faces [b0, b0 + nb): adds their loss (mean / sum) and relation weight to *loss_sum / *weight_sum.
  STRUCTALIGN_CPU_CLONES void run(const scalar_t* pred, const scalar_t* target, const A* landmark_weight,
                                  const Relations<A>& rel, int64_t n, int64_t b0, int64_t nb,
                                  const CriterionParams<A>& p, const BlockIO<A>& io, double* loss_sum,
                                  double* weight_sum) {
    const bool weighted = landmark_weight != nullptr;
    const bool want_grad = io.grad_pred != nullptr;
    A dx[kLanes], dy[kLanes], rw[kLanes], lx[kLanes], ly[kLanes], gx[kLanes], gy[kLanes];
    // Per-lane sums in the accumulation type; a block's lanes are added in double.
    A lane_loss[kLanes], lane_weight[kLanes];
    // Padding lanes hold zero error (and zero weight), so they add nothing and need no masks.
    for (int64_t i = 0; i < n * 2; ++i) {
      A* e = &err[i * kLanes];
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t src = ((b0 + l) * n) * 2 + i;
        e[l] = l < nb ? static_cast<A>(pred[src]) - static_cast<A>(target[src]) : A(0);
      }
    }
    if (weighted) {
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t l = 0; l < kLanes; ++l) {
          lw[j * kLanes + l] = l < nb ? landmark_weight[(b0 + l) * n + j] : A(0);
        }
      }
    }
    if (want_grad) {
      std::fill(grad.begin(), grad.end(), A(0));
    }
    for (int64_t l = 0; l < kLanes; ++l) {
      lane_loss[l] = 0;
      lane_weight[l] = 0;
      rw[l] = 1;
    }
    for (int64_t r = 0; r < rel.count; ++r) {
      const int64_t a = rel.anchor[r];
      const A* ea = &err[a * 2 * kLanes];
      for (int64_t l = 0; l < kLanes; ++l) {
        dx[l] = -ea[l];
        dy[l] = -ea[kLanes + l];
      }
      if (weighted) {
        for (int64_t l = 0; l < kLanes; ++l) {
          rw[l] = lw[a * kLanes + l];
        }
      }
      for (int64_t k = rel.indptr[r]; k < rel.indptr[r + 1]; ++k) {
        const int64_t m = rel.member[k];
        const A w = rel.weight[k];
        const A* em = &err[m * 2 * kLanes];
        for (int64_t l = 0; l < kLanes; ++l) {
          dx[l] += w * em[l];
          dy[l] += w * em[kLanes + l];
        }
        if (weighted) {
          for (int64_t l = 0; l < kLanes; ++l) {
            rw[l] *= lw[m * kLanes + l];
          }
        }
      }
      for (int64_t l = 0; l < kLanes; ++l) {
        rll::criterion_value_grad<C>(dx[l], p, Log1pLanes(), lx[l], gx[l]);
        rll::criterion_value_grad<C>(dy[l], p, Log1pLanes(), ly[l], gy[l]);
      }
      if (io.loss_none != nullptr) {
        for (int64_t l = 0; l < nb; ++l) {
          A* out = &io.loss_none[((b0 + l) * rel.count + r) * 2];
          out[0] = rw[l] * lx[l];
          out[1] = rw[l] * ly[l];
        }
      } else {
        for (int64_t l = 0; l < kLanes; ++l) {
          lane_loss[l] += rw[l] * (lx[l] + ly[l]);
          lane_weight[l] += rw[l];
        }
      }
      if (!want_grad) {
        continue;
      }
      if (io.grad_out != nullptr) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const A* go = &io.grad_out[((b0 + std::min(l, nb - 1)) * rel.count + r) * 2];
          const A s = l < nb ? io.grad_scale * rw[l] : A(0);
          gx[l] *= s * go[0];
          gy[l] *= s * go[1];
        }
      } else {
        for (int64_t l = 0; l < kLanes; ++l) {
          gx[l] *= io.grad_scale * rw[l];
          gy[l] *= io.grad_scale * rw[l];
        }
      }
      A* ga = &grad[a * 2 * kLanes];
      for (int64_t l = 0; l < kLanes; ++l) {
        ga[l] -= gx[l];
        ga[kLanes + l] -= gy[l];
      }
      for (int64_t k = rel.indptr[r]; k < rel.indptr[r + 1]; ++k) {
        const A w = rel.weight[k];
        A* gm = &grad[rel.member[k] * 2 * kLanes];
        for (int64_t l = 0; l < kLanes; ++l) {
          gm[l] += w * gx[l];
          gm[kLanes + l] += w * gy[l];
        }
      }
    }
    if (want_grad) {
      for (int64_t i = 0; i < n * 2; ++i) {
        const A* g = &grad[i * kLanes];
        for (int64_t l = 0; l < nb; ++l) {
          io.grad_pred[((b0 + l) * n) * 2 + i] = g[l];
        }
      }
    }
    double total = 0, total_weight = 0;
    for (int64_t l = 0; l < kLanes; ++l) {
      total += static_cast<double>(lane_loss[l]);
      total_weight += static_cast<double>(lane_weight[l]);
    }
    *loss_sum = total;
    *weight_sum = total_weight;
  }
};

// The relation tables must be well formed before any kernel indexes with them (the op can be called directly):
// indptr runs from 0 to M without decreasing, anchors and members are landmarks, and point_ptr / point_rel /
// point_coef list exactly these relations by landmark, in order (the CUDA kernel's gradient reads them; checking
// them here makes CPU tests catch a wrong transposed index).
template <typename A>
void check_relation_values(const char* op, const at::Tensor& anchor, const at::Tensor& indptr,
                           const at::Tensor& member, const at::Tensor& weight, const at::Tensor& point_ptr,
                           const at::Tensor& point_rel, const at::Tensor& point_coef, int64_t n) {
  const int64_t r = anchor.numel(), m = member.numel();
  const int64_t* a = anchor.data_ptr<int64_t>();
  const int64_t* ip = indptr.data_ptr<int64_t>();
  const int64_t* mem = member.data_ptr<int64_t>();
  const A* w = weight.data_ptr<A>();
  const int64_t* pp = point_ptr.data_ptr<int64_t>();
  const int64_t* prel = point_rel.data_ptr<int64_t>();
  const A* pcoef = point_coef.data_ptr<A>();
  TORCH_CHECK(ip[0] == 0 && ip[r] == m, op, ": indptr must start at 0 and end at M = ", m, ", got ", ip[0], "..",
              ip[r]);
  for (int64_t i = 0; i < r; ++i) {
    TORCH_CHECK(ip[i + 1] >= ip[i], op, ": indptr must be non-decreasing, but indptr[", i + 1, "] = ", ip[i + 1],
                " < indptr[", i, "] = ", ip[i]);
    TORCH_CHECK(a[i] >= 0 && a[i] < n, op, ": anchor[", i, "] = ", a[i], " is outside [0, ", n, ")");
  }
  for (int64_t k = 0; k < m; ++k) {
    TORCH_CHECK(mem[k] >= 0 && mem[k] < n, op, ": member[", k, "] = ", mem[k], " is outside [0, ", n, ")");
  }
  TORCH_CHECK(pp[0] == 0 && pp[n] == r + m, op, ": point_ptr must start at 0 and end at R + M = ", r + m, ", got ",
              pp[0], "..", pp[n]);
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(pp[j + 1] >= pp[j], op, ": point_ptr must be non-decreasing, but point_ptr[", j + 1, "] = ",
                pp[j + 1], " < point_ptr[", j, "] = ", pp[j]);
  }
  // Walk the relations in order: each use of a landmark must be that landmark's next entry.
  std::vector<int64_t> next(pp, pp + n);
  const auto expect = [&](int64_t j, int64_t rel, A coef) {
    const int64_t t = next[j]++;
    TORCH_CHECK(t < pp[j + 1] && prel[t] == rel && pcoef[t] == coef, op, ": landmark ", j, "'s entry ", t,
                " of point_ptr / point_rel / point_coef must be relation ", rel, " with coefficient ", coef,
                " (entries sorted by relation: the anchor's, then the members' in member order)");
  };
  for (int64_t i = 0; i < r; ++i) {
    expect(a[i], i, A(-1));
    for (int64_t k = ip[i]; k < ip[i + 1]; ++k) expect(mem[k], i, w[k]);
  }
}

// Forward (grad_out undefined) or the backward of reduction none (grad_out Tensor[B, R, 2]). Returns
// (loss, grad_pred) as the schema describes.
std::tuple<at::Tensor, at::Tensor> run_cpu(const char* op, const at::Tensor& grad_out, const at::Tensor& pred_in,
                                           const at::Tensor& target_in, const RelationArgs& rel_in,
                                           const c10::optional<at::Tensor>& landmark_weight, int64_t criterion,
                                           double omega1, double omega2, double epsilon, int64_t reduction,
                                           bool need_grad) {
  TORCH_INTERNAL_ASSERT(pred_in.device().is_cpu());
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const at::Tensor anchor = rel_in.anchor.contiguous(), indptr = rel_in.indptr.contiguous();
  const at::Tensor member = rel_in.member.contiguous(), weight = rel_in.weight.contiguous();
  const at::Tensor point_ptr = rel_in.point_ptr.contiguous(), point_rel = rel_in.point_rel.contiguous();
  const at::Tensor point_coef = rel_in.point_coef.contiguous();
  const int64_t b = pred.size(0), n = pred.size(1), r = anchor.numel();
  const at::ScalarType acc = acc_scalar_type(pred.scalar_type());
  const auto opts = pred.options().dtype(acc);
  const bool backward = grad_out.defined();
  const bool none = reduction == rll::kNone;
  at::Tensor loss_none = none && !backward ? at::empty({b, r, 2}, opts) : at::Tensor();
  at::Tensor grad_pred = need_grad ? at::empty({b, n, 2}, opts) : at::empty({0}, opts);
  at::Tensor lw;
  if (landmark_weight.has_value()) {
    lw = landmark_weight->to(acc).contiguous();
  }
  at::Tensor go = backward ? grad_out.to(acc).contiguous() : at::Tensor();
  const int64_t blocks = (b + kLanes - 1) / kLanes;
  std::vector<double> block_loss(blocks, 0.0), block_weight(blocks, 0.0);
  // About 64k relation terms per task, so small batches stay on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, kLanes * (r + member.numel())));
  const double count = static_cast<double>(b) * r * 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "relative_location_loss_cpu", [&] {
    using A = acc_t<scalar_t>;
    check_relation_values<A>(op, anchor, indptr, member, weight, point_ptr, point_rel, point_coef, n);
    const Relations<A> rel{anchor.data_ptr<int64_t>(), indptr.data_ptr<int64_t>(), member.data_ptr<int64_t>(),
                           weight.data_ptr<A>(), r};
    const CriterionParams<A> params(omega1, omega2, epsilon);
    A grad_scale = A(1);
    if (!backward && reduction == rll::kMean && !lw.defined()) {
      grad_scale = static_cast<A>(1.0 / std::max(count, 1.0));
    }
    const BlockIO<A> io{none && !backward ? loss_none.data_ptr<A>() : nullptr,
                        backward ? go.data_ptr<A>() : nullptr, need_grad ? grad_pred.data_ptr<A>() : nullptr,
                        grad_scale};
    const scalar_t* pred_ptr = pred.data_ptr<scalar_t>();
    const scalar_t* target_ptr = target.data_ptr<scalar_t>();
    const A* lw_ptr = lw.defined() ? lw.data_ptr<A>() : nullptr;
    auto run_blocks = [&](auto criterion_tag) {
      constexpr int64_t C = decltype(criterion_tag)::value;
      at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
        Block<scalar_t, A, C> block(n, lw_ptr != nullptr);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b0 = i * kLanes;
          block.run(pred_ptr, target_ptr, lw_ptr, rel, n, b0, std::min(kLanes, b - b0), params, io,
                    &block_loss[i], &block_weight[i]);
        }
      });
    };
    if (criterion == rll::kSoftWing) {
      run_blocks(std::integral_constant<int64_t, rll::kSoftWing>());
    } else if (criterion == rll::kL1) {
      run_blocks(std::integral_constant<int64_t, rll::kL1>());
    } else {
      run_blocks(std::integral_constant<int64_t, rll::kMse>());
    }
  });
  if (backward) {
    return {at::Tensor(), grad_pred};
  }
  if (none) {
    return {loss_none, grad_pred};
  }
  double total = 0, total_weight = 0;
  for (int64_t i = 0; i < blocks; ++i) {
    total += block_loss[i];
    total_weight += block_weight[i];
  }
  double value = total;
  if (reduction == rll::kMean) {
    if (lw.defined()) {
      const double scale = 1.0 / std::max(2.0 * total_weight, rll::kMinWeightSum);
      value *= scale;
      if (need_grad) {
        grad_pred.mul_(scale);
      }
    } else {
      value /= std::max(count, 1.0);
    }
  }
  return {at::scalar_tensor(value, opts), grad_pred};
}

std::tuple<at::Tensor, at::Tensor> relative_location_loss_cpu(
    const at::Tensor& pred, const at::Tensor& target, const at::Tensor& anchor, const at::Tensor& indptr,
    const at::Tensor& member, const at::Tensor& weight, const at::Tensor& point_ptr, const at::Tensor& point_rel,
    const at::Tensor& point_coef, const c10::optional<at::Tensor>& landmark_weight, int64_t criterion, double omega1,
    double omega2, double epsilon, int64_t reduction, bool need_grad) {
  const char* op = "relative_location_loss";
  const RelationArgs rel{anchor, indptr, member, weight, point_ptr, point_rel, point_coef};
  check_relative_location_loss_args(op, pred, target, rel, landmark_weight, criterion, omega1, omega2, epsilon);
  check_relative_location_loss_reduction(reduction);
  const bool with_grad = need_grad && reduction != rll::kNone;
  return run_cpu(op, at::Tensor(), pred, target, rel, landmark_weight, criterion, omega1, omega2, epsilon, reduction,
                 with_grad);
}

at::Tensor relative_location_loss_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& pred, const at::Tensor& target, const at::Tensor& anchor,
    const at::Tensor& indptr, const at::Tensor& member, const at::Tensor& weight, const at::Tensor& point_ptr,
    const at::Tensor& point_rel, const at::Tensor& point_coef, const c10::optional<at::Tensor>& landmark_weight,
    int64_t criterion, double omega1, double omega2, double epsilon) {
  const char* op = "relative_location_loss_backward";
  const RelationArgs rel{anchor, indptr, member, weight, point_ptr, point_rel, point_coef};
  check_relative_location_loss_args(op, pred, target, rel, landmark_weight, criterion, omega1, omega2, epsilon);
  check_relative_location_loss_grad_out(grad_out, pred, anchor);
  return std::get<1>(run_cpu(op, grad_out, pred, target, rel, landmark_weight, criterion, omega1, omega2, epsilon,
                             rll::kNone, true));
}

}  // namespace

}  // namespace structalign

TORCH_LIBRARY_IMPL(structalign, CPU, m) {
  m.impl("relative_location_loss", &structalign::relative_location_loss_cpu);
  m.impl("relative_location_loss_backward", &structalign::relative_location_loss_backward_cpu);
}
