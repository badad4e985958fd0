// Host-side helpers shared by the ops' schema files, CPU kernels and CUDA launchers: dtype predicates, the
// accumulation dtype, argument checks that name the op and the argument, and the multi-ISA clone attribute of the
// CPU hot loops. Checks here read metadata only (shapes, dtypes, devices), never values, so they cost nothing on
// the GPU.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <utility>

namespace structalign {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Accumulation dtype of an op whose main input has dtype t: float64 for float64, float32 otherwise.
inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// t is a 1-D int64 tensor with `numel` entries (numel < 0: any length); `count` names numel in the error (e.g.
// "N + 1").
inline void check_index_tensor(const char* op, const char* name, const at::Tensor& t, int64_t numel = -1,
                               const char* count = "") {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong, op, ": ", name, " must be a 1-D int64 tensor, got ",
              t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(numel < 0 || t.numel() == numel, op, ": ", name, " must have ", count, *count ? " = " : "", numel,
              " entries, got ", t.numel());
}

// t is a 1-D tensor of dtype `dtype` with `numel` entries (`count` as in check_index_tensor).
inline void check_vector_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                                int64_t numel, const char* count = "") {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == dtype, op, ": ", name, " must be a 1-D ", dtype,
              " tensor, got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.numel() == numel, op, ": ", name, " must have ", count, *count ? " = " : "", numel, " entries, got ",
              t.numel());
}

// Every tensor of `others` is on ref's device (same type and index: two GPUs are an error).
inline void check_same_device(const char* op, const char* ref_name, const at::Tensor& ref,
                              std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->device() == ref.device(), op, ": ", name, " is on ", t->device(), " but ", ref_name, " is on ",
                ref.device());
  }
}

// A graph or relation size the kernels index with int32.
inline void check_int32_size(const char* op, const char* what, int64_t value) {
  TORCH_CHECK(value >= 0 && value <= INT32_MAX, op, ": ", what, " = ", value, " is outside [0, 2^31)");
}

// h (Tensor[B, N, C]) with unit stride over channels: a view when it already has one (any batch / row strides are
// read in place), a copy otherwise.
inline at::Tensor channels_contiguous(const at::Tensor& h) {
  return (h.stride(2) == 1 || h.size(2) <= 1) ? h : h.contiguous();
}

}  // namespace structalign

// The CPU hot loops are compiled for AVX-512, AVX2 + FMA and baseline x86-64 (the extension is built without
// -march); the dynamic loader picks the widest the CPU supports.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define STRUCTALIGN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define STRUCTALIGN_CPU_CLONES
#endif
