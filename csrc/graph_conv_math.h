// Math of graph_conv's epilogue (forward) and prologue (backward) shared by the CPU kernels (g++), the CUDA kernels
// (nvcc) and their CPU emulation: one element of one channel at a time, in the accumulation type A. Torch-free.
//
//   forward:   out = act(z) (+ residual),  z = scale * y + shift,  scale = gamma * invstd, shift = beta - mean * scale
//   backward:  grad z = grad out where act passes (z > 0 for relu, everywhere without it)
//              grad y = scale * grad z - k0 - ky * (y - mean)
//              batch statistics: k0 = scale * mean(grad z), ky = scale * invstd^2 * mean(grad z (y - mean));
//              given statistics: k0 = ky = 0
#pragma once

#include "common_math.h"

namespace structalign {
namespace gconv {

template <typename A>
STRUCTALIGN_HD A epilogue(A y, A scale, A shift, bool relu, A residual) {
  A z = scale * y + shift;
  if (relu) z = z > A(0) ? z : A(0);
  return z + residual;
}

template <typename A>
STRUCTALIGN_HD A grad_z(A grad_out, A y, A scale, A shift, bool relu) {
  return relu && !(scale * y + shift > A(0)) ? A(0) : grad_out;
}

template <typename A>
STRUCTALIGN_HD A prologue(A grad_out, A y, A scale, A shift, A mean, A k0, A ky, bool relu) {
  return scale * grad_z(grad_out, y, scale, shift, relu) - k0 - ky * (y - mean);
}

}  // namespace gconv
}  // namespace structalign
