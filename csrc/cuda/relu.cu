// CUDA ReLU kernels (csrc/KERNELS.md: relu_fwd, relu_bwd), one element per thread; the forward packs the mask
// bits of a warp's 32 consecutive elements with a ballot (4 mask bytes, written by lanes 0..3).
#include <torch/library.h>

#include <tuple>

#include "../common/relu.h"
#include "launch.cuh"

namespace fastjac::cuda {
namespace {

using at::Tensor;

template <typename T>
struct ReluFwd {
  const T* x;
  T* y;
  uint8_t* mask;
  int64_t n, nbytes;
  // Called for i < n rounded up to a multiple of 32, so that whole warps vote.
  __device__ void operator()(int64_t i) const {
    using A = at::opmath_type<T>;
    bool on = false;
    if (i < n) {
      const T v = x[i];
      on = relu_on(static_cast<A>(v));
      y[i] = relu_select(on, v);
    }
    const unsigned bits = __ballot_sync(0xffffffffu, on);  // bit k: element (i - lane) + k; zero beyond n
    const int lane = threadIdx.x & 31;
    const int64_t byte = mask_byte_index(i - lane) + lane;
    if (lane < 4 && byte < nbytes) mask[byte] = static_cast<uint8_t>(bits >> (8 * lane));
  }
};

template <typename T>
struct ReluBwd {
  const T* g;
  const uint8_t* mask;
  T* out;
  __device__ void operator()(int64_t i) const { out[i] = relu_select(mask_get(mask, i), g[i]); }
};

// relu_fwd: (relu(x), mask relu_on(x)); x == 0 gives 0 and a cleared bit, NaN gives NaN and a set bit.
std::tuple<Tensor, Tensor> relu_fwd(const Tensor& x_) {
  constexpr const char* op = "fastjac::relu_fwd";
  check_float(x_, x_.device(), op, "x");
  const DeviceGuard guard(x_.device());
  const Tensor x = x_.contiguous(), y = at::empty_like(x);
  const int64_t n = x.numel();
  const Tensor mask = at::empty({mask_bytes(n)}, x.options().dtype(at::kByte));
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    const ReluFwd<scalar_t> f{x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), n,
                              mask_bytes(n)};
    launch_elementwise(ceil_div(n, 32) * 32, f);
  });
  return {y, mask};
}

// relu_bwd: g * m (a selection: masked elements are 0 even where g is not finite).
Tensor relu_bwd(const Tensor& grad, const Tensor& mask_) {
  constexpr const char* op = "fastjac::relu_bwd";
  check_float(grad, grad.device(), op, "grad");
  check_mask(mask_, grad.numel(), grad.device(), op);
  const DeviceGuard guard(grad.device());
  const Tensor g = grad.contiguous(), mask = mask_.contiguous(), out = at::empty_like(g);
  FASTJAC_DISPATCH(g.scalar_type(), op, [&] {
    launch_elementwise(g.numel(), ReluBwd<scalar_t>{g.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(),
                                                    out.data_ptr<scalar_t>()});
  });
  return out;
}

}  // namespace

#if !defined(FASTJAC_CUDA_EMULATION)  // the emulation registers them itself (tests/cuda_emulation/)
TORCH_LIBRARY_IMPL(fastjac, CUDA, m) {
  m.impl("relu_fwd", &relu_fwd);
  m.impl("relu_bwd", &relu_bwd);
}
#endif

}  // namespace fastjac::cuda
