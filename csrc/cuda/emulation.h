// A CPU emulation of the part of CUDA that the kernels of this folder (relu.cu, softplus.cu, batch_norm.cu,
// perturb.cu) use: grid and block indices, __syncthreads, __ballot_sync, __shared__ memory and kernel launches.
// With FASTJAC_CUDA_EMULATION defined, launch.cuh takes its launch macro and device guard from here instead of the
// CUDA runtime and those files compile as plain C++ (tests/cuda_emulation/), so that the tests run the CUDA kernels'
// own indexing, layouts, block reductions, per-channel finishing steps and launch sequence on CPU tensors without
// a GPU (tests/_cuda_emulation.py). Never part of the built package.
//
// Schedule: the blocks of a launch run one after another on the launching thread; a block's threads are
// cooperative fibers (ucontext), each run until it calls __syncthreads() or returns, in threadIdx order or, with
// set_schedule(kReverse), in reverse order (a kernel whose result depends on the order within a barrier interval
// has a race; the tests run both). A barrier opens when every thread of the block that has not returned has
// arrived (exited threads do not hold a barrier, as on Volta and later). These are schedules a GPU may run, chosen
// deterministically; __shared__ variables are function-local statics, private to the one block that runs at a
// time. Of the warp intrinsics only __ballot_sync is emulated (relu.cu's mask), for kernels that call it with every
// live thread of the block (whole warps with equal trip counts, as launch_elementwise guarantees).
// The arithmetic is the host side of csrc/common/ (no device intrinsics, no fma contraction of device code).
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <ucontext.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running thread's indices (one emulated thread runs at a time).
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace fastjac::cuda::emulation {

constexpr size_t kStackBytes = 128 * 1024;  // per emulated thread

// The state of the block being run.
struct Block {
  ucontext_t scheduler;
  std::vector<ucontext_t> contexts;
  std::vector<uint3> index;
  std::vector<bool> done, vote;
  size_t current = 0;  // the running thread's linear index (x fastest, so warp w holds 32 w .. 32 w + 31)
};

enum Schedule : int64_t { kInOrder = 0, kReverse = 1 };
inline Schedule schedule = kInOrder;
inline Block* running = nullptr;
inline std::vector<std::unique_ptr<char[]>> stacks;  // one per thread of a block, kept for the next blocks

// Launches so far (every kernel, all threads), for tests that count what a kernel call launches.
inline std::atomic<int64_t> launch_count{0};
inline std::mutex launch_mutex;  // one launch at a time: __shared__ statics and the indices are global

}  // namespace fastjac::cuda::emulation

// Blocks the calling thread until every thread of the block that has not returned has arrived.
inline void __syncthreads() {
  using namespace fastjac::cuda::emulation;
  Block& b = *running;
  swapcontext(&b.contexts[b.current], &b.scheduler);
}

// The 32 predicates of the calling thread's warp as bits (lane l: bit l).
inline unsigned __ballot_sync(unsigned, int predicate) {
  using namespace fastjac::cuda::emulation;
  running->vote[running->current] = predicate != 0;
  __syncthreads();  // every live thread has voted
  const size_t warp = running->current / 32 * 32;
  unsigned bits = 0;
  for (size_t lane = 0; lane < 32 && warp + lane < running->vote.size(); ++lane)
    bits |= unsigned(running->vote[warp + lane]) << lane;
  __syncthreads();  // every thread has read its warp's votes before the next ballot overwrites them
  return bits;
}

namespace fastjac::cuda::emulation {

template <typename F>
void fiber_entry(unsigned lo, unsigned hi) {
  const auto* f = reinterpret_cast<const F*>((uintptr_t(hi) << 32) | uintptr_t(lo));
  (*f)();
  running->done[running->current] = true;  // then returns to uc_link, the scheduler
}

// Runs f() as every thread of one block with index `block_index`.
template <typename F>
void run_block(const F& f, const uint3& block_index, const dim3& block) {
  const size_t n = size_t(block.x) * block.y * block.z;
  Block b;
  b.contexts.resize(n), b.index.resize(n), b.done.assign(n, false), b.vote.assign(n, false);
  while (stacks.size() < n) stacks.emplace_back(new char[kStackBytes]);
  const uintptr_t fp = reinterpret_cast<uintptr_t>(&f);
  for (size_t t = 0; t < n; ++t) {
    const size_t plane = size_t(block.x) * block.y;
    b.index[t] = uint3{unsigned(t % block.x), unsigned(t / block.x % block.y), unsigned(t / plane)};
    getcontext(&b.contexts[t]);
    b.contexts[t].uc_stack.ss_sp = stacks[t].get();
    b.contexts[t].uc_stack.ss_size = kStackBytes;
    b.contexts[t].uc_link = &b.scheduler;
    makecontext(&b.contexts[t], reinterpret_cast<void (*)()>(&fiber_entry<F>), 2, unsigned(fp & 0xffffffffu),
                unsigned(fp >> 32));
  }
  running = &b;
  blockIdx = block_index;
  for (;;) {  // one round: every live thread runs to its next barrier or its end
    bool any_live = false;
    for (size_t i = 0; i < n; ++i) {
      const size_t t = schedule == kReverse ? n - 1 - i : i;
      if (b.done[t]) continue;
      any_live = true;
      b.current = t, threadIdx = b.index[t];
      swapcontext(&b.scheduler, &b.contexts[t]);
    }
    if (!any_live) break;
  }
  running = nullptr;
}

// kernel(args...) on every thread of a grid x block launch.
template <typename... Params, typename... Args>
void launch(const dim3& grid, const dim3& block, void (*kernel)(Params...), const Args&... args) {
  TORCH_CHECK(size_t(block.x) * block.y * block.z <= 1024, "emulated launch: more than 1024 threads per block");
  const std::lock_guard<std::mutex> lock(launch_mutex);
  ++launch_count;
  const std::tuple<std::decay_t<Params>...> bound(args...);
  const auto body = [&] { std::apply(kernel, bound); };
  gridDim = grid, blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_block(body, uint3{x, y, z}, block);
}

// The device guard of the CUDA build (nothing to select on the CPU).
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

}  // namespace fastjac::cuda::emulation
