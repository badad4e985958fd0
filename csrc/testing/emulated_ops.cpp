// A C API over the CUDA kernels run by the CPU emulation (cuda_emulation.h), for
// tests/ops/test_cpp_cuda_emulation.py (ctypes). Test-only; the extension does not compile this. Each entry point
// mirrors its launcher in csrc/cuda/*.cu: the same vectorisation test, plan (tiles, shared memory) and arguments,
// with the shared-memory budget, the grid of the persistent loss kernel and the thread order chosen by the caller.
// Returns 0, or 1 with the error message copied into `error`.
//
//   g++ -std=c++20 -O1 -shared -fPIC -Wno-attributes -I csrc -I $CUDA_HOME/include csrc/testing/emulated_ops.cpp
#include "testing/cuda_emulation.h"

#include <algorithm>
#include <cstdio>
#include <string>

#include "cuda/graph_conv_kernels.cuh"
#include "cuda/graph_message_passing_kernels.cuh"
#include "cuda/relative_location_loss_kernels.cuh"

namespace structalign {
namespace {

// dtype codes of the C API.
enum Dtype { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

template <typename F>
int dispatch(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kFloat64: return f(double{});
    case kFloat16: return f(__half{});
    case kBFloat16: return f(__nv_bfloat16{});
    default: return -1;
  }
}

int report(const std::string& message, char* error, int64_t error_len) {
  if (message.empty()) return 0;
  std::snprintf(error, static_cast<size_t>(error_len), "%s", message.c_str());
  return 1;
}

}  // namespace
}  // namespace structalign

using namespace structalign;

extern "C" {

// graph_message_passing forward; `vectorized` (out) tells which kernel ran.
int emu_gmp_forward(int dtype, const void* h_self, int64_t hs_sb, int64_t hs_sn, const void* h_nbr, int64_t hn_sb,
                    int64_t hn_sn, const void* logits, int64_t logits_sb, const int64_t* indptr,
                    const int64_t* indices, const void* bias, void* out, int64_t b, int64_t n, int64_t c, int64_t e,
                    int64_t max_deg, int64_t smem_budget, int reverse, int* vectorized, char* error,
                    int64_t error_len) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto run = [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const gmp::Plan plan = gmp::forward_plan<T, V>(n, e, c, static_cast<size_t>(smem_budget));
      if (plan.tile_vecs == 0) return report("graph_message_passing: the graph does not fit shared memory", error,
                                             error_len);
      const gmp::ForwardArgs<T> args{static_cast<const T*>(h_self), hs_sb, hs_sn, static_cast<const T*>(h_nbr),
                                     hn_sb, hn_sn, static_cast<const A*>(logits), logits_sb, indptr, indices,
                                     static_cast<const T*>(bias), static_cast<T*>(out), static_cast<int>(n),
                                     static_cast<int>(e), static_cast<int>(max_deg), c, plan.tile_vecs,
                                     plan.tile_shift, plan.c_vecs};
      *vectorized = V > 1;
      return report(emu::launch(dim3(b, plan.tiles), dim3(gmp::kThreads), plan.smem, reverse,
                                gmp::graph_message_passing_fwd_kernel<T, V>, args),
                    error, error_len);
    };
    constexpr int kVec = cuda::kVec16<T>;
    if (gmp::can_vectorize(kVec, c, {h_self, h_nbr, out, bias}, {hs_sb, hs_sn, hn_sb, hn_sn})) {
      return run(std::integral_constant<int, kVec>());
    }
    return run(std::integral_constant<int, 1>());
  });
}

// graph_message_passing backward; null outputs are not computed. grad_h_self / grad_h_nbr: batch and row strides
// gs_sb, gs_sn; grad_logits: [B, E], grad_bias: [B, C] per-face sums, both in the accumulation type.
int emu_gmp_backward(int dtype, const void* grad_out, int64_t go_sb, int64_t go_sn, const void* h_self, int64_t hs_sb,
                     int64_t hs_sn, const void* h_nbr, int64_t hn_sb, int64_t hn_sn, const void* logits,
                     int64_t logits_sb, const int64_t* indptr, const int64_t* indices, const int64_t* in_ptr,
                     const int64_t* in_edges, const int64_t* edge_row, void* grad_h_self, void* grad_h_nbr,
                     int64_t gs_sb, int64_t gs_sn, void* grad_logits, void* grad_bias, int64_t b, int64_t n,
                     int64_t c, int64_t e, int64_t max_deg,
                     int64_t max_in_deg, int64_t smem_budget, int reverse, int* vectorized, char* error,
                     int64_t error_len) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto run = [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const gmp::Plan plan = gmp::backward_plan<T, V>(n, e, c, grad_logits != nullptr, grad_bias != nullptr,
                                                      static_cast<size_t>(smem_budget));
      if (plan.tile_vecs == 0) return report("graph_message_passing_backward: the graph does not fit shared memory",
                                             error, error_len);
      const gmp::BackwardArgs<T> args{
          static_cast<const T*>(grad_out), go_sb, go_sn, static_cast<const T*>(h_self), hs_sb, hs_sn,
          static_cast<const T*>(h_nbr), hn_sb, hn_sn, static_cast<const A*>(logits), logits_sb, indptr, indices,
          in_ptr, in_edges, edge_row, static_cast<T*>(grad_h_self), static_cast<T*>(grad_h_nbr), gs_sb, gs_sn,
          static_cast<A*>(grad_logits), static_cast<A*>(grad_bias), static_cast<int>(n), static_cast<int>(e),
          static_cast<int>(max_deg), static_cast<int>(max_in_deg), c, plan.tile_vecs, plan.tile_shift, plan.c_vecs,
          plan.tiles};
      *vectorized = V > 1;
      return report(emu::launch(dim3(b), dim3(gmp::kThreads), plan.smem, reverse,
                                gmp::graph_message_passing_bwd_kernel<T, V>, args),
                    error, error_len);
    };
    constexpr int kVec = cuda::kVec16<T>;
    if (gmp::can_vectorize(kVec, c, {grad_out, h_self, h_nbr, grad_h_self, grad_h_nbr},
                           {go_sb, go_sn, hs_sb, hs_sn, hn_sb, hn_sn, gs_sb, gs_sn})) {
      return run(std::integral_constant<int, kVec>());
    }
    return run(std::integral_constant<int, 1>());
  });
}

// relative_location_loss over `grid` persistent blocks; partial: [grid, 2] doubles. plan_out (out): staged tables,
// per-relation gradients in shared memory, lanes per landmark.
int emu_rll(int dtype, const void* pred, int64_t p_sb, int64_t p_sn, int64_t p_sc, const void* target, int64_t t_sb,
            int64_t t_sn, int64_t t_sc, const void* landmark_weight, const int64_t* anchor, const int64_t* indptr,
            const int64_t* member, const void* weight, const int64_t* point_ptr, const int64_t* point_rel,
            const void* point_coef, const void* grad_out, void* loss_none, void* grad_pred, double* partial,
            int64_t b, int64_t n, int64_t r, int64_t m, int64_t criterion, double omega1, double omega2,
            double epsilon, double grad_scale, int64_t smem_budget, int64_t grid, int reverse, int* plan_out,
            char* error, int64_t error_len) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const rll::Plan plan = rll::make_plan<A>(n, r, m, landmark_weight != nullptr, static_cast<size_t>(smem_budget));
    if (plan.smem > static_cast<size_t>(smem_budget)) {
      return report("relative_location_loss: the relations do not fit shared memory", error, error_len);
    }
    plan_out[0] = plan.staged;
    plan_out[1] = plan.g_shared;
    plan_out[2] = plan.group;
    std::vector<A> g_global(plan.g_shared ? 0 : grid * r * 2);
    const rll::KernelArgs<T, A> args{static_cast<const T*>(pred), static_cast<const T*>(target), p_sb, p_sn, p_sc,
                                     t_sb, t_sn, t_sc, static_cast<const A*>(landmark_weight), anchor, indptr, member,
                                     static_cast<const A*>(weight), point_ptr, point_rel,
                                     static_cast<const A*>(point_coef), static_cast<const A*>(grad_out),
                                     static_cast<A*>(loss_none), static_cast<A*>(grad_pred), partial,
                                     plan.g_shared ? nullptr : g_global.data(), b, static_cast<int>(n),
                                     static_cast<int>(r), static_cast<int>(m),
                                     rll::CriterionParams<A>(omega1, omega2, epsilon), static_cast<A>(grad_scale),
                                     plan.group};
    const auto run = [&](auto c_tag, auto staged_tag) {
      constexpr int64_t C = decltype(c_tag)::value;
      constexpr bool kStaged = decltype(staged_tag)::value;
      return report(emu::launch(dim3(grid), dim3(rll::kThreads), plan.smem, reverse,
                                rll::relative_location_loss_kernel<T, A, C, kStaged>, args),
                    error, error_len);
    };
    const auto run_criterion = [&](auto staged_tag) {
      if (criterion == rll::kMse) return run(std::integral_constant<int64_t, rll::kMse>(), staged_tag);
      if (criterion == rll::kL1) return run(std::integral_constant<int64_t, rll::kL1>(), staged_tag);
      return run(std::integral_constant<int64_t, rll::kSoftWing>(), staged_tag);
    };
    return plan.staged ? run_criterion(std::true_type()) : run_criterion(std::false_type());
  });
}

// graph_conv's epilogue: out = act(scale * y + shift) (+ residual) over [rows, C]; blocks = 0: the launcher's grid.
int emu_gconv_epilogue(int dtype, const void* y, const void* scale, const void* shift, const void* residual,
                       void* out, int64_t rows, int64_t c, int relu, int64_t blocks, int reverse, char* error,
                       int64_t error_len) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const gconv::EpilogueArgs<T> args{static_cast<const T*>(y), static_cast<const A*>(scale),
                                      static_cast<const A*>(shift), static_cast<const T*>(residual),
                                      static_cast<T*>(out), rows, c, relu != 0};
    const int64_t grid = blocks > 0 ? blocks : gconv::elementwise_blocks(rows * c);
    return report(emu::launch(dim3(grid), dim3(gconv::kThreads), 0, reverse, gconv::graph_conv_epilogue_kernel<T>,
                              args),
                  error, error_len);
  });
}

// graph_conv's BatchNorm sums: partial [sums_blocks(rows), 2, C] in the accumulation type.
int emu_gconv_sums(int dtype, const void* grad_out, const void* y, const void* scale, const void* shift,
                   const void* mean, void* partial, int64_t rows, int64_t c, int relu, int reverse, char* error,
                   int64_t error_len) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const gconv::SumsArgs<T> args{static_cast<const T*>(grad_out), static_cast<const T*>(y),
                                  static_cast<const A*>(scale), static_cast<const A*>(shift),
                                  static_cast<const A*>(mean), static_cast<A*>(partial), rows, c,
                                  gconv::kRowsPerBlock, relu != 0};
    return report(emu::launch(dim3(gconv::sums_blocks(rows)), dim3(gconv::kThreads), 0, reverse,
                              gconv::graph_conv_sums_kernel<T>, args),
                  error, error_len);
  });
}

// graph_conv's prologue: grad_y over [rows, C]; blocks = 0: the launcher's grid.
int emu_gconv_prologue(int dtype, const void* grad_out, const void* y, const void* scale, const void* shift,
                       const void* mean, const void* k0, const void* ky, void* grad_y, int64_t rows, int64_t c,
                       int relu, int64_t blocks, int reverse, char* error, int64_t error_len) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const gconv::PrologueArgs<T> args{static_cast<const T*>(grad_out), static_cast<const T*>(y),
                                      static_cast<const A*>(scale), static_cast<const A*>(shift),
                                      static_cast<const A*>(mean), static_cast<const A*>(k0),
                                      static_cast<const A*>(ky), static_cast<T*>(grad_y), rows, c, relu != 0};
    const int64_t grid = blocks > 0 ? blocks : gconv::elementwise_blocks(rows * c);
    return report(emu::launch(dim3(grid), dim3(gconv::kThreads), 0, reverse, gconv::graph_conv_prologue_kernel<T>,
                              args),
                  error, error_len);
  });
}

}  // extern "C"
