// CPU Softplus kernels (csrc/KERNELS.md: softplus_fwd / _bwd / _dbwd), elementwise with the math of
// csrc/common/softplus.h in the compute type (float for float32 / float16 / bfloat16, double for float64).
//
// float32 / float64 run the formulas on at::vec::Vectorized<T> (SoftplusMath specialised below): exp and log1p
// are Sleef's u10 functions that ATen's own vectorised kernels (F.softplus included) use, each within 1.0 ulp;
// comparison and selection are exact, so the threshold branch is F.softplus's (linear where beta x > threshold,
// NaN never linear). Error of a result vs the exact function of the rounded b = beta x: y <= 1 ulp (exp,
// damped by log1p's condition number b e^b / ((1 + e^b) log1p(e^b)) <= 1) + 1 ulp (log1p) + 0.5 ulp (/ beta);
// sigmoid s <= 1 ulp (exp, damped) + 1 ulp (+, /); d2 a few ulp more (products, 1 - s, which loses relative
// accuracy where s -> 1 as in every form). float16 / bfloat16 stay scalar (std::exp / std::log1p in float).
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

#include <tuple>
#include <type_traits>

#include "../common/softplus.h"
#include "loops.h"

namespace fastjac {

// Elementary operations of csrc/common/softplus.h on a vector: lane masks of all-one bits, blendv.
template <typename T>
struct SoftplusMath<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using Mask = V;
  static V exp(const V& v) { return v.exp(); }
  static V log1p(const V& v) { return v.log1p(); }
  static Mask greater(const V& a, const V& b) { return a > b; }
  static V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }  // a where m, else b
};

namespace cpu {
namespace {

using at::Tensor;

template <typename T>
constexpr bool kVector = std::is_same_v<T, float> || std::is_same_v<T, double>;

// f(k, n) for the vectors of [0, len): n = lanes, then one partial vector of n < lanes (masked loads / stores of
// n elements), so every element goes through the same vector code whatever its position.
template <typename T, typename F>
inline void for_vectors(int64_t len, const F& f) {
  constexpr int64_t W = at::vec::Vectorized<T>::size();
  int64_t k = 0;
  for (; k + W <= len; k += W) f(k, W);
  if (k < len) f(k, len - k);
}

// softplus_fwd: x where beta x > threshold, else log1p(exp(beta x)) / beta.
Tensor softplus_fwd(const Tensor& x_, double beta, double threshold) {
  constexpr const char* op = "fastjac::softplus_fwd";
  check_float_cpu(x_, op, "x");
  const Tensor x = x_.contiguous(), y = empty_output(x);
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    parallel_chunks(x.numel(), [&](int64_t i0, int64_t len) {
      if constexpr (kVector<scalar_t>) {
        using V = at::vec::Vectorized<scalar_t>;
        const V b(static_cast<scalar_t>(beta)), t(static_cast<scalar_t>(threshold));
        for_vectors<scalar_t>(len, [&](int64_t k, int64_t n) {
          softplus_value_of(V::loadu(xp + i0 + k, n), b, t).store(yp + i0 + k, n);
        });
      } else {
        for (int64_t i = i0; i < i0 + len; ++i)
          yp[i] = static_cast<scalar_t>(softplus_value(static_cast<A>(xp[i]), A(beta), A(threshold)));
      }
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
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    parallel_chunks(x.numel(), [&](int64_t i0, int64_t len) {
      if constexpr (kVector<scalar_t>) {
        using V = at::vec::Vectorized<scalar_t>;
        const V b(static_cast<scalar_t>(beta)), t(static_cast<scalar_t>(threshold));
        for_vectors<scalar_t>(len, [&](int64_t k, int64_t n) {
          const int64_t i = i0 + k;
          softplus_grad_of(V::loadu(gp + i, n), V::loadu(xp + i, n), b, t).store(outp + i, n);
        });
      } else {
        for (int64_t i = i0; i < i0 + len; ++i)
          outp[i] = static_cast<scalar_t>(
              softplus_grad(static_cast<A>(gp[i]), static_cast<A>(xp[i]), A(beta), A(threshold)));
      }
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
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* ggp = gg.data_ptr<scalar_t>();
    scalar_t* ogp = out_g.data_ptr<scalar_t>();
    scalar_t* oxp = out_x.data_ptr<scalar_t>();
    parallel_chunks(x.numel(), [&](int64_t i0, int64_t len) {
      if constexpr (kVector<scalar_t>) {
        using V = at::vec::Vectorized<scalar_t>;
        const V b(static_cast<scalar_t>(beta)), t(static_cast<scalar_t>(threshold));
        for_vectors<scalar_t>(len, [&](int64_t k, int64_t n) {
          const int64_t i = i0 + k;
          V og, ox;
          softplus_dgrad_of(V::loadu(ggp + i, n), V::loadu(gp + i, n), V::loadu(xp + i, n), b, t, og, ox);
          og.store(ogp + i, n);
          ox.store(oxp + i, n);
        });
      } else {
        for (int64_t i = i0; i < i0 + len; ++i) {
          A og, ox;
          softplus_dgrad(static_cast<A>(ggp[i]), static_cast<A>(gp[i]), static_cast<A>(xp[i]), A(beta),
                         A(threshold), og, ox);
          ogp[i] = static_cast<scalar_t>(og);
          oxp[i] = static_cast<scalar_t>(ox);
        }
      }
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
