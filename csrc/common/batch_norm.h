// BatchNorm per-channel math (csrc/KERNELS.md, "BatchNorm formulas"), shared by every backend.
//
// Each kernel after the forward is "pass 1: per-channel sums; coefficients (this file); pass 2: one affine
// combination per element". With r = invstd, xh = (x - mean) * r, gamma = weight or 1, and g~ = g * m
// (the ReLU mask when fused, recomputed from x by bn_z / bn_relu_on; else g), every pass-2 output is
//     out = cu * u + cg * g~ + cx * xh + c0            (BnAffine)
// where u is the element's second-order input (ggx for bn_dbwd, tx for bn_jvp). T is the type the
// coefficients are computed in (double on the CPU); M is the per-channel count N * prod(spatial).
#pragma once

#include <cmath>

#include "config.h"
#include "relu.h"

namespace fastjac {

template <typename T>
struct BnAffine {
  T cu = T(0), cg = T(0), cx = T(0), c0 = T(0);
};

// Per-channel sums of pass 1 (an absent operand contributes zeros).
template <typename T>
struct BnSums {
  T u = T(0);   // sum u
  T ux = T(0);  // sum u xh
  T g = T(0);   // sum g~
  T gx = T(0);  // sum g~ xh
  T ug = T(0);  // sum u g~

  FASTJAC_HOST_DEVICE void merge(const BnSums& o) {
    u += o.u;
    ux += o.ux;
    g += o.g;
    gx += o.gx;
    ug += o.ug;
  }
};

// Running (count, mean, M2 = sum (x - mean)^2) moments; merge is Chan et al.'s parallel update. `sum` is the plain
// sum of the values, for PyTorch's statistics of a channel holding inf (bn_mean_var).
template <typename T>
struct BnMoments {
  T n = T(0), mean = T(0), m2 = T(0), sum = T(0);

  FASTJAC_HOST_DEVICE void merge(T nb, T mean_b, T m2_b, T sum_b) {
    if (nb == T(0)) return;
    const T total = n + nb;
    const T delta = mean_b - mean;
    mean += delta * (nb / total);
    m2 += m2_b + delta * delta * (n * nb / total);
    sum += sum_b;
    n = total;
  }
  FASTJAC_HOST_DEVICE void merge(const BnMoments& o) { merge(o.n, o.mean, o.m2, o.sum); }
  // Welford's update with one value v.
  FASTJAC_HOST_DEVICE void push(T v) {
    n += T(1);
    const T delta = v - mean;
    mean += delta / n;
    m2 += delta * (v - mean);
    sum += v;
  }
};

// The batch mean and biased variance of a channel's moments, with PyTorch's values (mean = sum / M, var = mean of
// (x - mean)^2) where the channel holds a non-finite value: then Welford's and Chan's updates give a non-finite mean
// (inf - inf = NaN for a channel holding +inf among finite values), so a non-finite mean is replaced by sum / n
// (+inf there; NaN with NaN or both infinities), and its variance is NaN ((inf - inf)^2, which a clamped M2 could
// hide). An empty channel has mean 0 and variance 0 (nothing is normalised, and the running statistics are not
// updated: bn_updates_running).
template <typename T>
struct BnMeanVar {
  T mean, var;
};
template <typename T>
FASTJAC_HOST_DEVICE inline BnMeanVar<T> bn_mean_var(const BnMoments<T>& m) {
  using std::isfinite;
  if (m.n == T(0)) return {T(0), T(0)};
  if (isfinite(m.mean)) return {m.mean, m.m2 / m.n};
  return {m.sum / m.n, T(NAN)};
}

// Whether a training forward over `count` values per channel updates the running statistics: not for an empty
// batch (PyTorch leaves them alone; the unbiased variance would be 0 / -1).
FASTJAC_HOST_DEVICE inline bool bn_updates_running(int64_t count) { return count > 0; }

// xh = (x - mean) r.
template <typename A>
FASTJAC_HOST_DEVICE inline A bn_xhat(A x, A mean, A r) {
  return (x - mean) * r;
}

// A pass-2 output cu u + cg g + cx xh + c0 (BnAffine), with the terms whose operand is read (U, G, X).
template <bool U, bool G, bool X, typename A>
FASTJAC_HOST_DEVICE inline A bn_affine(const BnAffine<A>& k, A u, A g, A xh) {
  A v = k.c0;
  if constexpr (X) v += k.cx * xh;
  if constexpr (G) v += k.cg * g;
  if constexpr (U) v += k.cu * u;
  return v;
}

// a * b + c. Rounded once (an explicit fused multiply-add) where the target has one, so that the result does not
// depend on the compiler's -ffp-contract choice at each call site; rounded twice elsewhere (nothing to contract
// into). The fused ReLU's mask (bn_z, bn_relu_on) relies on this to be recomputed bit for bit.
template <typename T>
FASTJAC_HOST_DEVICE inline T bn_fma(T a, T b, T c) {
#if defined(__CUDA_ARCH__) || (defined(__FP_FAST_FMA) && defined(__FP_FAST_FMAF))
  using std::fma;
  return fma(a, b, c);
#else
  return a * b + c;
#endif
}

// The forward output before the fused ReLU, z = gamma (x - mean) r + beta, as one multiply-add per element:
// z = a x + c with a = gamma r, c = beta - a mean (per channel, computed in T = double on the CPU and rounded once
// to the compute type). bn_fwd writes y = z (or relu(z)) with these two functions, and every later kernel with
// relu=true recomputes the mask m = relu_on(z) with the same two functions from the saved mean, invstd, weight and
// bias, so that m equals the forward's relu_on(y) bit for bit (csrc/KERNELS.md, "Fused ReLU").
template <typename T>
struct BnZ {
  T a = T(0), c = T(0);
};
template <typename T>
FASTJAC_HOST_DEVICE inline BnZ<T> bn_z_coef(T mean, T r, T gamma, T beta) {
  BnZ<T> k;
  k.a = gamma * r;
  k.c = bn_fma(-k.a, mean, beta);
  return k;
}
template <typename A>
FASTJAC_HOST_DEVICE inline A bn_z(const BnZ<A>& k, A x) {
  return bn_fma(k.a, x, k.c);
}
// The mask bit of z (compute type A) for an output of dtype T: relu_on (z > 0 or NaN, relu.h) of z as stored in T,
// so that a float16 / bfloat16 z that rounds to 0 has m = 0 like y (a no-op for float and double).
template <typename T, typename A>
FASTJAC_HOST_DEVICE inline bool bn_relu_on(A z) {
  return relu_on(static_cast<A>(static_cast<T>(z)));
}

template <typename T>
FASTJAC_HOST_DEVICE inline T bn_invstd(T var, T eps) {
  using std::sqrt;
  return T(1) / sqrt(var + eps);
}

// Running statistics: rm = (1 - momentum) rm + momentum mean, rv = (1 - momentum) rv + momentum var M / (M - 1).
template <typename T>
FASTJAC_HOST_DEVICE inline T bn_running_mean(T running_mean, T mean, T momentum) {
  return (T(1) - momentum) * running_mean + momentum * mean;
}
template <typename T>
FASTJAC_HOST_DEVICE inline T bn_running_var(T running_var, T var, T count, T momentum) {
  return (T(1) - momentum) * running_var + momentum * (var * count / (count - T(1)));
}

// bn_bwd from Sg = s.g, Sgx = s.gx: gx = gamma r (g~ - Sg/M - xh Sgx/M) (training), gamma r g~ (eval);
// gw = Sgx, gb = Sg.
template <typename T>
struct BnBwdCoef {
  BnAffine<T> gx;
  T gw, gb;
};
template <typename T>
FASTJAC_HOST_DEVICE inline BnBwdCoef<T> bn_bwd_coef(const BnSums<T>& s, T count, T gamma, T r, bool training) {
  BnBwdCoef<T> k;
  const T gr = gamma * r;
  k.gx.cg = gr;
  if (training) {
    k.gx.cx = -gr * s.gx / count;
    k.gx.c0 = -gr * s.g / count;
  }
  k.gw = s.gx;
  k.gb = s.g;
  return k;
}

// bn_dbwd with u = ggx, p = ggw, q = ggb (absent = 0): A = Sg/M, B = Sgx/M, U = Su/M, Ux = Sux/M, UG = Sug/M,
// C = UG - U A - Ux B.
//   training: ggrad = m (gamma r (u - U - xh Ux) + p xh + q)
//             gx = -gamma r^2 (B u + Ux g~ + xh (C - 2 B Ux) - B U - Ux A) + p r (g~ - A - xh B),  gw = r M C
//   eval:     ggrad = m (gamma r u + p xh + q),  gx = p r g~,  gw = r M UG
// ggrad's coefficients exclude the mask (applied by pass 2).
template <typename T>
struct BnDbwdCoef {
  BnAffine<T> ggrad, gx;
  T gw;
};
template <typename T>
FASTJAC_HOST_DEVICE inline BnDbwdCoef<T> bn_dbwd_coef(const BnSums<T>& s, T count, T gamma, T r, T p, T q,
                                                      bool training) {
  BnDbwdCoef<T> k;
  const T gr = gamma * r;
  k.ggrad.cu = gr;
  k.ggrad.cx = p;
  k.ggrad.c0 = q;
  if (!training) {
    k.gx.cg = p * r;
    k.gw = r * s.ug;
    return k;
  }
  const T A = s.g / count, B = s.gx / count, U = s.u / count, Ux = s.ux / count, UG = s.ug / count;
  const T C = UG - U * A - Ux * B;
  const T gr2 = gr * r, pr = p * r;
  k.ggrad.cx = p - gr * Ux;
  k.ggrad.c0 = q - gr * U;
  k.gx.cu = -gr2 * B;
  k.gx.cg = -gr2 * Ux + pr;
  k.gx.cx = -gr2 * (C - T(2) * B * Ux) - pr * B;
  k.gx.c0 = gr2 * (B * U + Ux * A) - pr * A;
  k.gw = r * count * C;
  return k;
}

// bn_jvp with tangents u = tx, tw, tb (absent = 0), from St = s.u, Stx = s.ux:
// training z_dot = gamma r (tx - St/M - xh Stx/M) + tw xh + tb; eval z_dot = gamma r tx + tw xh + tb
// (times the mask when the ReLU is fused, applied by pass 2).
template <typename T>
FASTJAC_HOST_DEVICE inline BnAffine<T> bn_jvp_coef(const BnSums<T>& s, T count, T gamma, T r, T tw, T tb,
                                                   bool training) {
  BnAffine<T> z;
  const T gr = gamma * r;
  z.cu = gr;
  z.cx = tw;
  z.c0 = tb;
  if (training) {
    z.cx -= gr * s.ux / count;
    z.c0 -= gr * s.u / count;
  }
  return z;
}

// The per-channel coefficients of one kernel after the forward: pass 2 writes p = m * (p affine) and
// q = (q affine) (BnAffine), and the kernel returns out0, out1 per channel. With p_in, q_in the kernel's
// per-channel inputs (ggw, ggb for bn_dbwd; tw, tb for bn_jvp):
//   kBwd:  q = gx,    out0 = gw, out1 = gb          (bn_bwd_coef)
//   kDbwd: p = ggrad, q = gx, out0 = gw            (bn_dbwd_coef)
//   kJvp:  p = y_dot                               (bn_jvp_coef)
//   kFwd:  nothing (bn_fwd writes y = bn_z(x) through BnZ)
enum class BnKind { kFwd, kBwd, kDbwd, kJvp };
template <typename T>
struct BnKernelCoef {
  BnAffine<T> p, q;
  T out0 = T(0), out1 = T(0);
};
// A channel without elements (count 0: an empty batch) has zero coefficients and outputs, as sums over nothing
// (the formulas' means of nothing, 0 / 0, would make gw = r M C NaN).
template <typename T>
FASTJAC_HOST_DEVICE inline BnKernelCoef<T> bn_kernel_coef(BnKind kind, const BnSums<T>& s, T count, T gamma, T r,
                                                          T p_in, T q_in, bool training) {
  BnKernelCoef<T> k;
  if (count == T(0)) return k;
  if (kind == BnKind::kBwd) {
    const BnBwdCoef<T> b = bn_bwd_coef(s, count, gamma, r, training);
    k.q = b.gx, k.out0 = b.gw, k.out1 = b.gb;
  } else if (kind == BnKind::kDbwd) {
    const BnDbwdCoef<T> d = bn_dbwd_coef(s, count, gamma, r, p_in, q_in, training);
    k.p = d.ggrad, k.q = d.gx, k.out0 = d.gw;
  } else if (kind == BnKind::kJvp) {
    k.p = bn_jvp_coef(s, count, gamma, r, p_in, q_in, training);
  }
  return k;
}

}  // namespace fastjac
