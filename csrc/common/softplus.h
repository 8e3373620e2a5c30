// Softplus value and derivatives (csrc/KERNELS.md, softplus_*): with b = beta * x, the function is linear
// (y = x, d1 = 1, d2 = 0) where b > threshold, else y = log1p(exp(b)) / beta, d1 = sigmoid(b),
// d2 = beta * d1 * (1 - d1). T is the compute type (float for float/half/bfloat16, double for double).
#pragma once

#include <cmath>

#include "config.h"

namespace fastjac {

template <typename T>
FASTJAC_HOST_DEVICE inline bool softplus_is_linear(T x, T beta, T threshold) {
  return x * beta > threshold;
}

template <typename T>
FASTJAC_HOST_DEVICE inline T softplus_value(T x, T beta, T threshold) {
  using std::exp;
  using std::log1p;
  return softplus_is_linear(x, beta, threshold) ? x : log1p(exp(x * beta)) / beta;
}

template <typename T>
FASTJAC_HOST_DEVICE inline T softplus_sigmoid(T b) {
  using std::exp;
  return T(1) / (T(1) + exp(-b));
}

// First derivative d1 = dy/dx.
template <typename T>
FASTJAC_HOST_DEVICE inline T softplus_d1(T x, T beta, T threshold) {
  return softplus_is_linear(x, beta, threshold) ? T(1) : softplus_sigmoid(x * beta);
}

// First and second derivatives.
template <typename T>
FASTJAC_HOST_DEVICE inline void softplus_d1_d2(T x, T beta, T threshold, T& d1, T& d2) {
  if (softplus_is_linear(x, beta, threshold)) {
    d1 = T(1);
    d2 = T(0);
  } else {
    const T s = softplus_sigmoid(x * beta);
    d1 = s;
    d2 = beta * s * (T(1) - s);
  }
}

// softplus_bwd of one element: g * d1.
template <typename T>
FASTJAC_HOST_DEVICE inline T softplus_grad(T g, T x, T beta, T threshold) {
  return g * softplus_d1(x, beta, threshold);
}

// softplus_dbwd of one element: (gg * d1, gg * g * d2).
template <typename T>
FASTJAC_HOST_DEVICE inline void softplus_dgrad(T gg, T g, T x, T beta, T threshold, T& out_g, T& out_x) {
  T d1, d2;
  softplus_d1_d2(x, beta, threshold, d1, d2);
  out_g = gg * d1;
  out_x = gg * g * d2;
}

}  // namespace fastjac
