// The output pool of the CPU kernels: large outputs on pages that are reused, not faulted in afresh.
//
// A large CPU tensor (>= 1 MiB) from c10's allocator is a fresh mmap: its first write faults every page in and
// the kernel zeroes each one, which on this project's 2-core hosts costs more than the kernel that writes it
// (benchmarks/RESULTS.md, "The CPU output pool, ...": filling a fresh 32 MiB tensor took 7.6 ms against 2.9 ms for
// a reused one). The pool keeps the blocks of freed outputs and hands them to the next output of the same
// size, as PyTorch's CUDA caching allocator does for device memory.
//
// Memory rule: the pool never raises peak resident memory above what the same program reaches without it. A
// freed block is kept (resident memory stays where it was, where c10 would have dropped it); an allocation that
// finds no block of its size first releases kept blocks of at least its size (oldest first) before mapping a
// new one, so resident memory then rises by no more than without the pool (up to the rounding of a block to
// whole pages: a reused block may hold pages that its previous, slightly larger output of the same rounded size
// touched). Kept memory is also bounded (FASTJAC_CPU_POOL_MB, default a quarter of physical memory up to 8 GiB;
// 0 disables the pool) and released by release_output_pool() (Python: fastjac.empty_cache()). Allocations and frees are reported to the PyTorch
// profiler's memory events as c10's CPU allocator reports its own.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastjac::cpu {

// A new contiguous tensor shaped like `like` (its dtype and device), from the pool when large.
at::Tensor empty_output(const at::Tensor& like);

struct OutputPoolStats {
  int64_t live_bytes = 0;    // bytes of pool blocks held by tensors
  int64_t cached_bytes = 0;  // bytes of kept, free blocks
  int64_t limit_bytes = 0;   // bound on cached_bytes (0: the pool is off)
  int64_t hits = 0, misses = 0, released_blocks = 0;
};

OutputPoolStats output_pool_stats();
// Unmaps every kept block.
void release_output_pool();
// Sets the bound on kept bytes (0 turns caching off; blocks beyond the bound are released).
void set_output_pool_limit(int64_t bytes);

}  // namespace fastjac::cpu
