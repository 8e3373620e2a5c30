// Shared machinery of the CUDA kernels: launches on the current stream, a 64-bit grid-stride elementwise loop and a
// deterministic block reduction. The arithmetic itself lives in csrc/common/. The stream is
// c10::cuda::getCurrentCUDAStream (what at::cuda::getCurrentCUDAStream forwards to), so that no header here needs
// the cuBLAS / cuSPARSE headers of ATen/cuda/CUDAContext.h, which the toolkit of the CI machines lacks.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cstdint>

#include "../common/aten_utils.h"

// FASTJAC_LAUNCH(kernel, grid, block, args...): kernel<<<grid, block>>>(args...) on the current stream, checked
// (a kernel template with several arguments goes through a constexpr function pointer, as the macro splits at
// commas); DeviceGuard: the device guard of a kernel call; on_kernel_device(t): t is on the kernels' device. With FASTJAC_CUDA_EMULATION (tests only), both come from
// emulation.h and the kernels run on CPU tensors.
#if defined(FASTJAC_CUDA_EMULATION)
#include "emulation.h"
#define FASTJAC_LAUNCH(kernel, grid, block, ...) ::fastjac::cuda::emulation::launch(grid, block, kernel, __VA_ARGS__)
namespace fastjac::cuda {
using emulation::DeviceGuard;
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }  // the emulation's tensors
}
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FASTJAC_LAUNCH(kernel, grid, block, ...)                                   \
  do {                                                                             \
    kernel<<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);   \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                \
  } while (0)
namespace fastjac::cuda {
using DeviceGuard = c10::cuda::CUDAGuard;
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }  // a tensor these kernels serve
}
#endif

namespace fastjac::cuda {

constexpr int kThreads = 256;            // threads per block of every kernel
constexpr int64_t kMaxGridX = 1 << 16;  // blocks of a grid-stride loop

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// f(i) for every i in [0, n): 64-bit indices, blocks of kThreads, grid-stride. Every warp sees the same trip
// count and whole warps of consecutive i (i - lane is a multiple of 32), so f may use warp intrinsics.
template <typename F>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(int64_t n, const F f) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
}

template <typename F>
void launch_elementwise(int64_t n, const F& f) {
  if (n <= 0) return;
  const auto blocks = static_cast<unsigned>(std::min(ceil_div(n, kThreads), kMaxGridX));
  FASTJAC_LAUNCH(elementwise_kernel<F>, blocks, kThreads, n, f);
}

// Merges the values of the threads of a column (same threadIdx.x, all threadIdx.y; blockDim.y a power of two)
// in a fixed tree order, so the result does not depend on timing; returns the column's total (in every thread
// of the column). Acc has merge(const Acc&). Every thread of the block must call it.
template <typename Acc>
__device__ Acc reduce_over_y(const Acc& value) {
  alignas(16) __shared__ unsigned char raw[kThreads * sizeof(Acc)];
  Acc* sm = reinterpret_cast<Acc*>(raw);
  const int tx = threadIdx.x, nx = blockDim.x;
  sm[threadIdx.y * nx + tx] = value;
  __syncthreads();
  for (int h = blockDim.y / 2; h > 0; h >>= 1) {
    if (int(threadIdx.y) < h) sm[threadIdx.y * nx + tx].merge(sm[(threadIdx.y + h) * nx + tx]);
    __syncthreads();
  }
  const Acc total = sm[tx];
  __syncthreads();  // sm may be reused by the caller's next reduction
  return total;
}

// Raw device memory for `count` objects of type P, owned by the returned tensor (the caching allocator keeps it
// alive for the kernels queued on the current stream).
template <typename P>
at::Tensor scratch(int64_t count, const at::Tensor& like) {
  return at::empty({std::max<int64_t>(1, count) * int64_t(sizeof(P))}, like.options().dtype(at::kByte));
}
template <typename P>
P* scratch_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<P*>(t.data_ptr<uint8_t>()) : nullptr;
}

}  // namespace fastjac::cuda
