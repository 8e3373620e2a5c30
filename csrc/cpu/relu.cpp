// CPU ReLU kernels (csrc/KERNELS.md: relu_fwd, relu_bwd), parallel over mask bytes.
#include <torch/library.h>

#include <tuple>

#include "../common/relu.h"
#include "loops.h"

namespace fastjac::cpu {
namespace {

using at::Tensor;

// relu_fwd: (relu(x), mask relu_on(x)); x == 0 gives 0 and a cleared bit, NaN gives NaN and a set bit.
std::tuple<Tensor, Tensor> relu_fwd(const Tensor& x_) {
  check_float_cpu(x_, "fastjac::relu_fwd", "x");
  const Tensor x = x_.contiguous(), y = empty_output(x);
  const Tensor mask = at::empty({mask_bytes(x.numel())}, x.options().dtype(at::kByte));
  FASTJAC_DISPATCH(x.scalar_type(), "fastjac::relu_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    uint8_t* mp = mask.data_ptr<uint8_t>();
    parallel_chunks(x.numel(), [&](int64_t i0, int64_t len) {
      const scalar_t* __restrict__ xs = xp + i0;
      scalar_t* __restrict__ ys = yp + i0;
FASTJAC_OMP_SIMD
      for (int64_t j = 0; j < len; ++j) ys[j] = relu_select(relu_on(static_cast<A>(xs[j])), xs[j]);
      pack_relu_mask(xs, i0, len, mp, /*shared=*/false);
    });
  });
  return {y, mask};
}

// relu_bwd: g * m (a selection: masked elements are 0 even where g is not finite).
Tensor relu_bwd(const Tensor& grad, const Tensor& mask_) {
  check_float_cpu(grad, "fastjac::relu_bwd", "grad");
  check_mask(mask_, grad.numel(), grad.device(), "fastjac::relu_bwd");
  const Tensor g = grad.contiguous(), mask = mask_.contiguous(), out = empty_output(g);
  FASTJAC_DISPATCH(g.scalar_type(), "fastjac::relu_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const uint8_t* mp = mask.data_ptr<uint8_t>();
    parallel_chunks(g.numel(), [&](int64_t i0, int64_t len) {
      alignas(64) A m[kChunk];
      expand_mask(mp, i0, len, m);
      const scalar_t* __restrict__ gs = gp + i0;
      scalar_t* __restrict__ os = op + i0;
FASTJAC_OMP_SIMD
      for (int64_t j = 0; j < len; ++j) os[j] = relu_select(m[j] != A(0), gs[j]);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastjac, CPU, m) {
  m.impl("relu_fwd", &relu_fwd);
  m.impl("relu_bwd", &relu_bwd);
}

}  // namespace fastjac::cpu
