// CUDA Softplus kernels (csrc/KERNELS.md: softplus_fwd / _bwd / _dbwd), one element per thread with the math
// of csrc/common/softplus.h in the compute type (float for float32 / float16 / bfloat16, double for float64).
#include <torch/library.h>

#include <tuple>

#include "../common/softplus.h"
#include "launch.cuh"

namespace fastjac::cuda {
namespace {

using at::Tensor;

template <typename T>
struct SoftplusFwd {
  using A = at::opmath_type<T>;
  const T* x;
  T* y;
  A beta, threshold;
  __device__ void operator()(int64_t i) const {
    y[i] = static_cast<T>(softplus_value(static_cast<A>(x[i]), beta, threshold));
  }
};

template <typename T>
struct SoftplusBwd {
  using A = at::opmath_type<T>;
  const T* g;
  const T* x;
  T* out;
  A beta, threshold;
  __device__ void operator()(int64_t i) const {
    out[i] = static_cast<T>(softplus_grad(static_cast<A>(g[i]), static_cast<A>(x[i]), beta, threshold));
  }
};

template <typename T>
struct SoftplusDbwd {
  using A = at::opmath_type<T>;
  const T* gg;
  const T* g;
  const T* x;
  T* out_g;
  T* out_x;
  A beta, threshold;
  __device__ void operator()(int64_t i) const {
    A og, ox;
    softplus_dgrad(static_cast<A>(gg[i]), static_cast<A>(g[i]), static_cast<A>(x[i]), beta, threshold, og, ox);
    out_g[i] = static_cast<T>(og);
    out_x[i] = static_cast<T>(ox);
  }
};

// softplus_fwd: x where beta x > threshold, else log1p(exp(beta x)) / beta.
Tensor softplus_fwd(const Tensor& x_, double beta, double threshold) {
  constexpr const char* op = "fastjac::softplus_fwd";
  check_float(x_, x_.device(), op, "x");
  const DeviceGuard guard(x_.device());
  const Tensor x = x_.contiguous(), y = at::empty_like(x);
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    using A = at::opmath_type<scalar_t>;
    launch_elementwise(x.numel(), SoftplusFwd<scalar_t>{x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), A(beta),
                                                        A(threshold)});
  });
  return y;
}

// softplus_bwd: g * d1(x).
Tensor softplus_bwd(const Tensor& grad, const Tensor& x_, double beta, double threshold) {
  constexpr const char* op = "fastjac::softplus_bwd";
  check_float(x_, x_.device(), op, "x");
  check_like(grad, x_, op, "grad");
  const DeviceGuard guard(x_.device());
  const Tensor x = x_.contiguous(), g = grad.contiguous(), out = at::empty_like(x);
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    using A = at::opmath_type<scalar_t>;
    launch_elementwise(x.numel(), SoftplusBwd<scalar_t>{g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                        out.data_ptr<scalar_t>(), A(beta), A(threshold)});
  });
  return out;
}

// softplus_dbwd: (gg * d1, gg * g * d2).
std::tuple<Tensor, Tensor> softplus_dbwd(const Tensor& ggrad, const Tensor& grad, const Tensor& x_, double beta,
                                         double threshold) {
  constexpr const char* op = "fastjac::softplus_dbwd";
  check_float(x_, x_.device(), op, "x");
  check_like(ggrad, x_, op, "ggrad");
  check_like(grad, x_, op, "grad");
  const DeviceGuard guard(x_.device());
  const Tensor x = x_.contiguous(), g = grad.contiguous(), gg = ggrad.contiguous();
  const Tensor out_g = at::empty_like(x), out_x = at::empty_like(x);
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    using A = at::opmath_type<scalar_t>;
    launch_elementwise(x.numel(),
                       SoftplusDbwd<scalar_t>{gg.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                              out_g.data_ptr<scalar_t>(), out_x.data_ptr<scalar_t>(), A(beta),
                                              A(threshold)});
  });
  return {out_g, out_x};
}

}  // namespace

#if !defined(FASTJAC_CUDA_EMULATION)  // the emulation registers them itself (tests/cuda_emulation/)
TORCH_LIBRARY_IMPL(fastjac, CUDA, m) {
  m.impl("softplus_fwd", &softplus_fwd);
  m.impl("softplus_bwd", &softplus_bwd);
  m.impl("softplus_dbwd", &softplus_dbwd);
}
#endif

}  // namespace fastjac::cuda
