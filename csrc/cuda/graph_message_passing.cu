// CUDA launchers of graph_message_passing and its fused backward (kernels: graph_message_passing_kernels.cuh).
// The graph's values are checked in the kernels (device asserts): checking them here would need a device-to-host
// copy, a synchronisation per call that also breaks CUDA-graph capture. The transposed graph comes from the caller
// (LandmarkGraph caches it), so a backward is one kernel plus the sums over faces of grad bias and shared logits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "common.h"
#include "cuda/graph_message_passing_kernels.cuh"
#include "cuda/launch.h"
#include "cuda/graph_message_passing_launch.h"
#include "graph_message_passing.h"

namespace structalign {

namespace {

// The plan of a launch, or an error naming the sizes when the graph does not fit in shared memory.
void check_plan(const char* op, const gmp::Plan& plan, int64_t n, int64_t e, size_t budget) {
  TORCH_CHECK(plan.tile_vecs > 0, op, ": a graph of N = ", n, " nodes and E = ", e,
              " edges does not fit the CUDA kernel's shared memory (", budget, " bytes a block on this device)");
  TORCH_CHECK((static_cast<int64_t>(n) << plan.tile_shift) <= std::numeric_limits<int32_t>::max(), op, ": N = ", n,
              " nodes is too many for the CUDA kernel");
}

template <typename T, int V>
void launch_forward(const at::Tensor& h_self, const at::Tensor& h_nbr, const at::Tensor& logits,
                    const at::Tensor& indptr, const at::Tensor& indices, const T* bias, at::Tensor& out,
                    int64_t max_deg) {
  const int64_t b = h_self.size(0), n = h_self.size(1), c = h_self.size(2), e = indices.numel();
  const size_t budget = shared_memory_budget();
  const gmp::Plan plan = gmp::forward_plan<T, V>(n, e, c, budget);
  check_plan("graph_message_passing", plan, n, e, budget);
  TORCH_CHECK(plan.tiles <= 65535, "graph_message_passing: C = ", c, " channels are too many for the CUDA grid");
  using A = acc_t<T>;
  const gmp::ForwardArgs<T> args{reinterpret_cast<const T*>(h_self.data_ptr()),
                                 h_self.stride(0),
                                 h_self.stride(1),
                                 reinterpret_cast<const T*>(h_nbr.data_ptr()),
                                 h_nbr.stride(0),
                                 h_nbr.stride(1),
                                 logits.data_ptr<A>(),
                                 logits.dim() == 2 ? e : 0,
                                 indptr.data_ptr<int64_t>(),
                                 indices.data_ptr<int64_t>(),
                                 bias,
                                 reinterpret_cast<T*>(out.data_ptr()),
                                 static_cast<int>(n),
                                 static_cast<int>(e),
                                 static_cast<int>(max_deg),
                                 c,
                                 plan.tile_vecs,
                                 plan.tile_shift,
                                 plan.c_vecs};
  const auto kernel = gmp::graph_message_passing_fwd_kernel<T, V>;
  allow_shared_memory(kernel, plan.smem);
  kernel<<<dim3(static_cast<unsigned int>(b), static_cast<unsigned int>(plan.tiles)), gmp::kThreads, plan.smem,
           at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor graph_message_passing_cuda(const at::Tensor& h_self_in, const at::Tensor& h_nbr_in,
                                      const at::Tensor& logits_in, const at::Tensor& indptr_in,
                                      const at::Tensor& indices_in, const at::Tensor& in_ptr,
                                      const at::Tensor& in_edges, const at::Tensor& edge_row,
                                      const c10::optional<at::Tensor>& bias_in, int64_t max_deg, int64_t max_in_deg) {
  const char* op = "graph_message_passing";
  check_graph_message_passing_args(op, h_self_in, h_nbr_in, logits_in,
                                   {indptr_in, indices_in, in_ptr, in_edges, edge_row, max_deg, max_in_deg}, bias_in);
  TORCH_INTERNAL_ASSERT(h_self_in.is_cuda());
  const c10::cuda::CUDAGuard guard(h_self_in.device());
  at::Tensor out = at::empty(h_self_in.sizes(), h_self_in.options());
  graph_message_passing_forward_into(h_self_in, h_nbr_in, logits_in, indptr_in, indices_in, bias_in, out, max_deg);
  return out;
}

template <typename T, int V>
void launch_backward(const at::Tensor& grad_out, const at::Tensor& h_self, const at::Tensor& h_nbr,
                     const at::Tensor& logits, const GraphArgs& graph, GraphBackwardGrads& grads,
                     const at::Tensor& bias_sums) {
  const int64_t b = h_self.size(0), n = h_self.size(1), c = h_self.size(2), e = graph.indices.numel();
  const size_t budget = shared_memory_budget();
  const gmp::Plan plan = gmp::backward_plan<T, V>(n, e, c, grads.need_logits, grads.need_bias, budget);
  check_plan("graph_message_passing_backward", plan, n, e, budget);
  using A = acc_t<T>;
  const auto data = [](const at::Tensor& t, bool need) { return need ? reinterpret_cast<T*>(t.data_ptr()) : nullptr; };
  const gmp::BackwardArgs<T> args{reinterpret_cast<const T*>(grad_out.data_ptr()),
                                  grad_out.stride(0),
                                  grad_out.stride(1),
                                  reinterpret_cast<const T*>(h_self.data_ptr()),
                                  h_self.stride(0),
                                  h_self.stride(1),
                                  reinterpret_cast<const T*>(h_nbr.data_ptr()),
                                  h_nbr.stride(0),
                                  h_nbr.stride(1),
                                  logits.data_ptr<A>(),
                                  logits.dim() == 2 ? e : 0,
                                  graph.indptr.data_ptr<int64_t>(),
                                  graph.indices.data_ptr<int64_t>(),
                                  graph.in_ptr.data_ptr<int64_t>(),
                                  graph.in_edges.data_ptr<int64_t>(),
                                  graph.edge_row.data_ptr<int64_t>(),
                                  data(grads.grad_h_self, grads.need_h_self),
                                  data(grads.grad_h_nbr, grads.need_h_nbr),
                                  grads.grad_stride_b(),
                                  grads.grad_stride_n(),
                                  grads.need_logits ? grads.grad_logits_faces.data_ptr<A>() : nullptr,
                                  grads.need_bias ? bias_sums.data_ptr<A>() : nullptr,
                                  static_cast<int>(n),
                                  static_cast<int>(e),
                                  static_cast<int>(graph.max_deg),
                                  static_cast<int>(graph.max_in_deg),
                                  c,
                                  plan.tile_vecs,
                                  plan.tile_shift,
                                  plan.c_vecs,
                                  plan.tiles};
  const auto kernel = gmp::graph_message_passing_bwd_kernel<T, V>;
  allow_shared_memory(kernel, plan.smem);
  kernel<<<static_cast<unsigned int>(b), gmp::kThreads, plan.smem, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_message_passing_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& h_self_in, const at::Tensor& h_nbr_in,
    const at::Tensor& logits_in, const at::Tensor& indptr_in, const at::Tensor& indices_in,
    const at::Tensor& in_ptr_in, const at::Tensor& in_edges_in, const at::Tensor& edge_row_in, int64_t max_deg,
    int64_t max_in_deg, std::array<bool, 4> output_mask) {
  const char* op = "graph_message_passing_backward";
  const GraphArgs graph{indptr_in, indices_in, in_ptr_in, in_edges_in, edge_row_in, max_deg, max_in_deg};
  check_graph_message_passing_args(op, h_self_in, h_nbr_in, logits_in, graph, c10::nullopt);
  check_graph_message_passing_grad_out(grad_out_in, h_self_in);
  TORCH_INTERNAL_ASSERT(h_self_in.is_cuda());
  const c10::cuda::CUDAGuard guard(h_self_in.device());
  GraphBackwardGrads grads(h_self_in, logits_in, output_mask);
  graph_message_passing_backward_into(grad_out_in, h_self_in, h_nbr_in, logits_in, graph, grads);
  return grads.result(logits_in);
}

}  // namespace

void graph_message_passing_forward_into(const at::Tensor& h_self_in, const at::Tensor& h_nbr_in,
                                        const at::Tensor& logits_in, const at::Tensor& indptr_in,
                                        const at::Tensor& indices_in, const c10::optional<at::Tensor>& bias_in,
                                        at::Tensor& out, int64_t max_deg) {
  const char* op = "graph_message_passing";
  const int64_t b = h_self_in.size(0), c = h_self_in.size(2);
  TORCH_CHECK(b <= std::numeric_limits<int32_t>::max(), op, ": B = ", b, " faces exceed the CUDA grid");
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.sizes() == h_self_in.sizes());
  if (out.numel() == 0) return;
  const at::Tensor h_self = channels_contiguous(h_self_in), h_nbr = channels_contiguous(h_nbr_in);
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor logits = logits_in.to(acc_scalar_type(h_self.scalar_type())).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_self.scalar_type(), "graph_message_passing_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    constexpr int kVec = cuda::kVec16<T>;
    const T* bias_ptr = bias.defined() ? cuda_ptr<scalar_t>(bias) : nullptr;
    if (gmp::can_vectorize(kVec, c, {h_self.data_ptr(), h_nbr.data_ptr(), out.data_ptr(), bias_ptr},
                           {h_self.stride(0), h_self.stride(1), h_nbr.stride(0), h_nbr.stride(1)})) {
      launch_forward<T, kVec>(h_self, h_nbr, logits, indptr, indices, bias_ptr, out, max_deg);
    } else {
      launch_forward<T, 1>(h_self, h_nbr, logits, indptr, indices, bias_ptr, out, max_deg);
    }
  });
}

void graph_message_passing_backward_into(const at::Tensor& grad_out_in, const at::Tensor& h_self_in,
                                         const at::Tensor& h_nbr_in, const at::Tensor& logits_in,
                                         const GraphArgs& graph_in, GraphBackwardGrads& grads) {
  const char* op = "graph_message_passing_backward";
  const int64_t b = h_self_in.size(0), n = h_self_in.size(1), c = h_self_in.size(2);
  TORCH_CHECK(b <= std::numeric_limits<int32_t>::max(), op, ": B = ", b, " faces exceed the CUDA grid");
  if (b * n * c == 0) {
    grads.zero();
    return;
  }
  if (!(grads.need_h_self || grads.need_h_nbr || grads.need_logits || grads.need_bias)) return;
  const at::ScalarType acc = acc_scalar_type(h_self_in.scalar_type());
  // grad_out is read in place whatever its batch / row strides; h_self and h_nbr only for grad logits.
  const at::Tensor grad_out = channels_contiguous(grad_out_in);
  const at::Tensor h_self = grads.need_logits ? channels_contiguous(h_self_in) : grad_out;
  const at::Tensor h_nbr = grads.need_logits ? channels_contiguous(h_nbr_in) : grad_out;
  const at::Tensor indptr = graph_in.indptr.contiguous(), indices = graph_in.indices.contiguous();
  const at::Tensor in_ptr = graph_in.in_ptr.contiguous(), in_edges = graph_in.in_edges.contiguous();
  const at::Tensor edge_row = graph_in.edge_row.contiguous();
  const GraphArgs graph{indptr, indices, in_ptr, in_edges, edge_row, graph_in.max_deg, graph_in.max_in_deg};
  const at::Tensor logits = logits_in.to(acc).contiguous();
  // Each face's sums of grad_out over nodes, added over faces by one reduction (deterministic).
  const at::Tensor bias_sums = grads.need_bias ? at::empty({b, c}, logits.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_self.scalar_type(),
                                  "graph_message_passing_backward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    constexpr int kVec = cuda::kVec16<T>;
    const void* out_self = grads.need_h_self ? grads.grad_h_self.data_ptr() : nullptr;
    const void* out_nbr = grads.need_h_nbr ? grads.grad_h_nbr.data_ptr() : nullptr;
    if (gmp::can_vectorize(kVec, c, {grad_out.data_ptr(), h_self.data_ptr(), h_nbr.data_ptr(), out_self, out_nbr},
                           {grad_out.stride(0), grad_out.stride(1), h_self.stride(0), h_self.stride(1),
                            h_nbr.stride(0), h_nbr.stride(1), grads.grad_stride_b(), grads.grad_stride_n()})) {
      launch_backward<T, kVec>(grad_out, h_self, h_nbr, logits, graph, grads, bias_sums);
    } else {
      launch_backward<T, 1>(grad_out, h_self, h_nbr, logits, graph, grads, bias_sums);
    }
  });
  if (grads.need_bias) grads.grad_bias = bias_sums.sum(0).to(h_self_in.scalar_type());
}

}  // namespace structalign

TORCH_LIBRARY_IMPL(structalign, CUDA, m) {
  m.impl("graph_message_passing", &structalign::graph_message_passing_cuda);
  m.impl("graph_message_passing_backward", &structalign::graph_message_passing_backward_cuda);
}
