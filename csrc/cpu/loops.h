// Shared machinery of the CPU kernels: packed-mask I/O, parallel loop drivers, argument checks.
//
// Loop drivers hand contiguous runs of at most kChunk elements to a kernel body, whose inner loops are
// written for the compiler to vectorise (`#pragma omp simd`). Float32 (and half / bfloat16) partial sums
// are accumulated in float within a run (or kFlushRows rows) and in double across them.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/aten_utils.h"
#include "../common/bitmask.h"
#include "../common/relu.h"
#include "output_pool.h"  // empty_output: the kernels' large outputs, on reused pages

namespace fastjac::cpu {

constexpr int64_t kChunk = 1024;           // elements per kernel-body call (float partial-sum block)
constexpr int64_t kTaskElems = 1 << 16;    // elements per parallel BatchNorm task
constexpr int64_t kParallelMin = 1 << 15;  // fewer elements than this run on one thread
constexpr int64_t kRowMin = 256;           // BatchNorm: spatial sizes from which rows are processed one channel
constexpr int64_t kStream = 1 << 14;       // ... at a time, streaming this many elements across channels,
constexpr int64_t kSegment = 512;          // ... else blocks of channels spanning this many elements ("columns")
constexpr int64_t kFlushRows = 64;         // ... whose float per-position sums are flushed to double this often

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// `#pragma omp simd` usable inside macro arguments (e.g. the lambdas of FASTJAC_DISPATCH).
#define FASTJAC_OMP_SIMD _Pragma("omp simd")

// ---------------------------------------------------------------------------------------------------------
// Packed masks

template <typename A>
struct MaskTable {  // bits[b][j] = bit j of byte b, as 0 / 1
  A bits[256][8];
  constexpr MaskTable() : bits{} {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) bits[b][j] = A((b >> j) & 1);
  }
};
template <typename A>
inline constexpr MaskTable<A> kMaskTable{};

// m[k] = element i0 + k of the mask as 0 / 1, for k < len.
template <typename A>
inline void expand_mask(const uint8_t* mask, int64_t i0, int64_t len, A* __restrict__ m) {
  int64_t k = 0;
  for (; k < len && ((i0 + k) & 7) != 0; ++k) m[k] = A(mask_get(mask, i0 + k));
  for (; k + 8 <= len; k += 8) std::memcpy(m + k, kMaskTable<A>.bits[mask[(i0 + k) >> 3]], 8 * sizeof(A));
  for (; k < len; ++k) m[k] = A(mask_get(mask, i0 + k));
}

// Records relu_on(y[k]) (y[k] > 0 or NaN) as mask elements i0 + k, k < len. Bytes fully inside the range are stored. A partially
// covered byte is OR-ed atomically when `shared` (other threads may own its other bits; the mask must be
// zero-initialised); otherwise the caller owns it and writes [i0, i0 + len) in increasing order.
template <typename T>
inline void pack_relu_mask(const T* y, int64_t i0, int64_t len, uint8_t* mask, bool shared) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "flag bytes are packed as little-endian words");
  using A = at::opmath_type<T>;
  alignas(64) uint8_t flag[kChunk];
  for (int64_t base = 0; base < len; base += kChunk) {  // blocks of kChunk flags, computed vectorised
    const int64_t n = std::min(kChunk, len - base), b0 = i0 + base, end = b0 + n;
    const T* __restrict__ yb = y + base;
    FASTJAC_OMP_SIMD
    for (int64_t k = 0; k < n; ++k) flag[k] = relu_on(static_cast<A>(yb[k]));
    auto partial = [&](int64_t a, int64_t b) {  // [a, b) inside one byte
      const uint8_t bits =
          static_cast<uint8_t>(mask_pack_byte([&](int j) { return flag[a - b0 + j]; }, int(b - a)) << (a & 7));
      uint8_t* byte = mask + mask_byte_index(a);
      if (shared) {
        if (bits) __atomic_fetch_or(byte, bits, __ATOMIC_RELAXED);
      } else {
        *byte = static_cast<uint8_t>(((a & 7) ? *byte : 0) | bits);
      }
    };
    int64_t i = b0;
    const int64_t head = std::min(end, (b0 + 7) & ~int64_t(7));
    if (i < head) partial(i, head), i = head;
    for (; i + 8 <= end; i += 8) {  // eight 0/1 bytes -> bits 0..7: byte k lands on bit 56 + k
      uint64_t word;
      std::memcpy(&word, flag + (i - b0), 8);
      mask[i >> 3] = static_cast<uint8_t>((word * 0x0102040810204080ull) >> 56);
    }
    if (i < end) partial(i, end);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise driver: body(i0, len) over [0, numel) in parallel. Every chunk starts on a mask byte boundary
// and each thread owns whole mask bytes, so bodies may write mask bytes with pack_relu_mask(shared=false).
template <typename Body>
inline void parallel_chunks(int64_t numel, const Body& body) {
  if (numel <= kParallelMin) {  // one thread: no parallel_for bookkeeping (it matters on tiny tensors)
    for (int64_t i = 0; i < numel; i += kChunk) body(i, std::min(kChunk, numel - i));
    return;
  }
  at::parallel_for(0, mask_bytes(numel), kParallelMin / 8, [&](int64_t b0, int64_t b1) {
    const int64_t end = std::min(numel, b1 * 8);
    for (int64_t i = b0 * 8; i < end; i += kChunk) body(i, std::min(kChunk, end - i));
  });
}

// ---------------------------------------------------------------------------------------------------------
// BatchNorm driver. x is viewed as N x C x S (S = prod(spatial)); channel c owns the N rows of S elements
// starting at (n C + c) S.

struct BnGeom {
  int64_t N, C, S = 1;
  explicit BnGeom(const at::Tensor& x) : N(x.size(0)), C(x.size(1)) {
    for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  }
  int64_t numel() const { return N * C * S; }
  int64_t count() const { return N * S; }  // M, elements per channel
};

// Whole-tensor arrays of one pass (nullptr = not read / not written).
template <typename T>
struct BnIO {
  const T* x = nullptr;
  const T* g = nullptr;
  const T* u = nullptr;
  T* p = nullptr;
  T* q = nullptr;
};

// A contiguous run of `len` elements from flat index i handed to a kernel.
template <typename T, typename A>
struct BnRun {
  const BnIO<T>& io;
  int64_t i, len;
  template <typename P>
  P* at(P* ptr) const {
    return ptr ? ptr + i : nullptr;
  }
};

// A software prefetch of the inputs' elements [i, i + len), one per cache line. Column mode reads one short
// segment (nc S <= kSegment elements) per row, the next one C S elements on: the hardware prefetchers lose the
// stream at every such jump, so each segment asks for the next row's while it computes (BN and BN+ReLU
// fwd+bwd+dbwd 7-18 % faster at 128x256x8x8, 128x512x4x4, 256x512x2x2 and 4096x1024 on AMD Zen 5,
// benchmarks/RESULTS.md, stop 26). Row mode streams kStream contiguous elements, which the hardware follows; a
// prefetch there made BN 8 % slower.
template <typename T>
inline void prefetch_inputs(const BnIO<T>& io, int64_t i, int64_t len) {
#if defined(__GNUC__)
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  for (const T* p : {io.x, io.g, io.u})
    if (p)
      for (int64_t k = 0; k < len; k += kLine) __builtin_prefetch(p + i + k, 0, 3);
#endif
}

// One pass over a BatchNorm tensor with kernel K, in parallel over tasks (a block of channels x a range of
// their rows), returning per-channel accumulators. The split depends only on the shape, so results do not
// depend on the thread count. K provides
//   T, A (compute type), Acc (per-channel accumulator: default-constructed empty, merge(const Acc&));
//   row(c, run, acc): a run inside one row of channel c (len <= kChunk);
//   Columns(kernel, c0, nc, S), .run(run), .flush(acc): "column" mode for short rows (S < kRowMin), where each
//   run is one row of the block of channels [c0, c0 + nc) (nc S contiguous elements, element j of channel
//   c0 + j / S) and the kernel accumulates per position, folded into acc[0 .. nc) by flush().
// Both modes read contiguous segments of about kStream / kSegment elements (rows of consecutive channels), not
// one channel's strided rows: each of those may sit on its own page, defeating prefetchers and TLBs.
template <typename K>
std::vector<typename K::Acc> bn_pass(const BnGeom& geo, const BnIO<typename K::T>& io, const K& kernel) {
  using T = typename K::T;
  using A = typename K::A;
  using Acc = typename K::Acc;
  static_assert(kSegment <= kChunk && kRowMin <= kChunk, "runs are at most kChunk elements");
  const int64_t C = geo.C, S = geo.S, per_c = geo.count();
  std::vector<Acc> result(C);
  if (geo.numel() == 0) return result;
  const bool rows = S >= kRowMin;
  // Channels per task: rows are read in memory order across a block of channels, streaming segments of
  // kStream (row mode) or kSegment (column mode) contiguous elements; the split along N * S is by whole rows
  // unless one row holds a whole stream.
  const int64_t cb = std::clamp<int64_t>((rows ? kStream : kSegment) / S, 1, C);
  const int64_t unit = cb > 1 || !rows ? S : 64;
  const int64_t want = std::clamp<int64_t>(ceil_div(per_c * cb, kTaskElems), 1, ceil_div(per_c, unit));
  const int64_t span = ceil_div(ceil_div(per_c, want), unit) * unit;
  const int64_t nsplit = ceil_div(per_c, span), nblocks = ceil_div(C, cb);
  std::vector<Acc> parts(nsplit * C);
  const int64_t grain = std::max<int64_t>(1, kParallelMin / (span * cb));
  at::parallel_for(0, nblocks * nsplit, grain, [&](int64_t t0, int64_t t1) {
    auto visit = [&](int64_t i, int64_t len, auto&& f) { f(BnRun<T, A>{io, i, len}); };
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t sp = t % nsplit, c0 = (t / nsplit) * cb, nc = std::min(C - c0, cb);
      const int64_t j0 = sp * span, j1 = std::min(per_c, j0 + span);  // this task's part of each channel
      Acc* acc = parts.data() + sp * C + c0;
      if (rows) {
        for (int64_t n = j0 / S; n * S < j1; ++n) {
          const int64_t s0 = std::max<int64_t>(j0 - n * S, 0), s1 = std::min(j1 - n * S, S);
          for (int64_t c = 0; c < nc; ++c)
            for (int64_t s = s0; s < s1; s += kChunk)
              visit((n * C + c0 + c) * S + s, std::min(kChunk, s1 - s),
                    [&](const BnRun<T, A>& run) { kernel.row(c0 + c, run, acc[c]); });
        }
      } else {
        typename K::Columns cols(kernel, c0, nc, S);
        for (int64_t n = j0 / S; n < j1 / S; ++n) {
          if (n + 1 < j1 / S) prefetch_inputs(io, ((n + 1) * C + c0) * S, nc * S);
          visit((n * C + c0) * S, nc * S, [&](const BnRun<T, A>& run) { cols.run(run); });
          if ((n - j0 / S + 1) % kFlushRows == 0) cols.flush(acc);
        }
        cols.flush(acc);
      }
    }
  });
  for (int64_t sp = 0; sp < nsplit; ++sp)
    for (int64_t c = 0; c < C; ++c) result[c].merge(parts[sp * C + c]);
  return result;
}

// ---------------------------------------------------------------------------------------------------------
// Argument checks (csrc/common/aten_utils.h)

inline void check_float_cpu(const at::Tensor& t, const char* op, const char* name) {
  check_float(t, at::Device(at::kCPU), op, name);
}

}  // namespace fastjac::cpu
