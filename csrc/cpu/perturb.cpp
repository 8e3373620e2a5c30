// CPU perturbation kernels (csrc/KERNELS.md, "Perturbations"): counter-based noise of csrc/common/philox.h,
// generated where it is consumed and never stored. Element i of a tensor uses stream element e = offset + i;
// "rows" are the slices along dim 0 (one row for a 0-dim tensor), D = numel / rows elements each.
#include <torch/library.h>

#include <algorithm>

#include "../common/philox.h"
#include "loops.h"

namespace fastjac::cpu {
namespace {

using at::Tensor;

// out[k] = z[e0 + k] for k < len, in the compute type A, one Philox block per four elements.
template <typename A>
void fill_noise(uint64_t seed, int64_t e0, int64_t len, int64_t distribution, A* __restrict__ out) {
  const int64_t end = e0 + len;
  for (int64_t b = e0 >> 2; 4 * b < end; ++b) {
    A z[4];
    noise_block<A>(seed, uint64_t(b), distribution, z);
    for (int j = 0; j < 4; ++j) {
      const int64_t e = 4 * b + j;
      if (e >= e0 && e < end) out[e - e0] = z[j];
    }
  }
}

int64_t rows_of(const Tensor& t) { return t.dim() == 0 ? 1 : t.size(0); }

void check_stream(int64_t offset, int64_t distribution, const char* op) {
  TORCH_CHECK(offset >= 0, op, ": expected offset >= 0, got ", offset);
  TORCH_CHECK(distribution == kGaussian || distribution == kRademacher, op,
              ": expected distribution 0 (Gaussian) or 1 (Rademacher), got ", distribution);
}

// philox_words: W[offset + i] for every element i of `like` (its shape only), as int64 in [0, 2^32).
Tensor philox_words(const Tensor& like, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastjac::philox_words";
  TORCH_CHECK(like.device().is_cpu(), op, ": expected like on the CPU, got ", like.device());
  check_stream(offset, kGaussian, op);
  Tensor out = at::empty(like.sizes(), like.options().dtype(at::kLong));
  int64_t* op_ = out.data_ptr<int64_t>();
  const int64_t n = out.numel();
  at::parallel_for(0, ceil_div(n, kChunk), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kChunk, i1 = std::min(n, i0 + kChunk);
      for (int64_t b = (offset + i0) >> 2; 4 * b < offset + i1; ++b) {
        const Philox4 r = philox_block(uint64_t(seed), uint64_t(b));
        for (int j = 0; j < 4; ++j) {
          const int64_t i = 4 * b + j - offset;
          if (i >= i0 && i < i1) op_[i] = int64_t(r.w[j]);
        }
      }
    }
  });
  return out;
}

// perturb_fwd: x + sigma[row] * z[offset + i]; sigma has shape () or (rows,), any floating dtype.
Tensor perturb_fwd(const Tensor& x_, const Tensor& sigma_, int64_t seed, int64_t offset, int64_t distribution) {
  constexpr const char* op = "fastjac::perturb_fwd";
  check_float_cpu(x_, op, "x");
  check_float_cpu(sigma_, op, "sigma");
  check_stream(offset, distribution, op);
  const int64_t rows = rows_of(x_);
  TORCH_CHECK(sigma_.dim() == 0 || (sigma_.dim() == 1 && sigma_.size(0) == rows), op,
              ": expected sigma of shape () or (", rows, ",), got ", sigma_.sizes());
  const Tensor x = x_.contiguous(), y = empty_output(x);
  const Tensor sigma = sigma_.to(at::kDouble).contiguous();
  const double* sp = sigma.data_ptr<double>();
  const bool per_row = sigma.dim() == 1;
  const int64_t n = x.numel(), D = rows > 0 ? n / rows : 0;
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    parallel_chunks(n, [&](int64_t i0, int64_t len) {
      alignas(64) A z[kChunk];
      fill_noise<A>(uint64_t(seed), offset + i0, len, distribution, z);
      for (int64_t k = 0; k < len;) {  // segments of one row (one sigma)
        const int64_t i = i0 + k, row = per_row ? i / D : 0;
        const int64_t stop = per_row ? std::min(len, (row + 1) * D - i0) : len;
        const A s = A(sp[row]);
        const scalar_t* xs = xp + i0;
        scalar_t* ys = yp + i0;
        FASTJAC_OMP_SIMD
        for (int64_t q = k; q < stop; ++q) ys[q] = static_cast<scalar_t>(static_cast<A>(xs[q]) + s * z[q]);
        k = stop;
      }
    });
  });
  return y;
}

// noise_row_dot: per row r, sum_j g[r, j] z[offset + r D + j], accumulated in double; float32 for
// float32 / float16 / bfloat16 g, float64 for float64 g; shape (rows,).
Tensor noise_row_dot(const Tensor& g_, int64_t seed, int64_t offset, int64_t distribution) {
  constexpr const char* op = "fastjac::noise_row_dot";
  check_float_cpu(g_, op, "g");
  check_stream(offset, distribution, op);
  const Tensor g = g_.contiguous();
  const int64_t rows = rows_of(g), n = g.numel(), D = rows > 0 ? n / rows : 0;
  const auto stat = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor out = at::empty({rows}, g.options().dtype(stat));
  FASTJAC_DISPATCH(g.scalar_type(), op, [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    std::vector<double> sums(rows, 0.0);
    const int64_t grain = std::max<int64_t>(1, kParallelMin / std::max<int64_t>(D, 1));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      alignas(64) A z[kChunk];
      for (int64_t r = r0; r < r1; ++r) {
        double total = 0.0;
        for (int64_t j = 0; j < D; j += kChunk) {  // float partial sums per chunk, double across chunks
          const int64_t len = std::min(kChunk, D - j), i0 = r * D + j;
          fill_noise<A>(uint64_t(seed), offset + i0, len, distribution, z);
          A part = A(0);
          const scalar_t* gs = gp + i0;
          _Pragma("omp simd reduction(+ : part)")
          for (int64_t k = 0; k < len; ++k) part += static_cast<A>(gs[k]) * z[k];
          total += double(part);
        }
        sums[r] = total;
      }
    });
    AT_DISPATCH_FLOATING_TYPES(stat, op, [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      for (int64_t r = 0; r < rows; ++r) o[r] = static_cast<scalar_t>(sums[r]);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastjac, CPU, m) {
  m.impl("philox_words", &philox_words);
  m.impl("perturb_fwd", &perturb_fwd);
  m.impl("noise_row_dot", &noise_row_dot);
}

}  // namespace fastjac::cpu
