// CPU Softplus kernels (csrc/KERNELS.md: softplus_fwd / _bwd / _dbwd), elementwise with the math of
// csrc/common/softplus.h in the compute type (float for float32 / float16 / bfloat16, double for float64).
#include <torch/library.h>

#include <tuple>

#include "../common/softplus.h"
#include "loops.h"

namespace fastjac::cpu {
namespace {

using at::Tensor;

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
      for (int64_t i = i0; i < i0 + len; ++i)
        yp[i] = static_cast<scalar_t>(softplus_value(static_cast<A>(xp[i]), A(beta), A(threshold)));
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
      for (int64_t i = i0; i < i0 + len; ++i)
        outp[i] = static_cast<scalar_t>(
            softplus_grad(static_cast<A>(gp[i]), static_cast<A>(xp[i]), A(beta), A(threshold)));
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
      for (int64_t i = i0; i < i0 + len; ++i) {
        A og, ox;
        softplus_dgrad(static_cast<A>(ggp[i]), static_cast<A>(gp[i]), static_cast<A>(xp[i]), A(beta),
                       A(threshold), og, ox);
        ogp[i] = static_cast<scalar_t>(og);
        oxp[i] = static_cast<scalar_t>(ox);
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

}  // namespace fastjac::cpu
