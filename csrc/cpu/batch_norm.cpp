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
#include "../common/batch_norm_element.h"
#include "channel_vectors.h"
#include "loops.h"

namespace fastjac::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Sums = BnSums<double>;
using Moments = BnMoments<double>;
using Affine = BnAffine<double>;

template <typename A>
using ChannelCoef = BnChannel<A>;  // per-channel constants of one loop, in the compute type

template <typename T, typename A>
BnPtrs<T> ptrs(const BnRun<T, A>& r) {  // the arrays of one run
  return BnPtrs<T>{r.at(r.io.x), r.at(r.io.g), r.at(r.io.u), r.at(r.io.p), r.at(r.io.q)};
}

// bn_pass kernel of the affine passes: per-channel constants k, sums into BnSums.
template <unsigned F, typename T_>
struct AffinePass {
  using T = T_;
  using A = at::opmath_type<T>;
  using Acc = Sums;
  const std::vector<ChannelCoef<A>>& k;

  void row(int64_t c, const BnRun<T, A>& run, Acc& acc) const {
    const BnPtrs<T> a = ptrs(run);
    const ChannelCoef<A> kc = k[c];
    A su = 0, sux = 0, sg = 0, sgx = 0, sug = 0;
#pragma omp simd reduction(+ : su, sux, sg, sgx, sug)
    for (int64_t j = 0; j < run.len; ++j) bn_element<F>(kc, a, j, su, sux, sg, sgx, sug);
    if constexpr (F & kSum) acc.merge(Sums{su, sux, sg, sgx, sug});
  }

  // Column mode: float sums per position (element e of the block is channel c0 + e / S). Rows of at least
  // kBroadcastMin elements run channel by channel with its constants broadcast (as row()); shorter ones read the
  // constants from per-position arrays too. Both compute every element and sum alike.
  static constexpr int64_t kBroadcastMin = 16;
  struct Columns {
    enum { kMean, kR, kPu, kPx, kP0, kQu, kQg, kQx, kQ0, kZa, kZc, kSu, kSux, kSg, kSgx, kSug, kArrays };
    const AffinePass& pass;
    int64_t c0, nc, S, L, stride;  // arrays `stride` apart: padded so that they do not alias at 4 KiB
    std::vector<A> buf;
    A* at(int a) { return buf.data() + a * stride; }
    Columns(const AffinePass& pass_, int64_t c0_, int64_t nc_, int64_t S_)
        : pass(pass_), c0(c0_), nc(nc_), S(S_), L(nc_ * S_), stride(ceil_div(L, 16) * 16 + 16),
          buf(kArrays * stride, A(0)) {
      if (S >= kBroadcastMin) return;
      for (int64_t e = 0; e < L; ++e) {
        const ChannelCoef<A>& kc = pass.k[c0 + e / S];
        for (auto [a, v] : {std::pair{kMean, kc.mean}, {kR, kc.r}, {kPu, kc.p.cu}, {kPx, kc.p.cx}, {kP0, kc.p.c0},
                            {kQu, kc.q.cu}, {kQg, kc.q.cg}, {kQx, kc.q.cx}, {kQ0, kc.q.c0}, {kZa, kc.z.a},
                            {kZc, kc.z.c}})
          at(a)[e] = v;
      }
    }
    void run(const BnRun<T, A>& run) {
      if (S >= kBroadcastMin) {
        for (int64_t c = 0; c < nc; ++c) {
          const BnPtrs<T> a = ptrs(BnRun<T, A>{run.io, run.i + c * S, S});
          const ChannelCoef<A> kc = pass.k[c0 + c];
          A *su = at(kSu) + c * S, *sux = at(kSux) + c * S, *sg = at(kSg) + c * S, *sgx = at(kSgx) + c * S,
            *sug = at(kSug) + c * S;
          FASTJAC_OMP_SIMD
          for (int64_t j = 0; j < S; ++j) bn_element<F>(kc, a, j, su[j], sux[j], sg[j], sgx[j], sug[j]);
        }
        return;
      }
      const BnPtrs<T> a = ptrs(run);
      const A *mean = at(kMean), *r = at(kR), *pu = at(kPu), *px = at(kPx), *p0 = at(kP0), *qu = at(kQu),
              *qg = at(kQg), *qx = at(kQx), *q0 = at(kQ0), *za = at(kZa), *zc = at(kZc);
      A *su = at(kSu), *sux = at(kSux), *sg = at(kSg), *sgx = at(kSgx), *sug = at(kSug);
      FASTJAC_OMP_SIMD
      for (int64_t j = 0; j < L; ++j)
        element(a, j, mean[j], r[j], pu[j], px[j], p0[j], qu[j], qg[j], qx[j], q0[j], za[j], zc[j], su[j], sux[j],
                sg[j], sgx[j], sug[j]);
    }
    // One element with its position's constants, passed as scalars. The ChannelCoef is built here, not in the
    // `omp simd` loop: there it would be an addressable per-iteration local, which gcc's OpenMP lowering (before
    // inlining) makes a per-lane array of structs that the vectoriser then rejects ("no vectype for stmt
    // D[_31].p.cg = 0.0"), so every column loop with outputs ran scalar, and with the fused ReLU the mask's
    // selection became an unpredictable branch (BN+ReLU 3-4x BN's time at 128x256x8x8).
    FASTJAC_INLINE static void element(const BnPtrs<T>& a, int64_t j, A mean, A r, A pu, A px, A p0, A qu, A qg,
                                       A qx, A q0, A za, A zc, A& su, A& sux, A& sg, A& sgx, A& sug) {
      const ChannelCoef<A> kc{mean, r, {pu, A(0), px, p0}, {qu, qg, qx, q0}, {za, zc}};
      bn_element<F>(kc, a, j, su, sux, sg, sgx, sug);
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
    acc.merge(double(n), mean, std::max(0.0, double(q) - double(n) * shift * shift), double(s));
  }

  // Column mode: per-position sums of x - shift and its square (shift = the position's first value, or 0 where
  // that is not finite, so that shift + sum / rows and the plain sum shift rows + sum are PyTorch's inf for a
  // channel holding +inf, bn_mean_var), folded into the channel moments by flush().
  struct Columns {
    int64_t S, L, rows = 0;
    bool shifted = false;
    std::vector<A> shift, s1, s2;
    Columns(const MomentsPass&, int64_t, int64_t nc, int64_t S_)
        : S(S_), L(nc * S_), shift(L), s1(L, A(0)), s2(L, A(0)) {}
    void run(const BnRun<T, A>& run) {
      const T* __restrict__ x = run.at(run.io.x);
      if (!shifted) {
        std::transform(x, x + L, shift.begin(), [](T v) {
          const A a = static_cast<A>(v);
          return std::isfinite(a) ? a : A(0);
        });
        shifted = true;
      }
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
        acc[e / S].merge(double(rows), double(shift[e]) + d, std::max(0.0, double(s2[e]) - double(s1[e]) * d),
                         double(shift[e]) * double(rows) + double(s1[e]));
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
  Stats(const Tensor& m, const Tensor& r) : mean(read_channels(m)), invstd(read_channels(r)) {}
  // bn_z_coef of every channel: the same values in bn_fwd and in the kernels after it, which get the forward's
  // mean and invstd tensors (exactly representable in double) and the same weight and bias.
  void set_z(const std::vector<double>& gamma, const std::vector<double>& beta) {
    z.resize(mean.size());
    for (size_t c = 0; c < z.size(); ++c) z[c] = bn_z_coef(mean[c], invstd[c], gamma[c], beta[c]);
  }
};

// Runs the affine pass with the runtime `flags` (arrays the flags do not use are not read).
template <typename T, unsigned... Fs>
std::vector<Sums> run_affine(unsigned flags, const BnGeom& geo, const BnIO<T>& io_all,
                             const std::vector<ChannelCoef<at::opmath_type<T>>>& k,
                             std::integer_sequence<unsigned, Fs...>) {
  flags = bn_loop_flags(flags);
  const BnIO<T> io = bn_loop_io(flags, io_all);
  std::vector<Sums> sums;
  const bool compiled = ((flags == Fs && (sums = bn_pass(geo, io, AffinePass<Fs, T>{k}), true)) || ...);
  TORCH_CHECK(compiled, "fastjac: no BatchNorm loop compiled for flags ", flags, " (add them to BnAffineFlags)");
  return sums;
}

// Per-channel inputs of a kernel, as double.
struct ChannelArgs {
  std::vector<double> gamma, p, q;  // weight (or 1); ggw, ggb (bn_dbwd) / tw, tb (bn_jvp) (or 0)
};

// The common shape of the kernels (csrc/common/batch_norm_element.h, BnPlan): pass 1 sums, per-channel
// coefficients by bn_kernel_coef, pass 2 writes the outputs. With `relu` (kZ in the plan), both passes recompute
// the mask from x with st.z. Returns the per-channel outputs (out0, out1) of bn_kernel_coef.
template <typename T>
std::vector<std::pair<double, double>> sums_then_affine(BnKind kind, const BnPlan& plan, const BnGeom& geo,
                                                        const BnIO<T>& io, const Stats& st, const ChannelArgs& args,
                                                        bool training) {
  using A = at::opmath_type<T>;
  std::vector<ChannelCoef<A>> k(geo.C);
  for (int64_t c = 0; c < geo.C; ++c) {
    k[c].mean = A(st.mean[c]), k[c].r = A(st.invstd[c]);
    if (!st.z.empty()) k[c].z = BnZ<A>{A(st.z[c].a), A(st.z[c].c)};
  }
  TORCH_CHECK(!((plan.out | plan.sum) & kZ) || st.z.size() == size_t(geo.C),
              "fastjac: BatchNorm mask coefficients missing");
  std::vector<Sums> sums(geo.C);
  if (const unsigned first = bn_first_flags(plan)) sums = run_affine(first, geo, io, k, BnAffineFlags{});
  auto coef = [&](int64_t c, const Sums& s) {
    return bn_kernel_coef(kind, s, double(geo.count()), args.gamma[c], st.invstd[c], args.p[c], args.q[c],
                          training);
  };
  auto cast = [](const Affine& a) { return BnAffine<A>{A(a.cu), A(a.cg), A(a.cx), A(a.c0)}; };
  for (int64_t c = 0; c < geo.C; ++c) {
    const BnKernelCoef<double> kc = coef(c, sums[c]);
    k[c].p = cast(kc.p), k[c].q = cast(kc.q);
  }
  std::vector<Sums> s2 = run_affine(bn_second_flags(plan), geo, io, k, BnAffineFlags{});
  if (plan.fused) sums = s2;
  std::vector<std::pair<double, double>> out(geo.C);
  for (int64_t c = 0; c < geo.C; ++c) {
    const BnKernelCoef<double> kc = coef(c, sums[c]);
    out[c] = {kc.out0, kc.out1};
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Arguments (checks of csrc/common/aten_utils.h)

// Values of an optional per-channel vector (`fill` when absent).
std::vector<double> channel_values(const OptTensor& t, const Tensor& x, double fill, const char* op,
                                   const char* name) {
  if (!t.has_value()) return std::vector<double>(x.size(1), fill);
  bn_check_channel(*t, x, op, name);
  return read_channels(*t);
}

// Statistics of bn_bwd / bn_dbwd / bn_jvp, with the mask coefficients when `relu` (bias is read only then).
Stats saved_stats(const Tensor& x, const Tensor& mean, const Tensor& invstd, const std::vector<double>& gamma,
                  const OptTensor& bias, bool relu, const char* op) {
  bn_check_saved_stats(x, mean, invstd, op);
  Stats st(mean, invstd);
  if (relu) st.set_z(gamma, channel_values(bias, x, 0.0, op, "bias"));
  return st;
}

Tensor stat_tensor(const std::vector<double>& v, const Tensor& x) { return channel_tensor(v, bn_stat_dtype(x)); }

template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// One of the kernels after the forward: checks, then sums_then_affine with outputs p (gets `p_out`) and q.
std::vector<std::pair<double, double>> after_forward(BnKind kind, const BnPlan& plan, const Tensor& x,
                                                     const Tensor& g, const Tensor& u, const Tensor& p_out,
                                                     const Tensor& q_out, const Tensor& mean, const Tensor& invstd,
                                                     const OptTensor& weight, const OptTensor& bias,
                                                     const OptTensor& p_in, const OptTensor& q_in, bool training,
                                                     bool relu, const char* op, const char* p_name,
                                                     const char* q_name) {
  ChannelArgs args;
  args.gamma = channel_values(weight, x, 1.0, op, "weight");
  args.p = channel_values(p_in, x, 0.0, op, p_name);
  args.q = channel_values(q_in, x, 0.0, op, q_name);
  const Stats st = saved_stats(x, mean, invstd, args.gamma, bias, relu, op);
  std::vector<std::pair<double, double>> out;
  FASTJAC_DISPATCH(x.scalar_type(), "fastjac::bn_bwd/bn_dbwd/bn_jvp", [&] {
    const BnIO<scalar_t> io{ptr<scalar_t>(x), ptr<scalar_t>(g), ptr<scalar_t>(u), ptr<scalar_t>(p_out),
                            ptr<scalar_t>(q_out)};
    out = sums_then_affine(kind, plan, BnGeom(x), io, st, args, training);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Kernels

// bn_fwd: training batch statistics (biased var) and running-statistics update, or eval running statistics;
// y = z = gamma xh + beta (as bn_z), or relu(z) when `relu` (the mask is not stored: later kernels recompute it).
std::tuple<Tensor, Tensor, Tensor> bn_fwd(const Tensor& x_, const OptTensor& weight, const OptTensor& bias,
                                          const OptTensor& running_mean, const OptTensor& running_var,
                                          bool training, double momentum, double eps, bool relu) {
  constexpr const char* op = "fastjac::bn_fwd";
  bn_check_input(x_, at::Device(at::kCPU), op);
  const Tensor x = x_.contiguous();
  const BnGeom geo(x);
  ChannelArgs args;
  args.gamma = channel_values(weight, x, 1.0, op, "weight");
  args.p = args.q = std::vector<double>(geo.C, 0.0);
  const auto beta = channel_values(bias, x, 0.0, op, "bias");
  bn_check_forward(x, geo.count(), running_mean, running_var, training, op);
  Tensor mean, invstd;
  if (training) {
    std::vector<Moments> mom;
    FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
      BnIO<scalar_t> io;
      io.x = x.data_ptr<scalar_t>();
      mom = bn_pass(geo, io, MomentsPass<scalar_t>{});
    });
    std::vector<double> mu(geo.C), var(geo.C);
    for (int64_t c = 0; c < geo.C; ++c) {
      const BnMeanVar<double> mv = bn_mean_var(mom[c]);
      mu[c] = mv.mean, var[c] = mv.var;
    }
    const ChannelStats stats = bn_train_stats(x, mu, var, geo.count(), eps, running_mean, running_var, momentum);
    mean = stats.mean, invstd = stats.invstd;
  } else {
    const ChannelStats stats = bn_eval_stats_cpu(x, *running_mean, *running_var, eps);
    mean = stats.mean, invstd = stats.invstd;
  }
  const Tensor y = empty_output(x);
  Stats st(mean, invstd);
  st.set_z(args.gamma, beta);
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    BnIO<scalar_t> io;
    io.x = x.data_ptr<scalar_t>();
    io.p = y.data_ptr<scalar_t>();
    sums_then_affine(BnKind::kFwd, bn_fwd_plan(relu), geo, io, st, args, training);
  });
  return {y, mean, invstd};
}

// bn_bwd: gx = gamma r (g~ - Sg/M - xh Sgx/M) (training) or gamma r g~ (eval); gw = Sgx, gb = Sg.
std::tuple<Tensor, Tensor, Tensor> bn_bwd(const Tensor& grad, const Tensor& x_, const Tensor& mean,
                                          const Tensor& invstd, const OptTensor& weight, const OptTensor& bias,
                                          bool training, bool relu) {
  constexpr const char* op = "fastjac::bn_bwd";
  bn_check_input(x_, at::Device(at::kCPU), op);
  check_like(grad, x_, op, "grad");
  const Tensor x = x_.contiguous(), g = grad.contiguous(), gx = empty_output(x);
  const auto out = after_forward(BnKind::kBwd, bn_bwd_plan(training, relu), x, g, Tensor(), Tensor(), gx, mean,
                                 invstd, weight, bias, std::nullopt, std::nullopt, training, relu, op, "", "");
  std::vector<double> gw(x.size(1)), gb(x.size(1));
  for (int64_t c = 0; c < x.size(1); ++c) gw[c] = out[c].first, gb[c] = out[c].second;
  return {gx, stat_tensor(gw, x), stat_tensor(gb, x)};
}

// bn_dbwd: (ggrad, gx, gw) of KERNELS.md with u = ggx, p = ggw, q = ggb; sums only of present operands.
std::tuple<Tensor, Tensor, Tensor> bn_dbwd(const OptTensor& ggx, const OptTensor& ggw, const OptTensor& ggb,
                                           const Tensor& grad, const Tensor& x_, const Tensor& mean,
                                           const Tensor& invstd, const OptTensor& weight, const OptTensor& bias,
                                           bool training, bool relu) {
  constexpr const char* op = "fastjac::bn_dbwd";
  bn_check_input(x_, at::Device(at::kCPU), op);
  check_like(grad, x_, op, "grad");
  if (ggx.has_value()) check_like(*ggx, x_, op, "ggx");
  const Tensor x = x_.contiguous(), g = grad.contiguous();
  const Tensor u = ggx.has_value() ? ggx->contiguous() : Tensor();
  const bool has_gx = u.defined() || ggw.has_value();
  const Tensor ggrad = empty_output(x), gx = has_gx ? empty_output(x) : at::zeros_like(x);
  const auto out = after_forward(BnKind::kDbwd, bn_dbwd_plan(training, relu, u.defined(), ggw.has_value()), x, g,
                                 u, ggrad, gx, mean, invstd, weight, bias, ggw, ggb, training, relu, op, "ggw",
                                 "ggb");
  std::vector<double> gw(x.size(1));
  for (int64_t c = 0; c < x.size(1); ++c) gw[c] = out[c].first;
  return {ggrad, gx, stat_tensor(gw, x)};
}

// bn_jvp: z_dot = gamma r (tx - mean(tx) - xh mean(tx xh)) + tw xh + tb (training; eval without the means),
// times the mask when `relu`.
Tensor bn_jvp(const OptTensor& tx, const OptTensor& tw, const OptTensor& tb, const Tensor& x_, const Tensor& mean,
              const Tensor& invstd, const OptTensor& weight, const OptTensor& bias, bool training, bool relu) {
  constexpr const char* op = "fastjac::bn_jvp";
  bn_check_input(x_, at::Device(at::kCPU), op);
  if (tx.has_value()) check_like(*tx, x_, op, "tx");
  const Tensor x = x_.contiguous();
  const Tensor t = tx.has_value() ? tx->contiguous() : Tensor();
  const Tensor y_dot = empty_output(x);
  after_forward(BnKind::kJvp, bn_jvp_plan(training, relu, t.defined(), tw.has_value()), x, Tensor(), t, y_dot,
                Tensor(), mean, invstd, weight, bias, tw, tb, training, relu, op, "tw", "tb");
  return y_dot;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastjac, CPU, m) {
  m.impl("bn_fwd", &bn_fwd);
  m.impl("bn_bwd", &bn_bwd);
  m.impl("bn_dbwd", &bn_dbwd);
  m.impl("bn_jvp", &bn_jvp);
}

}  // namespace fastjac::cpu
