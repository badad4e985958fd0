// CPU kernels of graph_message_passing: the forward (row softmax + weighted aggregation + bias in one pass per
// output row) and the fused backward (grad h_self, a race-free gather for grad h_nbr over the transposed graph the
// caller passes, grad logits through the softmax Jacobian, grad bias). Nothing of size N x N is built.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/graph_aggregation.h"
#include "graph_message_passing.h"

namespace structalign {

namespace {

// out (Tensor[B, N, C]) face by face: out_i = sum_e A_e v_e (+ bias).
template <typename T>
void forward_kernel(const T* h_self, Rows hs, const T* h_nbr, Rows hn, const acc_t<T>* logits,
                    const acc_t<T>* shared_attn, bool per_face, const int64_t* indptr, const int64_t* indices,
                    const T* bias, T* out, int64_t b_size, int64_t n, int64_t c, int64_t e) {
  using A = acc_t<T>;
  at::parallel_for(0, b_size, face_grain(n, c), [&](int64_t b_begin, int64_t b_end) {
    std::vector<A> scratch(std::is_same_v<T, A> ? 0 : c), attn_scratch(per_face ? e : 0);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const A* attn = face_attn(logits, shared_attn, per_face, b, indptr, n, e, attn_scratch);
      aggregate_face(h_self, hs, h_nbr, hn, attn, indptr, indices, bias, out, Rows{n * c, c}, b, n, c, scratch);
    }
  });
}

template <typename T>
void backward_kernel(const T* grad_out, Rows go, const T* h_self, Rows hs, const T* h_nbr, Rows hn,
                     const acc_t<T>* logits, const acc_t<T>* shared_attn, bool per_face, const int64_t* indptr,
                     const int64_t* indices, Transposed tg, T* grad_h_self, T* grad_h_nbr, acc_t<T>* grad_logits,
                     int64_t b_size, int64_t n, int64_t c, int64_t e) {
  using A = acc_t<T>;
  at::parallel_for(0, b_size, face_grain(n, c), [&](int64_t b_begin, int64_t b_end) {
    std::vector<A> scratch(std::is_same_v<T, A> ? 0 : c), attn_scratch(per_face ? e : 0);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const A* a_b = face_attn(logits, shared_attn, per_face, b, indptr, n, e, attn_scratch);
      aggregate_face_backward(grad_out, go, h_self, hs, h_nbr, hn, a_b, indptr, indices, tg, grad_h_self,
                              grad_h_nbr, Rows{n * c, c}, grad_logits == nullptr ? nullptr : grad_logits + b * e, b,
                              n, c, scratch);
    }
  });
}

at::Tensor graph_message_passing_cpu(const at::Tensor& h_self_in, const at::Tensor& h_nbr_in,
                                     const at::Tensor& logits_in, const at::Tensor& indptr_in,
                                     const at::Tensor& indices_in, const at::Tensor& in_ptr,
                                     const at::Tensor& in_edges, const at::Tensor& edge_row,
                                     const c10::optional<at::Tensor>& bias_in, int64_t max_deg, int64_t max_in_deg) {
  const char* op = "graph_message_passing";
  check_graph_message_passing_args(op, h_self_in, h_nbr_in, logits_in,
                                   {indptr_in, indices_in, in_ptr, in_edges, edge_row, max_deg, max_in_deg}, bias_in);
  TORCH_INTERNAL_ASSERT(h_self_in.device().is_cpu());
  const int64_t b = h_self_in.size(0), n = h_self_in.size(1), c = h_self_in.size(2);
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  check_rows(op, indptr, indices, n, max_deg);
  at::Tensor out = at::empty({b, n, c}, h_self_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor h_self = channels_contiguous(h_self_in), h_nbr = channels_contiguous(h_nbr_in);
  const at::Tensor logits = logits_in.to(acc_scalar_type(h_self.scalar_type())).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const bool per_face = logits.dim() == 2;
  const int64_t e = indices.numel();
  // Shared logits: one softmax for all faces, here; per-face logits: each face's inside the parallel loop.
  at::Tensor shared_attn = at::empty({per_face ? 0 : e}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_self.scalar_type(), "graph_message_passing_cpu", [&] {
    using A = acc_t<scalar_t>;
    if (!per_face) graph_softmax(logits.data_ptr<A>(), indptr.data_ptr<int64_t>(), n, shared_attn.data_ptr<A>());
    forward_kernel<scalar_t>(h_self.data_ptr<scalar_t>(), Rows::of(h_self), h_nbr.data_ptr<scalar_t>(),
                             Rows::of(h_nbr), logits.data_ptr<A>(), shared_attn.data_ptr<A>(), per_face,
                             indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(),
                             bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), b, n, c,
                             e);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_message_passing_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& h_self_in, const at::Tensor& h_nbr_in,
    const at::Tensor& logits_in, const at::Tensor& indptr_in, const at::Tensor& indices_in,
    const at::Tensor& in_ptr_in, const at::Tensor& in_edges_in, const at::Tensor& edge_row_in, int64_t max_deg,
    int64_t max_in_deg, std::array<bool, 4> output_mask) {
  const char* op = "graph_message_passing_backward";
  check_graph_message_passing_args(
      op, h_self_in, h_nbr_in, logits_in,
      {indptr_in, indices_in, in_ptr_in, in_edges_in, edge_row_in, max_deg, max_in_deg}, c10::nullopt);
  check_graph_message_passing_grad_out(grad_out_in, h_self_in);
  TORCH_INTERNAL_ASSERT(h_self_in.device().is_cpu());
  const int64_t b = h_self_in.size(0), n = h_self_in.size(1), c = h_self_in.size(2), e = indices_in.numel();
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor in_ptr = in_ptr_in.contiguous(), in_edges = in_edges_in.contiguous();
  const at::Tensor edge_row = edge_row_in.contiguous();
  check_rows(op, indptr, indices, n, max_deg);
  check_transposed(op, indptr, indices, in_ptr, in_edges, edge_row, n, max_in_deg);
  GraphBackwardGrads grads(h_self_in, logits_in, output_mask);
  const at::ScalarType acc = acc_scalar_type(h_self_in.scalar_type());
  const bool per_face = logits_in.dim() == 2;
  if (b * n * c == 0) {
    grads.zero();
    return grads.result(logits_in);
  }
  const at::Tensor grad_out = channels_contiguous(grad_out_in);
  if (grads.need_bias) grads.grad_bias = grad_out.sum(at::IntArrayRef{0, 1}, false, acc).to(h_self_in.scalar_type());
  if (grads.need_h_self || grads.need_h_nbr || grads.need_logits) {
    const at::Tensor h_self = channels_contiguous(h_self_in), h_nbr = channels_contiguous(h_nbr_in);
    const at::Tensor logits = logits_in.to(acc).contiguous();
    at::Tensor shared_attn = at::empty({per_face ? 0 : e}, logits.options());
    const Transposed tg{in_ptr.data_ptr<int64_t>(), in_edges.data_ptr<int64_t>(), edge_row.data_ptr<int64_t>()};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_self.scalar_type(),
                                    "graph_message_passing_backward_cpu", [&] {
      using A = acc_t<scalar_t>;
      if (!per_face) graph_softmax(logits.data_ptr<A>(), indptr.data_ptr<int64_t>(), n, shared_attn.data_ptr<A>());
      backward_kernel<scalar_t>(
          grad_out.data_ptr<scalar_t>(), Rows::of(grad_out), h_self.data_ptr<scalar_t>(), Rows::of(h_self),
          h_nbr.data_ptr<scalar_t>(), Rows::of(h_nbr), logits.data_ptr<A>(), shared_attn.data_ptr<A>(), per_face,
          indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), tg,
          grads.need_h_self ? grads.grad_h_self.data_ptr<scalar_t>() : nullptr,
          grads.need_h_nbr ? grads.grad_h_nbr.data_ptr<scalar_t>() : nullptr,
          grads.need_logits ? grads.grad_logits_faces.data_ptr<A>() : nullptr, b, n, c, e);
    });
  }
  return grads.result(logits_in);
}

}  // namespace

}  // namespace structalign

TORCH_LIBRARY_IMPL(structalign, CPU, m) {
  m.impl("graph_message_passing", &structalign::graph_message_passing_cpu);
  m.impl("graph_message_passing_backward", &structalign::graph_message_passing_backward_cpu);
}
