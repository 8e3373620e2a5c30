// CPU Softplus kernels (csrc/KERNELS.md: softplus_fwd / _bwd / _dbwd), elementwise with the math of
// csrc/common/softplus.h in the compute type (float for float32 / float16 / bfloat16, double for float64).
//
// Every dtype runs the formulas on at::vec::Vectorized<A>, A the compute type (SoftplusMath specialised below):
// exp and log are Sleef's u10 functions, which ATen's own vectorised kernels use, each within 1.0 ulp, and log1p is
// built from log (below); comparison and selection are exact, so the threshold branch is F.softplus's (linear
// where beta x > threshold; NaN is never linear). Error vs the exact function of the rounded b = beta x, in ulp of
// the result: y <= 6.5 (exp's 1, damped by log1p's condition number e^b / ((1 + e^b) log1p(e^b)) <= 1, + log1p's 5
// + 0.5 for / beta; measured <= 2.8 in float32 over 3 M points of [-104, 25] for beta 0.5, 1, 2, where F.softplus
// is <= 1.5); s = sigmoid(b) <= 2 (exp's 1, damped by e / (1 + e) < 1, + 0.5 each for + and /); g d1,
// gg d1 0.5 more; gg g d2 a few ulp more plus the cancellation of 1 - s where s -> 1 (in every form of d2).
// float16 / bfloat16 run the float vectors: inputs converted exactly, results (the float32 kernels') rounded once.
//
// This file is compiled for the instruction set of setup.py's FASTJAC_CPU_ARCH_FLAGS (-march=native by default):
// ATen's headers pick the AVX-512 or AVX2 Vectorized by CPU_CAPABILITY_*, set here before any ATen header, in a
// namespace of this file's own (CPU_CAPABILITY) so that no other translation unit's Vectorized is mixed in. With
// neither instruction set, Vectorized is ATen's portable array type (lane by lane with std::exp / std::log1p).
// (CPU_CAPABILITY_AVX2/512 also switch c10::Half's float conversions to F16C instructions: the same IEEE
// round-to-nearest-even results as the portable ones of the other files; libtorch mixes them the same way.)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__FMA__)
#define CPU_CAPABILITY_AVX512 1
#define CPU_CAPABILITY fastjac_softplus_avx512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#define CPU_CAPABILITY fastjac_softplus_avx2
#else
#define CPU_CAPABILITY fastjac_softplus_default
#endif

#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <type_traits>

#include "../common/softplus.h"
#include "loops.h"

namespace fastjac {

// Elementary operations of csrc/common/softplus.h on a vector: lane masks of all-one bits, blendv.
//
// log1p(u) = log(w) (u / (w - 1)) with w = 1 + u rounded (Goldberg, "What every computer scientist should know about
// floating-point arithmetic", 1991, Theorem 4, after Kahan): the rounding error of w cancels between log(w) and
// w - 1, so the result is within a few ulp (5 ulp with a correctly rounded log; Sleef's log is within 1 ulp) for
// every u > -1; where w == 1 (|u| below half an ulp of 1) log1p(u) = u to the last bit, and log1p(inf) = inf.
// ATen's vectorised log1p is no faster than a scalar libm loop on the AVX-512 build measured (AMD EPYC: 14 ns per
// float against log's 3.6, benchmarks/RESULTS.md), its log is Sleef's vectorised u10. The CUDA kernels keep log1p.
template <typename T>
struct SoftplusMath<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using Mask = V;
  static V exp(const V& v) { return v.exp(); }
  static V log1p(const V& u) {
    const V one(T(1)), w = u + one;
    const V exact = (w == one) | (u == V(std::numeric_limits<T>::infinity()));
    return V::blendv(w.log() * (u / (w - one)), u, exact);  // u / (w - 1) ~ 1: no overflow for large u
  }
  static Mask greater(const V& a, const V& b) { return a > b; }
  static V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }  // a where m, else b
};

namespace cpu {
namespace {

using at::Tensor;

// Vectors of the compute type A for arrays of T, n <= lanes elements at p (a partial vector loads / stores only
// its n elements): T = A directly; float16 / bfloat16 through ATen's conversions (exact to float; rounded to
// nearest even back, as c10's scalar conversions), on the low lanes of a Vectorized<T>.
template <typename T>
struct VecIO {
  using A = at::opmath_type<T>;
  using V = at::vec::Vectorized<A>;
  static V load(const T* p, int64_t n) {
    if constexpr (std::is_same_v<T, A>)
      return V::loadu(p, n);
    else
      return at::vec::convert<A>(at::vec::Vectorized<T>::loadu(p, n));
  }
  static void store(const V& v, T* p, int64_t n) {
    if constexpr (std::is_same_v<T, A>)
      v.store(p, n);
    else
      at::vec::convert<T>(v).store(p, n);
  }
};

// f(i, n) for the vectors of [0, numel), in parallel chunks: n = lanes, then one partial vector of n < lanes per
// chunk, so every element goes through the same vector code whatever its position (and the thread count).
template <typename T, typename F>
inline void for_vectors(int64_t numel, const F& f) {
  constexpr int64_t W = VecIO<T>::V::size();
  parallel_chunks(numel, [&](int64_t i0, int64_t len) {
    int64_t k = 0;
    for (; k + W <= len; k += W) f(i0 + k, W);
    if (k < len) f(i0 + k, len - k);
  });
}

// softplus_fwd: x where beta x > threshold, else log1p(exp(beta x)) / beta.
Tensor softplus_fwd(const Tensor& x_, double beta, double threshold) {
  constexpr const char* op = "fastjac::softplus_fwd";
  check_float_cpu(x_, op, "x");
  const Tensor x = x_.contiguous(), y = empty_output(x);
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using A = typename IO::A;
    const typename IO::V b(static_cast<A>(beta)), t(static_cast<A>(threshold));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_vectors<scalar_t>(x.numel(), [&](int64_t i, int64_t n) {
      IO::store(softplus_value_of(IO::load(xp + i, n), b, t), yp + i, n);
    });
  });
  return y;
}

// softplus_bwd: g * d1(x).
Tensor softplus_bwd(const Tensor& grad, const Tensor& x_, double beta, double threshold) {
  constexpr const char* op = "fastjac::softplus_bwd";
  check_float_cpu(x_, op, "x");
  check_like(grad, x_, op, "grad");
  const Tensor x = x_.contiguous(), g = grad.contiguous(), out = empty_output(x);
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using A = typename IO::A;
    const typename IO::V b(static_cast<A>(beta)), t(static_cast<A>(threshold));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    for_vectors<scalar_t>(x.numel(), [&](int64_t i, int64_t n) {
      IO::store(softplus_grad_of(IO::load(gp + i, n), IO::load(xp + i, n), b, t), outp + i, n);
    });
  });
  return out;
}

// softplus_dbwd: (gg * d1, gg * g * d2).
std::tuple<Tensor, Tensor> softplus_dbwd(const Tensor& ggrad, const Tensor& grad, const Tensor& x_, double beta,
                                         double threshold) {
  constexpr const char* op = "fastjac::softplus_dbwd";
  check_float_cpu(x_, op, "x");
  check_like(ggrad, x_, op, "ggrad");
  check_like(grad, x_, op, "grad");
  const Tensor x = x_.contiguous(), g = grad.contiguous(), gg = ggrad.contiguous();
  const Tensor out_g = empty_output(x), out_x = empty_output(x);
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using A = typename IO::A;
    using V = typename IO::V;
    const V b(static_cast<A>(beta)), t(static_cast<A>(threshold));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* ggp = gg.data_ptr<scalar_t>();
    scalar_t* ogp = out_g.data_ptr<scalar_t>();
    scalar_t* oxp = out_x.data_ptr<scalar_t>();
    for_vectors<scalar_t>(x.numel(), [&](int64_t i, int64_t n) {
      V og, ox;
      softplus_dgrad_of(IO::load(ggp + i, n), IO::load(gp + i, n), IO::load(xp + i, n), b, t, og, ox);
      IO::store(og, ogp + i, n);
      IO::store(ox, oxp + i, n);
    });
  });
  return {out_g, out_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastjac, CPU, m) {
  m.impl("softplus_fwd", &softplus_fwd);
  m.impl("softplus_bwd", &softplus_bwd);
  m.impl("softplus_dbwd", &softplus_dbwd);
}

}  // namespace cpu
}  // namespace fastjac
