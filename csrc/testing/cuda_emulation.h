// CPU emulation of the CUDA execution model, enough to run the kernels of csrc/cuda/*_kernels.cuh on a machine
// without a GPU. Test-only: csrc/testing/emulated_ops.cpp wraps the kernels in a C API that
// tests/ops/test_cpp_cuda_emulation.py loads with ctypes; the extension does not compile this.
//
// Each thread of a block is a fiber (ucontext) running the kernel. The scheduler runs the block's fibers one after
// another up to their next barrier (__syncthreads, or a warp shuffle for the warp's 32 lanes), warp after warp,
// each warp running through its shuffles up to the next block barrier before the next warp starts, in ascending or
// descending thread order: a race across a missing barrier then gives different results in the two orders. A
// barrier that not every thread of the block (or lane of the warp) reaches is reported instead of hanging; a
// device check ends the launch with its message; vector loads and stores check their alignment; shared memory
// starts filled with 0xff bytes (NaN / -1), so reads of unwritten shared memory show.
#pragma once

#define STRUCTALIGN_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>
#include <vector_types.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#define __launch_bounds__(...)

namespace structalign {
namespace emu {

struct Fiber {
  enum State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };
  ucontext_t context;
  std::vector<char> stack;
  uint3 thread_idx;
  State state = kRunnable;
};

// The launch being emulated (one at a time, on the calling thread).
struct Launch {
  dim3 grid, block;
  uint3 block_idx;
  std::vector<unsigned char> smem;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> lanes;  // one exchange slot per thread, for warp shuffles
  ucontext_t scheduler;
  Fiber* current = nullptr;
  std::function<void()> body;
  std::string error;
};

inline Launch*& active() {
  static Launch* launch = nullptr;
  return launch;
}

inline void yield() {
  Launch& l = *active();
  swapcontext(&l.current->context, &l.scheduler);
}

// A failed device check: record the message and never resume this thread (the launch stops).
[[noreturn]] inline void check_failed(const char* msg) {
  Launch& l = *active();
  if (l.error.empty()) l.error = msg;
  l.current->state = Fiber::kDone;
  yield();
  __builtin_unreachable();
}

inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) check_failed("emulation: misaligned vector access");
}

inline unsigned char* shared_memory() {
  return active()->smem.data();
}

inline void run_fiber() {
  active()->body();
  active()->current->state = Fiber::kDone;  // then uc_link returns to the scheduler
}

// Runs one block to completion; false with l.error set on a failed check or a barrier that cannot complete.
inline bool run_block(Launch& l, bool reverse) {
  const int threads = static_cast<int>(l.block.x * l.block.y * l.block.z);
  const size_t stack_bytes = 256 * 1024;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = l.fibers[t];
    f.stack.resize(stack_bytes);
    f.state = Fiber::kRunnable;
    f.thread_idx = uint3{static_cast<unsigned>(t) % l.block.x, static_cast<unsigned>(t) / l.block.x % l.block.y,
                         static_cast<unsigned>(t) / (l.block.x * l.block.y)};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = stack_bytes;
    f.context.uc_link = &l.scheduler;
    makecontext(&f.context, &run_fiber, 0);
  }
  std::fill(l.smem.begin(), l.smem.end(), 0xff);
  const int warps = (threads + 31) / 32;
  while (true) {
    // Warp after warp, each as far as it goes (through its shuffles, up to a block barrier), so warps get as far
    // apart as they can on a GPU.
    for (int k = 0; k < warps; ++k) {
      const int w = reverse ? warps - 1 - k : k, first = w * 32, lanes = std::min(32, threads - first);
      while (true) {
        for (int q = 0; q < lanes; ++q) {
          Fiber& f = l.fibers[first + (reverse ? lanes - 1 - q : q)];
          if (f.state != Fiber::kRunnable) continue;
          l.current = &f;
          swapcontext(&l.scheduler, &f.context);
          if (!l.error.empty()) return false;
        }
        int at_shuffle = 0;
        for (int q = 0; q < lanes; ++q) at_shuffle += l.fibers[first + q].state == Fiber::kWarpBarrier;
        if (at_shuffle < 32) break;
        for (int q = 0; q < lanes; ++q) l.fibers[first + q].state = Fiber::kRunnable;
      }
    }
    int done = 0, at_block = 0;
    for (const Fiber& f : l.fibers) {
      done += f.state == Fiber::kDone;
      at_block += f.state == Fiber::kBlockBarrier;
    }
    if (done == threads) return true;
    if (at_block == threads) {
      for (Fiber& f : l.fibers) f.state = Fiber::kRunnable;
      continue;
    }
    l.error = done + at_block == threads ? "emulation: __syncthreads not reached by every thread of the block"
                                         : "emulation: a warp shuffle not reached by every lane of the warp";
    return false;
  }
}

// Runs kernel<<<grid, block, smem_bytes>>>(args...) block after block; returns "" or the error that stopped it.
template <typename... Params, typename... Args>
std::string launch(dim3 grid, dim3 block, size_t smem_bytes, bool reverse, void (*kernel)(Params...),
                   Args&&... args) {
  Launch l;
  l.grid = grid;
  l.block = block;
  l.smem.resize(smem_bytes);  // exactly: AddressSanitizer builds catch accesses past the end
  l.fibers.resize(block.x * block.y * block.z);
  l.lanes.resize(l.fibers.size());
  l.body = [&] { kernel(args...); };
  active() = &l;
  for (unsigned y = 0; y < grid.y && l.error.empty(); ++y) {
    for (unsigned x = 0; x < grid.x && l.error.empty(); ++x) {
      l.block_idx = uint3{x, y, 0};
      run_block(l, reverse);
    }
  }
  active() = nullptr;
  return l.error;
}

}  // namespace emu
}  // namespace structalign

#define threadIdx (::structalign::emu::active()->current->thread_idx)
#define blockIdx (::structalign::emu::active()->block_idx)
#define blockDim (::structalign::emu::active()->block)
#define gridDim (::structalign::emu::active()->grid)

inline void __syncthreads() {
  ::structalign::emu::active()->current->state = ::structalign::emu::Fiber::kBlockBarrier;
  ::structalign::emu::yield();
}

// Full-warp butterfly exchange: every lane writes its value, waits for the warp, reads its partner's, waits again.
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  namespace emu = ::structalign::emu;
  static_assert(sizeof(T) <= sizeof(uint64_t), "emulated shuffles move at most 8 bytes");
  emu::Launch& l = *emu::active();
  if (mask != 0xffffffffu) emu::check_failed("emulation: only full-warp shuffles are emulated");
  const int t = static_cast<int>(threadIdx.x), lane = t % 32, partner = lane ^ lane_mask;
  std::memcpy(&l.lanes[t], &value, sizeof(T));
  l.current->state = emu::Fiber::kWarpBarrier;
  emu::yield();
  T out = value;
  if (partner / width == lane / width) std::memcpy(&out, &l.lanes[t - lane + partner], sizeof(T));
  l.current->state = emu::Fiber::kWarpBarrier;
  emu::yield();
  return out;
}

// Read-only load; checks the alignment a real load of T needs.
template <typename T>
T __ldg(const T* p) {
  ::structalign::emu::check_aligned(p, alignof(T));
  return *p;
}
