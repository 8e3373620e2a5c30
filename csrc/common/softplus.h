// Softplus value and derivatives (csrc/KERNELS.md, softplus_*): with b = beta * x, the function is linear
// (y = x, d1 = 1, d2 = 0) where b > threshold, else y = log1p(exp(b)) / beta, d1 = sigmoid(b),
// d2 = beta * d1 * (1 - d1). T is the compute type (float for float/half/bfloat16, double for double).
//
// The formulas are written once (softplus_*_of) for a value type V with elementary operations SoftplusMath<V>:
// V = T, a scalar (this header's primary template: the CUDA kernels and the scalar CPU loops), or a SIMD vector of
// T (csrc/cpu/softplus.cpp specialises SoftplusMath for at::vec::Vectorized). Both branches are evaluated and one
// is selected, so a vector computes the same operations, in the same order, as the scalar form on each lane.
#pragma once

#include <cmath>

#include "config.h"

namespace fastjac {

// Elementary operations on a scalar: libm / CUDA exp and log1p, comparisons as bool, selection.
template <typename V>
struct SoftplusMath {
  using Mask = bool;
  static FASTJAC_HOST_DEVICE V exp(V v) {
    using std::exp;
    return exp(v);
  }
  static FASTJAC_HOST_DEVICE V log1p(V v) {
    using std::log1p;
    return log1p(v);
  }
  static FASTJAC_HOST_DEVICE Mask greater(V a, V b) { return a > b; }
  static FASTJAC_HOST_DEVICE V select(Mask m, V a, V b) { return m ? a : b; }  // a where m, else b
};

// ---------------------------------------------------------------------------------------------------------
// The formulas, for any value type V (scalar or vector), with M = SoftplusMath<V>.

template <typename V, typename M = SoftplusMath<V>>
FASTJAC_HOST_DEVICE inline typename M::Mask softplus_linear_of(V x, V beta, V threshold) {
  return M::greater(x * beta, threshold);
}

template <typename V, typename M = SoftplusMath<V>>
FASTJAC_HOST_DEVICE inline V softplus_value_of(V x, V beta, V threshold) {
  return M::select(softplus_linear_of<V, M>(x, beta, threshold), x, M::log1p(M::exp(x * beta)) / beta);
}

template <typename V, typename M = SoftplusMath<V>>
FASTJAC_HOST_DEVICE inline V softplus_sigmoid_of(V b) {
  return V(1) / (V(1) + M::exp(-b));
}

// First derivative d1 = dy/dx.
template <typename V, typename M = SoftplusMath<V>>
FASTJAC_HOST_DEVICE inline V softplus_d1_of(V x, V beta, V threshold) {
  return M::select(softplus_linear_of<V, M>(x, beta, threshold), V(1), softplus_sigmoid_of<V, M>(x * beta));
}

// First and second derivatives.
template <typename V, typename M = SoftplusMath<V>>
FASTJAC_HOST_DEVICE inline void softplus_d1_d2_of(V x, V beta, V threshold, V& d1, V& d2) {
  const typename M::Mask linear = softplus_linear_of<V, M>(x, beta, threshold);
  const V s = softplus_sigmoid_of<V, M>(x * beta);
  d1 = M::select(linear, V(1), s);
  d2 = M::select(linear, V(0), beta * s * (V(1) - s));
}

// softplus_bwd of one element: g * d1.
template <typename V, typename M = SoftplusMath<V>>
FASTJAC_HOST_DEVICE inline V softplus_grad_of(V g, V x, V beta, V threshold) {
  return g * softplus_d1_of<V, M>(x, beta, threshold);
}

// softplus_dbwd of one element: (gg * d1, gg * g * d2).
template <typename V, typename M = SoftplusMath<V>>
FASTJAC_HOST_DEVICE inline void softplus_dgrad_of(V gg, V g, V x, V beta, V threshold, V& out_g, V& out_x) {
  V d1, d2;
  softplus_d1_d2_of<V, M>(x, beta, threshold, d1, d2);
  out_g = gg * d1;
  out_x = gg * g * d2;
}

// ---------------------------------------------------------------------------------------------------------
// Scalar forms (the names the kernels call).

template <typename T>
FASTJAC_HOST_DEVICE inline T softplus_value(T x, T beta, T threshold) {
  return softplus_value_of(x, beta, threshold);
}

template <typename T>
FASTJAC_HOST_DEVICE inline T softplus_grad(T g, T x, T beta, T threshold) {
  return softplus_grad_of(g, x, beta, threshold);
}

template <typename T>
FASTJAC_HOST_DEVICE inline void softplus_dgrad(T gg, T g, T x, T beta, T threshold, T& out_g, T& out_x) {
  softplus_dgrad_of(gg, g, x, beta, threshold, out_g, out_x);
}

}  // namespace fastjac
