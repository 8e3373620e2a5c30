// CPU BatchNorm (+ fused ReLU) kernels: csrc/KERNELS.md, "BatchNorm formulas".
//
// Every kernel is at most two passes over the data: pass 1 per-channel sums (bn_fwd: moments), per-channel
// coefficients from csrc/common/batch_norm.h, pass 2 one affine combination per element (bn_element). In eval
// mode the coefficients do not depend on the sums, so one fused pass writes the outputs and the sums.
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../common/batch_norm.h"
#include "loops.h"

namespace fastjac::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Sums = BnSums<double>;
using Moments = BnMoments<double>;
using Affine = BnAffine<double>;

// What one element loop reads and writes (compile-time flags). Inputs: u (ggx / tx), g (grad), x (as xh with
// kX; as the forward's z = bn_z(x) with kY or kZ). kZ fuses the ReLU: the mask m = bn_relu_on(z) is recomputed
// from x (csrc/KERNELS.md, "Fused ReLU"), g is read as g~ = m ? g : 0 and p is 0 where m = 0 (without kZ, m = 1
// and g~ = g). Outputs: p = m (cu u + cx xh + c0), or with kY the forward's y = z (relu(z) with kZ);
// q = cu u + cg g~ + cx xh + c0. With kSum, every sum of BnSums whose operands are read is accumulated.
enum : unsigned { kU = 1, kG = 2, kX = 4, kOutP = 8, kOutQ = 16, kY = 32, kSum = 64, kZ = 128 };

template <unsigned Extra, unsigned... Fs>
constexpr auto with_flag(std::integer_sequence<unsigned, Fs...>) {
  return std::integer_sequence<unsigned, (Fs | Extra)...>{};
}
template <unsigned... A, unsigned... B>
constexpr auto concat(std::integer_sequence<unsigned, A...>, std::integer_sequence<unsigned, B...>) {
  return std::integer_sequence<unsigned, A..., B...>{};
}

// The flag sets the kernels use, one compiled loop each (run_affine() rejects others): bn_fwd's, the one pass
// that neither reads g nor writes p (so never masked), and the others without and with the fused ReLU.
using MaskableFlags = std::integer_sequence<unsigned,  //
                                            kOutP, kU | kOutP, kX | kOutP, kU | kX | kOutP,  //
                                            kG | kX | kOutQ, kG | kX | kOutP | kOutQ, kU | kG | kX | kOutP | kOutQ,
                                            kG | kX | kSum, kU | kG | kX | kSum, kG | kX | kOutQ | kSum,
                                            kU | kG | kOutP | kOutQ | kSum, kU | kG | kX | kOutP | kOutQ | kSum>;
using AffineFlags = decltype(concat(concat(std::integer_sequence<unsigned, kY | kOutP, kY | kOutP | kZ, kU | kX | kSum>{},
                                           MaskableFlags{}),
                                    with_flag<kZ>(MaskableFlags{})));

template <typename A>
struct ChannelCoef {  // per-channel constants of one loop, in the compute type
  A mean = A(0), r = A(0);
  BnAffine<A> p, q;
  BnZ<A> z;  // the forward's z = a x + c (bn_fwd's output, the fused ReLU's mask)
};

template <bool U, bool G, bool X, typename A>
inline A affine(const BnAffine<A>& k, A u, A g, A xh) {
  A v = k.c0;
  if constexpr (X) v += k.cx * xh;
  if constexpr (G) v += k.cg * g;
  if constexpr (U) v += k.cu * u;
  return v;
}

template <typename T>
struct Ptrs {  // the arrays of one run
  const T* __restrict__ x;
  const T* __restrict__ g;
  const T* __restrict__ u;
  T* __restrict__ p;
  T* __restrict__ q;
  template <typename A>
  explicit Ptrs(const BnRun<T, A>& r)
      : x(r.at(r.io.x)), g(r.at(r.io.g)), u(r.at(r.io.u)), p(r.at(r.io.p)), q(r.at(r.io.q)) {}
};

// One element j of every pass after the forward statistics: accumulates the sums, writes the outputs.
template <unsigned F, typename T, typename A>
[[gnu::always_inline]] inline void bn_element(const ChannelCoef<A>& k, const Ptrs<T>& a, int64_t j, A& su, A& sux,
                                              A& sg, A& sgx, A& sug) {
  constexpr bool U = F & kU, G = F & kG, X = F & kX, P = F & kOutP, Q = F & kOutQ, Y = F & kY, Z = F & kZ,
                 Sum = F & kSum;
  // The mask is applied as a selection (m ? v : 0) for float and double: gcc does not vectorise the bool -> float
  // conversion of a 0 / 1 factor. For float16 / bfloat16 it is a product with m as 0 / 1 (the form these loops
  // had with a stored mask): with the selection, gcc 13 computed wrong sums u g~ in the eval row loop of
  // bfloat16 (tests/test_kernels_cpu.py::test_bn_half); to be looked at, half types are not vectorised anyway.
  constexpr bool kSelect = std::is_same_v<T, A>;
  A uj = A(0), gj = A(0), xh = A(0), z = A(0), m = A(1);
  bool on = true;
  if constexpr (U) uj = static_cast<A>(a.u[j]);
  if constexpr (X || Y || Z) {
    const A xj = static_cast<A>(a.x[j]);
    if constexpr (X) xh = (xj - k.mean) * k.r;
    if constexpr (Y || Z) z = bn_z(BnZ<A>{k.z.a, k.z.c}, xj);
  }
  if constexpr (Z) on = bn_relu_on<T>(z);
  if constexpr (Z && !kSelect) m = on ? A(1) : A(0);
  if constexpr (G) gj = !Z ? static_cast<A>(a.g[j]) : kSelect ? (on ? static_cast<A>(a.g[j]) : A(0))
                                                               : static_cast<A>(a.g[j]) * m;
  if constexpr (Sum && U) su += uj;
  if constexpr (Sum && U && X) sux += uj * xh;
  if constexpr (Sum && G) sg += gj;
  if constexpr (Sum && G && X) sgx += gj * xh;
  if constexpr (Sum && U && G) sug += uj * gj;
  if constexpr (P && Y) a.p[j] = on ? static_cast<T>(z) : T(0);
  if constexpr (P && !Y) {
    const A v = affine<U, false, X>(k.p, uj, gj, xh);
    a.p[j] = static_cast<T>(!Z ? v : kSelect ? (on ? v : A(0)) : v * m);
  }
  if constexpr (Q) a.q[j] = static_cast<T>(affine<U, G, X>(k.q, uj, gj, xh));
}

// bn_pass kernel of the affine passes: per-channel constants k, sums into BnSums.
template <unsigned F, typename T_>
struct AffinePass {
  using T = T_;
  using A = at::opmath_type<T>;
  using Acc = Sums;
  const std::vector<ChannelCoef<A>>& k;

  void row(int64_t c, const BnRun<T, A>& run, Acc& acc) const {
    const Ptrs<T> a(run);
    const ChannelCoef<A> kc = k[c];
    A su = 0, sux = 0, sg = 0, sgx = 0, sug = 0;
#pragma omp simd reduction(+ : su, sux, sg, sgx, sug)
    for (int64_t j = 0; j < run.len; ++j) bn_element<F>(kc, a, j, su, sux, sg, sgx, sug);
    if constexpr (F & kSum) acc.merge(Sums{su, sux, sg, sgx, sug});
  }

  // Column mode: the constants and float sums per position (element e of the block is channel c0 + e / S).
  struct Columns {
    enum { kMean, kR, kPu, kPx, kP0, kQu, kQg, kQx, kQ0, kZa, kZc, kSu, kSux, kSg, kSgx, kSug, kArrays };
    int64_t S, L, stride;  // arrays `stride` apart: padded so that they do not alias at 4 KiB
    std::vector<A> buf;
    A* at(int a) { return buf.data() + a * stride; }
    Columns(const AffinePass& pass, int64_t c0, int64_t nc, int64_t S_)
        : S(S_), L(nc * S_), stride(ceil_div(L, 16) * 16 + 16), buf(kArrays * stride, A(0)) {
      for (int64_t e = 0; e < L; ++e) {
        const ChannelCoef<A>& kc = pass.k[c0 + e / S];
        for (auto [a, v] : {std::pair{kMean, kc.mean}, {kR, kc.r}, {kPu, kc.p.cu}, {kPx, kc.p.cx}, {kP0, kc.p.c0},
                            {kQu, kc.q.cu}, {kQg, kc.q.cg}, {kQx, kc.q.cx}, {kQ0, kc.q.c0}, {kZa, kc.z.a},
                            {kZc, kc.z.c}})
          at(a)[e] = v;
      }
    }
    void run(const BnRun<T, A>& run) {
      const Ptrs<T> a(run);
      const A *mean = at(kMean), *r = at(kR), *pu = at(kPu), *px = at(kPx), *p0 = at(kP0), *qu = at(kQu),
              *qg = at(kQg), *qx = at(kQx), *q0 = at(kQ0), *za = at(kZa), *zc = at(kZc);
      A *su = at(kSu), *sux = at(kSux), *sg = at(kSg), *sgx = at(kSgx), *sug = at(kSug);
      FASTJAC_OMP_SIMD
      for (int64_t j = 0; j < L; ++j) {
        const ChannelCoef<A> kc{
            mean[j], r[j], {pu[j], A(0), px[j], p0[j]}, {qu[j], qg[j], qx[j], q0[j]}, {za[j], zc[j]}};
        bn_element<F>(kc, a, j, su[j], sux[j], sg[j], sgx[j], sug[j]);
      }
    }
    void flush(Acc* acc) {
      if (!(F & kSum)) return;
      A *su = at(kSu), *sux = at(kSux), *sg = at(kSg), *sgx = at(kSgx), *sug = at(kSug);
      for (int64_t e = 0; e < L; ++e) {
        acc[e / S].merge(Sums{su[e], sux[e], sg[e], sgx[e], sug[e]});
        su[e] = sux[e] = sg[e] = sgx[e] = sug[e] = A(0);
      }
    }
  };
};

// bn_pass kernel of the bn_fwd statistics: per-channel moments.
template <typename T_>
struct MomentsPass {
  using T = T_;
  using A = at::opmath_type<T>;
  using Acc = Moments;

  // A run's mean, then squared deviations from it (re-read from L1), merged into the channel's moments.
  void row(int64_t, const BnRun<T, A>& run, Acc& acc) const {
    const T* __restrict__ x = run.at(run.io.x);
    const int64_t n = run.len;
    A s = 0, q = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += static_cast<A>(x[j]);
    const A centre = s / A(n);
#pragma omp simd reduction(+ : q)
    for (int64_t j = 0; j < n; ++j) {
      const A d = static_cast<A>(x[j]) - centre;
      q += d * d;
    }
    const double mean = double(s) / double(n), shift = mean - double(centre);
    acc.merge(double(n), mean, std::max(0.0, double(q) - double(n) * shift * shift));
  }

  // Column mode: per-position sums of x - shift and its square (shift = the position's first value), folded
  // into the channel moments by flush().
  struct Columns {
    int64_t S, L, rows = 0;
    bool shifted = false;
    std::vector<A> shift, s1, s2;
    Columns(const MomentsPass&, int64_t, int64_t nc, int64_t S_)
        : S(S_), L(nc * S_), shift(L), s1(L, A(0)), s2(L, A(0)) {}
    void run(const BnRun<T, A>& run) {
      const T* __restrict__ x = run.at(run.io.x);
      if (!shifted) std::transform(x, x + L, shift.begin(), [](T v) { return static_cast<A>(v); }), shifted = true;
      A *__restrict__ a = s1.data(), *__restrict__ b = s2.data();
      const A* __restrict__ k = shift.data();
      FASTJAC_OMP_SIMD
      for (int64_t j = 0; j < L; ++j) {
        const A d = static_cast<A>(x[j]) - k[j];
        a[j] += d;
        b[j] += d * d;
      }
      ++rows;
    }
    void flush(Acc* acc) {
      if (rows == 0) return;
      for (int64_t e = 0; e < L; ++e) {
        const double d = double(s1[e]) / double(rows);
        acc[e / S].merge(double(rows), double(shift[e]) + d, std::max(0.0, double(s2[e]) - double(s1[e]) * d));
        s1[e] = s2[e] = A(0);
      }
      rows = 0;
    }
  };
};

// Saved / computed statistics of a call.
struct Stats {
  std::vector<double> mean, invstd;  // values of the statistics tensors (float32 or float64)
  std::vector<BnZ<double>> z;        // the forward's z = a x + c per channel (set_z), when needed
  Stats(const Tensor& m, const Tensor& r) : mean(to_vector(m)), invstd(to_vector(r)) {}
  static std::vector<double> to_vector(const Tensor& t) {
    const Tensor d = t.to(at::kDouble).contiguous();
    return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
  }
  // bn_z_coef of every channel: the same values in bn_fwd and in the kernels after it, which get the forward's
  // mean and invstd tensors (exactly representable in double) and the same weight and bias.
  void set_z(const std::vector<double>& gamma, const std::vector<double>& beta) {
    z.resize(mean.size());
    for (size_t c = 0; c < z.size(); ++c) z[c] = bn_z_coef(mean[c], invstd[c], gamma[c], beta[c]);
  }
};

// Runs the affine pass with the runtime `flags` (arrays the flags do not use are not read).
template <typename T, unsigned... Fs>
std::vector<Sums> run_affine(unsigned flags, const BnGeom& geo, BnIO<T> io,
                             const std::vector<ChannelCoef<at::opmath_type<T>>>& k,
                             std::integer_sequence<unsigned, Fs...>) {
  if (!(flags & (kG | kOutP))) flags &= ~kZ;  // the mask only scales g and p
  if (!(flags & kU)) io.u = nullptr;
  if (!(flags & kG)) io.g = nullptr;
  if (!(flags & (kX | kY | kZ))) io.x = nullptr;
  if (!(flags & kOutP)) io.p = nullptr;
  if (!(flags & kOutQ)) io.q = nullptr;
  std::vector<Sums> sums;
  const bool compiled = ((flags == Fs && (sums = bn_pass(geo, io, AffinePass<Fs, T>{k}), true)) || ...);
  TORCH_CHECK(compiled, "fastjac: no BatchNorm loop compiled for flags ", flags, " (add them to AffineFlags)");
  return sums;
}

// The common shape of the kernels: pass 1 sums the operands in `sum_flags` (none when 0); coef(c, sums) gives
// the channel's (p, q) coefficients; pass 2 writes the outputs of `out_flags`. When `fused` (eval: the
// coefficients do not depend on the sums) a single pass does both. With `relu`, both passes recompute the mask
// from x with st.z (kZ). Returns the per-channel sums.
template <typename T, typename CoefFn>
std::vector<Sums> sums_then_affine(const BnGeom& geo, const BnIO<T>& io, const Stats& st, bool relu,
                                   unsigned sum_flags, unsigned out_flags, bool fused, const CoefFn& coef) {
  using A = at::opmath_type<T>;
  std::vector<ChannelCoef<A>> k(geo.C);
  for (int64_t c = 0; c < geo.C; ++c) {
    k[c].mean = A(st.mean[c]), k[c].r = A(st.invstd[c]);
    if (!st.z.empty()) k[c].z = BnZ<A>{A(st.z[c].a), A(st.z[c].c)};
  }
  TORCH_CHECK(!relu || !st.z.empty(), "fastjac: BatchNorm mask coefficients missing");
  const unsigned mask = relu ? kZ : 0;
  std::vector<Sums> sums(geo.C);
  out_flags |= mask;
  if (sum_flags) sum_flags |= kSum | mask;
  if (sum_flags && !fused) sums = run_affine(sum_flags, geo, io, k, AffineFlags{});
  auto cast = [](const Affine& a) { return BnAffine<A>{A(a.cu), A(a.cg), A(a.cx), A(a.c0)}; };
  for (int64_t c = 0; c < geo.C; ++c) {
    const std::pair<Affine, Affine> pq = coef(c, sums[c]);
    k[c].p = cast(pq.first), k[c].q = cast(pq.second);
  }
  std::vector<Sums> s2 = run_affine(fused ? sum_flags | out_flags : out_flags, geo, io, k, AffineFlags{});
  return fused ? s2 : sums;
}

// ---------------------------------------------------------------------------------------------------------
// Arguments

at::ScalarType stat_dtype(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_input(const Tensor& x, const char* op) {
  check_float_cpu(x, op, "x");
  TORCH_CHECK(x.dim() >= 2, op, ": expected x of shape N x C x ..., got ", x.sizes());
}

void check_channel(const Tensor& t, int64_t C, const char* op, const char* name) {
  check_float_cpu(t, op, name);
  TORCH_CHECK(t.numel() == C, op, ": expected ", name, " with ", C, " elements (one per channel), got shape ",
              t.sizes());
}

// Values of an optional per-channel vector (`fill` when absent).
std::vector<double> channel_values(const OptTensor& t, int64_t C, double fill, const char* op, const char* name) {
  if (!t.has_value()) return std::vector<double>(C, fill);
  check_channel(*t, C, op, name);
  return Stats::to_vector(*t);
}

// Saved statistics of bn_bwd / bn_dbwd / bn_jvp.
Stats saved_stats(const Tensor& x, const Tensor& mean, const Tensor& invstd, const char* op) {
  auto check = [&](const Tensor& t, const char* name) {
    check_channel(t, x.size(1), op, name);
    TORCH_CHECK(t.scalar_type() == stat_dtype(x), op, ": expected ", name, " of dtype ", stat_dtype(x),
                " for x of dtype ", x.scalar_type(), ", got ", t.scalar_type());
  };
  check(mean, "mean");
  check(invstd, "invstd");
  return Stats(mean, invstd);
}

// Statistics of bn_bwd / bn_dbwd / bn_jvp, with the mask coefficients when `relu` (bias is read only then).
Stats saved_stats(const Tensor& x, const Tensor& mean, const Tensor& invstd, const std::vector<double>& gamma,
                  const OptTensor& bias, bool relu, const char* op) {
  Stats st = saved_stats(x, mean, invstd, op);
  if (relu) st.set_z(gamma, channel_values(bias, x.size(1), 0.0, op, "bias"));
  return st;
}

Tensor stat_tensor(const std::vector<double>& v, const Tensor& x) {
  return at::tensor(v, at::TensorOptions().dtype(at::kDouble)).to(stat_dtype(x));
}

template <typename T>
const T* ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------------------
// Kernels

// bn_fwd: training batch statistics (biased var) and running-statistics update, or eval running statistics;
// y = z = gamma xh + beta (as bn_z), or relu(z) when `relu` (the mask is not stored: later kernels recompute it).
std::tuple<Tensor, Tensor, Tensor> bn_fwd(const Tensor& x_, const OptTensor& weight, const OptTensor& bias,
                                                  const OptTensor& running_mean, const OptTensor& running_var,
                                                  bool training, double momentum, double eps, bool relu) {
  constexpr const char* op = "fastjac::bn_fwd";
  check_input(x_, op);
  const Tensor x = x_.contiguous();
  const BnGeom geo(x);
  const auto gamma = channel_values(weight, geo.C, 1.0, op, "weight");
  const auto beta = channel_values(bias, geo.C, 0.0, op, "bias");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean and running_var must be given together");
  if (running_mean.has_value()) {
    check_channel(*running_mean, geo.C, op, "running_mean");
    check_channel(*running_var, geo.C, op, "running_var");
  }
  Tensor mean, invstd;
  if (training) {
    TORCH_CHECK(geo.count() > 1, op, ": Expected more than 1 value per channel when training, got input size ",
                x.sizes());
    std::vector<Moments> mom;
    FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
      BnIO<scalar_t> io;
      io.x = x.data_ptr<scalar_t>();
      mom = bn_pass(geo, io, MomentsPass<scalar_t>{});
    });
    std::vector<double> mu(geo.C), var(geo.C);
    for (int64_t c = 0; c < geo.C; ++c) mu[c] = mom[c].mean, var[c] = mom[c].var();
    mean = stat_tensor(mu, x);
    const Tensor v = stat_tensor(var, x);
    invstd = v.add(eps).rsqrt();
    if (running_mean.has_value()) {  // exactly the reference's update, in the running statistics' dtype
      const int64_t M = geo.count();
      running_mean->mul_(1 - momentum).add_(mean.to(running_mean->scalar_type()).mul(momentum));
      running_var->mul_(1 - momentum).add_(v.mul(M).div(M - 1).to(running_var->scalar_type()).mul(momentum));
    }
  } else {
    TORCH_CHECK(running_mean.has_value(), op, ": running_mean and running_var are required when training=false");
    mean = running_mean->to(stat_dtype(x), /*non_blocking=*/false, /*copy=*/true);
    invstd = running_var->to(stat_dtype(x)).add(eps).rsqrt();
  }
  const Tensor y = empty_output(x);
  Stats st(mean, invstd);
  st.set_z(gamma, beta);
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    BnIO<scalar_t> io;
    io.x = x.data_ptr<scalar_t>();
    io.p = y.data_ptr<scalar_t>();
    sums_then_affine(geo, io, st, relu, 0, kOutP | kY, false,
                     [&](int64_t, const Sums&) { return std::pair{Affine{}, Affine{}}; });
  });
  return {y, mean, invstd};
}

// bn_bwd: gx = gamma r (g~ - Sg/M - xh Sgx/M) (training) or gamma r g~ (eval); gw = Sgx, gb = Sg.
std::tuple<Tensor, Tensor, Tensor> bn_bwd(const Tensor& grad, const Tensor& x_, const Tensor& mean,
                                          const Tensor& invstd, const OptTensor& weight, const OptTensor& bias,
                                          bool training, bool relu) {
  constexpr const char* op = "fastjac::bn_bwd";
  check_input(x_, op);
  check_like(grad, x_, op, "grad");
  const Tensor x = x_.contiguous(), g = grad.contiguous();
  const BnGeom geo(x);
  const auto gamma = channel_values(weight, geo.C, 1.0, op, "weight");
  const Stats st = saved_stats(x, mean, invstd, gamma, bias, relu, op);
  const Tensor gx = empty_output(x);
  std::vector<Sums> sums;
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    const BnIO<scalar_t> io{ptr<scalar_t>(x), ptr<scalar_t>(g), nullptr, nullptr, gx.data_ptr<scalar_t>()};
    sums = sums_then_affine(geo, io, st, relu, kG | kX, kG | (training ? kX : 0) | kOutQ, !training,
                            [&](int64_t c, const Sums& s) {
                              const auto k = bn_bwd_coef(s, double(geo.count()), gamma[c], st.invstd[c], training);
                              return std::pair{Affine{}, k.gx};
                            });
  });
  std::vector<double> gw(geo.C), gb(geo.C);
  for (int64_t c = 0; c < geo.C; ++c) gw[c] = sums[c].gx, gb[c] = sums[c].g;
  return {gx, stat_tensor(gw, x), stat_tensor(gb, x)};
}

// bn_dbwd: (ggrad, gx, gw) of KERNELS.md with u = ggx, p = ggw, q = ggb; sums only of present operands.
std::tuple<Tensor, Tensor, Tensor> bn_dbwd(const OptTensor& ggx, const OptTensor& ggw, const OptTensor& ggb,
                                           const Tensor& grad, const Tensor& x_, const Tensor& mean,
                                           const Tensor& invstd, const OptTensor& weight, const OptTensor& bias,
                                           bool training, bool relu) {
  constexpr const char* op = "fastjac::bn_dbwd";
  check_input(x_, op);
  check_like(grad, x_, op, "grad");
  if (ggx.has_value()) check_like(*ggx, x_, op, "ggx");
  const Tensor x = x_.contiguous(), g = grad.contiguous();
  const Tensor u = ggx.has_value() ? ggx->contiguous() : Tensor();
  const BnGeom geo(x);
  const auto gamma = channel_values(weight, geo.C, 1.0, op, "weight");
  const Stats st = saved_stats(x, mean, invstd, gamma, bias, relu, op);
  const auto p = channel_values(ggw, geo.C, 0.0, op, "ggw");
  const auto q = channel_values(ggb, geo.C, 0.0, op, "ggb");
  const bool has_u = u.defined(), has_p = ggw.has_value(), has_gx = has_u || has_p;
  const unsigned U = has_u ? kU : 0;
  const unsigned sum_flags = training ? (has_gx ? kG | kX | U : 0) : (has_u ? kU | kG : 0);
  const unsigned out_flags = kOutP | U | (has_p || (training && has_u) ? kX : 0) |
                             (has_gx ? kOutQ | kG | (training ? kX | U : 0) : 0);
  const Tensor ggrad = empty_output(x), gx = has_gx ? empty_output(x) : at::zeros_like(x);
  auto coef = [&](int64_t c, const Sums& s) {
    return bn_dbwd_coef(s, double(geo.count()), gamma[c], st.invstd[c], p[c], q[c], training);
  };
  std::vector<Sums> sums;
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    const BnIO<scalar_t> io{ptr<scalar_t>(x), ptr<scalar_t>(g), ptr<scalar_t>(u), ggrad.data_ptr<scalar_t>(),
                            gx.data_ptr<scalar_t>()};
    sums = sums_then_affine(geo, io, st, relu, sum_flags, out_flags, !training, [&](int64_t c, const Sums& s) {
      const auto k = coef(c, s);
      return std::pair{k.ggrad, k.gx};
    });
  });
  std::vector<double> gw(geo.C);
  for (int64_t c = 0; c < geo.C; ++c) gw[c] = coef(c, sums[c]).gw;
  return {ggrad, gx, stat_tensor(gw, x)};
}

// bn_jvp: z_dot = gamma r (tx - mean(tx) - xh mean(tx xh)) + tw xh + tb (training; eval without the means),
// times the mask when `relu`.
Tensor bn_jvp(const OptTensor& tx, const OptTensor& tw, const OptTensor& tb, const Tensor& x_, const Tensor& mean,
              const Tensor& invstd, const OptTensor& weight, const OptTensor& bias, bool training, bool relu) {
  constexpr const char* op = "fastjac::bn_jvp";
  check_input(x_, op);
  if (tx.has_value()) check_like(*tx, x_, op, "tx");
  const Tensor x = x_.contiguous();
  const Tensor t = tx.has_value() ? tx->contiguous() : Tensor();
  const BnGeom geo(x);
  const auto gamma = channel_values(weight, geo.C, 1.0, op, "weight");
  const Stats st = saved_stats(x, mean, invstd, gamma, bias, relu, op);
  const auto dw = channel_values(tw, geo.C, 0.0, op, "tw");
  const auto db = channel_values(tb, geo.C, 0.0, op, "tb");
  const bool has_t = t.defined();
  const unsigned sum_flags = training && has_t ? kU | kX : 0;
  const unsigned out_flags = kOutP | (has_t ? kU : 0) | (tw.has_value() || (training && has_t) ? kX : 0);
  const Tensor out = empty_output(x);
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    const BnIO<scalar_t> io{ptr<scalar_t>(x), nullptr, ptr<scalar_t>(t), out.data_ptr<scalar_t>(), nullptr};
    sums_then_affine(geo, io, st, relu, sum_flags, out_flags, false, [&](int64_t c, const Sums& s) {
      return std::pair{bn_jvp_coef(s, double(geo.count()), gamma[c], st.invstd[c], dw[c], db[c], training), Affine{}};
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastjac, CPU, m) {
  m.impl("bn_fwd", &bn_fwd);
  m.impl("bn_bwd", &bn_bwd);
  m.impl("bn_dbwd", &bn_dbwd);
  m.impl("bn_jvp", &bn_jvp);
}

}  // namespace fastjac::cpu
