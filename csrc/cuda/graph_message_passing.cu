// CUDA launchers of graph_message_passing and its fused backward (kernels: graph_message_passing_kernels.cuh).
// Index values are checked on the device (kernel asserts): checking them here would need a device-to-host copy,
// a synchronisation per call that also breaks CUDA-graph capture.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "cuda/cuda_type.h"
#include "graph_message_passing.h"
#include "graph_message_passing_kernels.cuh"

namespace structalign {

namespace {

constexpr int kMaxThreads = 256;

// Channel threads per block: whole warps, at most kMaxThreads, at most C rounded up to a warp.
int channel_threads(int64_t c) {
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (c + 31) / 32 * 32)));
}

template <typename S>
auto* cuda_ptr(const at::Tensor& t) {
  using T = typename CudaType<S>::type;
  return reinterpret_cast<T*>(t.data_ptr<S>());
}

at::Tensor graph_message_passing_cuda(const at::Tensor& h_self_in, const at::Tensor& h_nbr_in,
                                      const at::Tensor& logits_in, const at::Tensor& indptr_in,
                                      const at::Tensor& indices_in, const c10::optional<at::Tensor>& bias_in) {
  check_graph_message_passing_args(h_self_in, h_nbr_in, logits_in, indptr_in, indices_in, bias_in);
  TORCH_INTERNAL_ASSERT(h_self_in.is_cuda());
  const c10::cuda::CUDAGuard guard(h_self_in.device());
  const int64_t b = h_self_in.size(0), n = h_self_in.size(1), c = h_self_in.size(2), e = indices_in.numel();
  TORCH_CHECK(b * n <= std::numeric_limits<int32_t>::max(), "graph_message_passing: B * N = ", b * n,
              " rows exceed the CUDA grid");
  at::Tensor out = at::empty({b, n, c}, h_self_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor h_self = channels_contiguous(h_self_in), h_nbr = channels_contiguous(h_nbr_in);
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor logits = logits_in.to(graph_acc_type(h_self)).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t logits_stride_b = logits.dim() == 2 ? e : 0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_self.scalar_type(), "graph_message_passing_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = typename gmp::Acc<T>::type;
    gmp::graph_message_passing_fwd_kernel<T><<<static_cast<unsigned int>(b * n), channel_threads(c), 0, stream>>>(
        cuda_ptr<scalar_t>(h_self), h_self.stride(0), h_self.stride(1), cuda_ptr<scalar_t>(h_nbr), h_nbr.stride(0),
        h_nbr.stride(1), logits.data_ptr<A>(), logits_stride_b, indptr.data_ptr<int64_t>(),
        indices.data_ptr<int64_t>(), bias.defined() ? cuda_ptr<scalar_t>(bias) : nullptr, cuda_ptr<scalar_t>(out), n,
        c, e);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_message_passing_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& h_self_in, const at::Tensor& h_nbr_in,
    const at::Tensor& logits_in, const at::Tensor& indptr_in, const at::Tensor& indices_in,
    std::array<bool, 4> output_mask) {
  check_graph_message_passing_backward_args(grad_out_in, h_self_in, h_nbr_in, logits_in, indptr_in, indices_in);
  TORCH_INTERNAL_ASSERT(h_self_in.is_cuda());
  const c10::cuda::CUDAGuard guard(h_self_in.device());
  const int64_t b = h_self_in.size(0), n = h_self_in.size(1), c = h_self_in.size(2), e = indices_in.numel();
  TORCH_CHECK(b * n <= std::numeric_limits<int32_t>::max(), "graph_message_passing_backward: B * N = ", b * n,
              " rows exceed the CUDA grid");
  GraphBackwardGrads grads(grad_out_in, h_self_in, logits_in, output_mask);
  const at::ScalarType acc = graph_acc_type(h_self_in);
  const bool per_face = logits_in.dim() == 2;
  if (b * n * c > 0 && grads.any_kernel_output()) {
    const at::Tensor grad_out = channels_contiguous(grad_out_in);
    const at::Tensor h_self = channels_contiguous(h_self_in), h_nbr = channels_contiguous(h_nbr_in);
    const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
    const at::Tensor logits = logits_in.to(acc).contiguous();
    const int64_t sets = per_face ? b : 1;
    at::Tensor attn = at::empty({sets, e}, logits.options());
    at::Tensor edge_row = at::empty({e}, indices.options());
    // The transposed graph: node j's incoming edges in_edges[in_ptr[j] .. in_ptr[j + 1]).
    const at::Tensor in_edges = std::get<1>(at::sort(indices, /*stable=*/true, /*dim=*/0, /*descending=*/false));
    const at::Tensor in_count = at::zeros({n}, indices.options()).index_add_(0, indices, at::ones_like(indices));
    const at::Tensor in_ptr = at::cat({at::zeros({1}, indices.options()), in_count.cumsum(0)});
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int threads = channel_threads(c);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_self.scalar_type(),
                                    "graph_message_passing_backward_cuda", [&] {
      using T = typename CudaType<scalar_t>::type;
      using A = typename gmp::Acc<T>::type;
      const unsigned int softmax_blocks = static_cast<unsigned int>((sets * n + kMaxThreads - 1) / kMaxThreads);
      gmp::graph_message_passing_softmax_kernel<A><<<softmax_blocks, kMaxThreads, 0, stream>>>(
          logits.data_ptr<A>(), indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), attn.data_ptr<A>(),
          edge_row.data_ptr<int64_t>(), sets, n, e);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // Shared memory: one partial per warp for the block reduction, and the row's dot products (up to N).
      const size_t shared = static_cast<size_t>((threads + 31) / 32 + n) * sizeof(A);
      TORCH_CHECK(shared <= 48 * 1024, "graph_message_passing_backward: N = ", n,
                  " nodes exceed the CUDA kernel's shared-memory budget for a row's dot products");
      gmp::graph_message_passing_bwd_kernel<T><<<static_cast<unsigned int>(b * n), threads, shared, stream>>>(
          cuda_ptr<scalar_t>(grad_out), grad_out.stride(0), grad_out.stride(1), cuda_ptr<scalar_t>(h_self),
          h_self.stride(0), h_self.stride(1), cuda_ptr<scalar_t>(h_nbr), h_nbr.stride(0), h_nbr.stride(1),
          attn.data_ptr<A>(), per_face ? e : 0, indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(),
          in_ptr.data_ptr<int64_t>(), in_edges.data_ptr<int64_t>(), edge_row.data_ptr<int64_t>(),
          grads.need_h_self ? cuda_ptr<scalar_t>(grads.grad_h_self) : nullptr,
          grads.need_h_nbr ? cuda_ptr<scalar_t>(grads.grad_h_nbr) : nullptr,
          grads.need_logits ? grads.grad_logits_faces.data_ptr<A>() : nullptr, n, c, e);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    grads.zero();
  }
  return grads.result(logits_in);
}

}  // namespace

}  // namespace structalign

TORCH_LIBRARY_IMPL(structalign, CUDA, m) {
  m.impl("graph_message_passing", &structalign::graph_message_passing_cuda);
  m.impl("graph_message_passing_backward", &structalign::graph_message_passing_backward_cuda);
}
