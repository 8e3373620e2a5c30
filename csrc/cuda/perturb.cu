// CUDA perturbation kernels (csrc/KERNELS.md, "Perturbations"), the same stream as csrc/cpu/perturb.cpp through
// csrc/common/philox.h: one thread per Philox block of four stream elements, noise generated where it is used.
// Launched through launch.cuh (FASTJAC_LAUNCH, DeviceGuard), so that the CPU emulation of emulation.h runs them
// too (tests/_cuda_emulation.py). Element i of a tensor uses stream element e = offset + i; "rows" are the slices
// along dim 0 (one row for a 0-dim tensor), D = numel / rows each.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/philox.h"
#include "launch.cuh"

namespace fastjac::cuda_perturb {
namespace {

using at::Tensor;
using cuda::ceil_div;
using cuda::DeviceGuard;
using cuda::kThreads;

constexpr int64_t kMaxBlocks = 1 << 16;

// Philox blocks [first, last] covering stream elements [offset, offset + n).
struct BlockRange {
  int64_t first, count;
  BlockRange(int64_t offset, int64_t n) : first(offset >> 2), count(n > 0 ? ((offset + n - 1) >> 2) - first + 1 : 0) {}
};

unsigned grid_for(int64_t count) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(count, kThreads), kMaxBlocks)));
}

__global__ void philox_words_kernel(int64_t* __restrict__ out, int64_t n, uint64_t seed, int64_t offset,
                                    int64_t first, int64_t count) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < count; t += stride) {
    const int64_t b = first + t;
    const Philox4 r = philox_block(seed, uint64_t(b));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * b + j - offset;
      if (i >= 0 && i < n) out[i] = int64_t(r.w[j]);
    }
  }
}

template <typename T>
__global__ void perturb_kernel(const T* __restrict__ x, T* __restrict__ y, const double* __restrict__ sigma,
                               bool per_row, int64_t D, int64_t n, uint64_t seed, int64_t offset,
                               int64_t distribution, int64_t first, int64_t count) {
  using A = at::opmath_type<T>;
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < count; t += stride) {
    const int64_t b = first + t;
    A z[4];
    noise_block<A>(seed, uint64_t(b), distribution, z);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * b + j - offset;
      if (i >= 0 && i < n) {
        const A s = A(sigma[per_row ? i / D : 0]);
        y[i] = static_cast<T>(static_cast<A>(x[i]) + s * z[j]);
      }
    }
  }
}

// One CUDA block per row: threads stride over the row's Philox blocks, sum in the compute type per thread,
// then a fixed-order tree reduction in double (deterministic).
template <typename T, typename Out>
__global__ void noise_row_dot_kernel(const T* __restrict__ g, Out* __restrict__ out, int64_t D, uint64_t seed,
                                     int64_t offset, int64_t distribution) {
  using A = at::opmath_type<T>;
  __shared__ double partial[kThreads];
  const int64_t row = blockIdx.x, lo = offset + row * D, hi = lo + D;  // stream elements of this row
  const int64_t first = lo >> 2, last = (hi - 1) >> 2;
  A acc = A(0);
  if (D > 0) {
    for (int64_t b = first + threadIdx.x; b <= last; b += blockDim.x) {
      A z[4];
      noise_block<A>(seed, uint64_t(b), distribution, z);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t e = 4 * b + j;
        if (e >= lo && e < hi) acc += static_cast<A>(g[e - offset]) * z[j];
      }
    }
  }
  partial[threadIdx.x] = double(acc);
  __syncthreads();
  for (int h = kThreads / 2; h > 0; h >>= 1) {
    if (int(threadIdx.x) < h) partial[threadIdx.x] += partial[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[row] = static_cast<Out>(partial[0]);
}

void check_cuda_float(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(cuda::on_kernel_device(t), op, ": expected ", name, " on a CUDA device, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected ", name,
              " to be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_stream(int64_t offset, int64_t distribution, const char* op) {
  TORCH_CHECK(offset >= 0, op, ": expected offset >= 0, got ", offset);
  TORCH_CHECK(distribution == kGaussian || distribution == kRademacher, op,
              ": expected distribution 0 (Gaussian) or 1 (Rademacher), got ", distribution);
}

int64_t rows_of(const Tensor& t) { return t.dim() == 0 ? 1 : t.size(0); }

Tensor philox_words(const Tensor& like, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastjac::philox_words";
  TORCH_CHECK(cuda::on_kernel_device(like), op, ": expected like on a CUDA device, got ", like.device());
  check_stream(offset, kGaussian, op);
  const DeviceGuard guard(like.device());
  Tensor out = at::empty(like.sizes(), like.options().dtype(at::kLong));
  const int64_t n = out.numel();
  const BlockRange r(offset, n);
  if (r.count == 0) return out;
  FASTJAC_LAUNCH(philox_words_kernel, grid_for(r.count), kThreads, out.data_ptr<int64_t>(), n, uint64_t(seed),
                 offset, r.first, r.count);
  return out;
}

Tensor perturb_fwd(const Tensor& x_, const Tensor& sigma_, int64_t seed, int64_t offset, int64_t distribution) {
  constexpr const char* op = "fastjac::perturb_fwd";
  check_cuda_float(x_, op, "x");
  check_cuda_float(sigma_, op, "sigma");
  check_stream(offset, distribution, op);
  TORCH_CHECK(sigma_.device() == x_.device(), op, ": sigma is on ", sigma_.device(), " but x is on ", x_.device());
  const int64_t rows = rows_of(x_);
  TORCH_CHECK(sigma_.dim() == 0 || (sigma_.dim() == 1 && sigma_.size(0) == rows), op,
              ": expected sigma of shape () or (", rows, ",), got ", sigma_.sizes());
  const DeviceGuard guard(x_.device());
  const Tensor x = x_.contiguous(), y = at::empty(x.sizes(), x.options());
  const Tensor sigma = sigma_.to(at::kDouble).contiguous();
  const int64_t n = x.numel(), D = rows > 0 ? n / rows : 0;
  const BlockRange r(offset, n);
  if (r.count == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    FASTJAC_LAUNCH(perturb_kernel<scalar_t>, grid_for(r.count), kThreads, x.data_ptr<scalar_t>(),
                   y.data_ptr<scalar_t>(), sigma.data_ptr<double>(), sigma.dim() == 1, D, n, uint64_t(seed), offset,
                   distribution, r.first, r.count);
  });
  return y;
}

Tensor noise_row_dot(const Tensor& g_, int64_t seed, int64_t offset, int64_t distribution) {
  constexpr const char* op = "fastjac::noise_row_dot";
  check_cuda_float(g_, op, "g");
  check_stream(offset, distribution, op);
  const DeviceGuard guard(g_.device());
  const Tensor g = g_.contiguous();
  const int64_t rows = rows_of(g), D = rows > 0 ? g.numel() / rows : 0;
  const bool dbl = g.scalar_type() == at::kDouble;
  Tensor out = at::empty({rows}, g.options().dtype(dbl ? at::kDouble : at::kFloat));
  if (rows == 0) return out;
  TORCH_CHECK(rows <= int64_t(0x7FFFFFFF), op, ": too many rows (", rows, ") for one CUDA block per row");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), op, [&] {
    if (dbl) {
      constexpr auto kernel = noise_row_dot_kernel<scalar_t, double>;
      FASTJAC_LAUNCH(kernel, unsigned(rows), kThreads, g.data_ptr<scalar_t>(), out.data_ptr<double>(), D,
                     uint64_t(seed), offset, distribution);
    } else {
      constexpr auto kernel = noise_row_dot_kernel<scalar_t, float>;
      FASTJAC_LAUNCH(kernel, unsigned(rows), kThreads, g.data_ptr<scalar_t>(), out.data_ptr<float>(), D,
                     uint64_t(seed), offset, distribution);
    }
  });
  return out;
}

}  // namespace

#if !defined(FASTJAC_CUDA_EMULATION)  // the emulation registers them itself (tests/cuda_emulation/)
TORCH_LIBRARY_IMPL(fastjac, CUDA, m) {
  m.impl("philox_words", &philox_words);
  m.impl("perturb_fwd", &perturb_fwd);
  m.impl("noise_row_dot", &noise_row_dot);
}
#endif

}  // namespace fastjac::cuda_perturb
