// ReLU per-element math (csrc/KERNELS.md: relu_fwd, relu_bwd), shared by the CPU and CUDA kernels.
// The derivative at x == 0 is 0 (PyTorch's convention); NaN gives a cleared bit and output 0.
#pragma once

#include "config.h"

namespace fastjac {

// The mask bit of x (compute type A): x > 0.
template <typename A>
FASTJAC_HOST_DEVICE inline bool relu_on(A x) {
  return x > A(0);
}

// v where the mask is set, else 0: a selection, so masked elements are 0 even where v is not finite.
template <typename T>
FASTJAC_HOST_DEVICE inline T relu_select(bool on, T v) {
  return on ? v : T(0);
}

}  // namespace fastjac
