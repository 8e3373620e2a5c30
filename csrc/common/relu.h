// ReLU per-element math (csrc/KERNELS.md: relu_fwd, relu_bwd), shared by the CPU and CUDA kernels.
// PyTorch's semantics (torch.relu and its threshold_backward, csrc/KERNELS.md "ReLU and NaN"): the derivative at
// x == 0 is 0, and a NaN input sets the bit, so that y = NaN and the gradient passes through it.
#pragma once

#include "config.h"

namespace fastjac {

// The mask bit of x (compute type A): !(x <= 0), i.e. x > 0 or x is NaN. threshold_backward(g, y, 0) passes g
// where !(y <= 0), and y = relu(x) is NaN exactly where x is, so the bit is that test on x: nothing else is stored.
template <typename A>
FASTJAC_HOST_DEVICE inline bool relu_on(A x) {
  return !(x <= A(0));
}

// v where the mask is set, else 0: a selection, so masked elements are 0 even where v is not finite.
template <typename T>
FASTJAC_HOST_DEVICE inline T relu_select(bool on, T v) {
  return on ? v : T(0);
}

}  // namespace fastjac
