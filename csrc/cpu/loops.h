// Shared machinery of the CPU kernels: packed-mask I/O, parallel loop drivers, argument checks.
//
// Loop drivers hand contiguous chunks of at most kChunk elements to a kernel body, whose inner loops are
// written for the compiler to vectorise (`#pragma omp simd`). Float32 (and half / bfloat16) partial sums
// are accumulated in float within a chunk and in double across chunks.
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
#include <c10/util/FunctionRef.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common/bitmask.h"

namespace fastjac::cpu {

constexpr int64_t kChunk = 1024;           // elements per kernel-body call (float partial-sum block)
constexpr int64_t kTaskElems = 1 << 16;    // elements per parallel BatchNorm task
constexpr int64_t kParallelMin = 1 << 15;  // fewer elements than this run on one thread
constexpr int64_t kRowMin = 256;           // BatchNorm rows (spatial size) at least this long are read in place
constexpr int64_t kTile = 4096;            // shorter rows are gathered into channel-major tiles of this size
constexpr int64_t kTileSegment = 32;       // ... reading at least this many contiguous elements per row

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Dtypes of every kernel; inside, scalar_t is the element type and at::opmath_type<scalar_t> the compute type
// (float for float32 / float16 / bfloat16, double for float64).
#define FASTJAC_DISPATCH(dtype, op, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, __VA_ARGS__)

// `#pragma omp simd` usable inside macro arguments (e.g. the lambdas of FASTJAC_DISPATCH).
#define FASTJAC_OMP_SIMD _Pragma("omp simd")

// Calls f(std::bool_constant<b>{}...) for the runtime bools b...: compile-time specialisation of loops.
template <typename F>
inline void with_bools(F&& f) {
  f();
}
template <typename F, typename... Bools>
inline void with_bools(F&& f, bool b, Bools... rest) {
  if (b) {
    with_bools([&](auto... cs) { f(std::true_type{}, cs...); }, rest...);
  } else {
    with_bools([&](auto... cs) { f(std::false_type{}, cs...); }, rest...);
  }
}

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

// kChunk ones: the expanded mask when there is none.
template <typename A>
inline const A* ones() {
  static const std::vector<A> v(kChunk, A(1));
  return v.data();
}

// Records y[k] > 0 as mask elements i0 + k, k < len. Bytes fully inside the range are stored. A partially
// covered byte is OR-ed atomically when `shared` (other threads may own its other bits; the mask must be
// zero-initialised); otherwise the caller owns it and writes [i0, i0 + len) in increasing order.
template <typename T>
inline void pack_positive(const T* y, int64_t i0, int64_t len, uint8_t* mask, bool shared) {
  using A = at::opmath_type<T>;
  const int64_t end = i0 + len;
  auto partial = [&](int64_t a, int64_t b) {  // [a, b) inside one byte
    const uint8_t bits = static_cast<uint8_t>(
        mask_pack_byte([&](int j) { return static_cast<A>(y[a - i0 + j]) > A(0); }, int(b - a)) << (a & 7));
    uint8_t* byte = mask + mask_byte_index(a);
    if (shared) {
      if (bits) __atomic_fetch_or(byte, bits, __ATOMIC_RELAXED);
    } else {
      *byte = static_cast<uint8_t>(((a & 7) ? *byte : 0) | bits);
    }
  };
  int64_t i = i0;
  const int64_t head = std::min(end, (i0 + 7) & ~int64_t(7));
  if (i < head) partial(i, head), i = head;
  for (; i + 8 <= end; i += 8)
    mask[i >> 3] = mask_pack_byte([&](int j) { return static_cast<A>(y[i - i0 + j]) > A(0); });
  if (i < end) partial(i, end);
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise driver: body(i0, len) over [0, numel) in parallel. Every chunk starts on a mask byte boundary
// and each thread owns whole mask bytes, so bodies may write mask bytes with pack_positive(shared=false).
template <typename Body>
inline void parallel_chunks(int64_t numel, const Body& body) {
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
  const uint8_t* mask = nullptr;  // read, expanded into BnChunk::m
  T* p = nullptr;
  T* q = nullptr;
  uint8_t* mask_out = nullptr;  // written after each chunk: bits of p > 0 (zero-initialised mask)
};

// One contiguous run of `len` (<= kChunk) elements of one channel, as seen by a kernel body.
template <typename T, typename A>
struct BnChunk {
  const T* x;
  const T* g;
  const T* u;
  const A* m;  // mask as 0 / 1 (ones when there is none)
  T* p;
  T* q;
  int64_t len;
};

template <typename Acc, typename T, typename A>
using BnBody = c10::function_ref<void(int64_t channel, const BnChunk<T, A>& chunk, Acc& acc)>;

namespace detail {

template <typename T>
inline T* at_offset(T* ptr, int64_t i) {
  return ptr ? ptr + i : nullptr;
}

template <typename T, typename A>
struct Tile {  // channel-major copies of a block of rows: element (cc, r, s) at (cc nr + r) S + s
  std::unique_ptr<T[]> x, g, u, p, q;
  std::unique_ptr<A[]> m;
  explicit Tile(const BnIO<T>& io) {
    auto alloc = [](auto& buf, bool used) {
      if (used) buf.reset(new std::remove_reference_t<decltype(buf[0])>[kTile]);
    };
    alloc(x, io.x), alloc(g, io.g), alloc(u, io.u), alloc(p, io.p), alloc(q, io.q), alloc(m, io.mask);
  }
};

// Runs of channels [c0, c1), rows [n0, n1): gather into tiles, run the body per channel, scatter outputs.
template <typename Acc, typename T, typename A>
void bn_tiles(const BnGeom& geo, const BnIO<T>& io, BnBody<Acc, T, A> body, Tile<T, A>& tile, int64_t c0,
              int64_t c1, int64_t n0, int64_t n1, Acc* acc) {
  const int64_t C = geo.C, S = geo.S, nc = c1 - c0;
  const int64_t R = std::max<int64_t>(1, kTile / (nc * S));
  for (int64_t nb = n0; nb < n1; nb += R) {
    const int64_t nr = std::min(R, n1 - nb), run = nr * S;
    auto each = [&](auto&& f) {  // f(tile index, global index) over the tile
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t cc = 0; cc < nc; ++cc) {
          const int64_t t = (cc * nr + r) * S, i = ((nb + r) * C + c0 + cc) * S;
          for (int64_t s = 0; s < S; ++s) f(t + s, i + s);
        }
    };
    auto gather = [&](const T* src, T* dst) {
      if (src) each([&](int64_t t, int64_t i) { dst[t] = src[i]; });
    };
    gather(io.x, tile.x.get()), gather(io.g, tile.g.get()), gather(io.u, tile.u.get());
    if (io.mask) each([&](int64_t t, int64_t i) { tile.m[t] = A(mask_get(io.mask, i)); });
    for (int64_t cc = 0; cc < nc; ++cc) {
      for (int64_t k = 0; k < run; k += kChunk) {
        const int64_t o = cc * run + k;
        const BnChunk<T, A> ch{at_offset<const T>(tile.x.get(), o), at_offset<const T>(tile.g.get(), o),
                               at_offset<const T>(tile.u.get(), o), io.mask ? tile.m.get() + o : ones<A>(),
                               at_offset(tile.p.get(), o), at_offset(tile.q.get(), o), std::min(kChunk, run - k)};
        body(c0 + cc, ch, acc[c0 + cc]);
      }
    }
    if (io.p) each([&](int64_t t, int64_t i) { io.p[i] = tile.p[t]; });
    if (io.q) each([&](int64_t t, int64_t i) { io.q[i] = tile.q[t]; });
    if (io.mask_out)
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = ((nb + r) * C + c0) * S;
        pack_positive(io.p + i, i, nc * S, io.mask_out, /*shared=*/true);
      }
  }
}

// Elements [j0, j1) of channel c's N * S (flat over its rows), read in place.
template <typename Acc, typename T, typename A>
void bn_rows(const BnGeom& geo, const BnIO<T>& io, BnBody<Acc, T, A> body, int64_t c, int64_t j0, int64_t j1,
             Acc& acc) {
  alignas(64) A mbuf[kChunk];
  for (int64_t j = j0; j < j1;) {
    const int64_t n = j / geo.S, s = j - n * geo.S;
    const int64_t len = std::min({kChunk, geo.S - s, j1 - j});
    const int64_t i = (n * geo.C + c) * geo.S + s;
    if (io.mask) expand_mask(io.mask, i, len, mbuf);
    const BnChunk<T, A> ch{at_offset(io.x, i), at_offset(io.g, i), at_offset(io.u, i),
                           io.mask ? mbuf : ones<A>(), at_offset(io.p, i), at_offset(io.q, i), len};
    body(c, ch, acc);
    if (io.mask_out) pack_positive(io.p + i, i, len, io.mask_out, /*shared=*/true);
    j += len;
  }
}

}  // namespace detail

// One pass over a BatchNorm tensor: body(c, chunk, acc[c]) for every chunk, in parallel over tasks (a block of
// channels x a range of their rows), returning per-channel accumulators (Acc: default = empty,
// merge(const Acc&)). The task split depends only on the shape, so results do not depend on the thread count.
template <typename Acc, typename T, typename A>
std::vector<Acc> bn_channel_pass(const BnGeom& geo, const BnIO<T>& io, BnBody<Acc, T, A> body) {
  const int64_t C = geo.C, S = geo.S, per_c = geo.count();
  std::vector<Acc> result(C);
  if (geo.numel() == 0) return result;
  const bool rows = S >= kRowMin;
  const int64_t cb = rows ? 1 : std::min(C, ceil_div(kTileSegment, S));  // channels per task
  const int64_t unit = rows ? 64 : S;                                    // split granularity along N * S
  const int64_t want = std::clamp<int64_t>(ceil_div(per_c * cb, kTaskElems), 1, ceil_div(per_c, unit));
  const int64_t span = ceil_div(ceil_div(per_c, want), unit) * unit;
  const int64_t nsplit = ceil_div(per_c, span), nblocks = ceil_div(C, cb);
  std::vector<Acc> parts(nsplit * C);
  const int64_t grain = std::max<int64_t>(1, kParallelMin / (span * cb));
  at::parallel_for(0, nblocks * nsplit, grain, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<detail::Tile<T, A>> tile;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t sp = t % nsplit, c0 = (t / nsplit) * cb, c1 = std::min(C, c0 + cb);
      const int64_t j0 = sp * span, j1 = std::min(per_c, j0 + span);
      Acc* acc = parts.data() + sp * C;
      if (rows) {
        detail::bn_rows<Acc, T, A>(geo, io, body, c0, j0, j1, acc[c0]);
      } else {
        if (!tile) tile = std::make_unique<detail::Tile<T, A>>(io);
        detail::bn_tiles<Acc, T, A>(geo, io, body, *tile, c0, c1, j0 / S, j1 / S, acc);
      }
    }
  });
  for (int64_t sp = 0; sp < nsplit; ++sp)
    for (int64_t c = 0; c < C; ++c) result[c].merge(parts[sp * C + c]);
  return result;
}

// ---------------------------------------------------------------------------------------------------------
// Argument checks

inline void check_float_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected ", name,
              " to be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// `t` must have x's shape and dtype.
inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ", t.device());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": expected ", name, " of shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": expected ", name, " of dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
}

// A packed mask for `numel` elements.
inline void check_mask(const at::Tensor& mask, int64_t numel, const char* op) {
  TORCH_CHECK(mask.device().is_cpu(), op, ": expected mask on the CPU, got ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kByte, op, ": expected mask of dtype uint8, got ", mask.scalar_type());
  TORCH_CHECK(mask.numel() == mask_bytes(numel), op, ": expected a packed mask of ", mask_bytes(numel),
              " bytes for ", numel, " elements, got ", mask.numel());
}

}  // namespace fastjac::cpu
