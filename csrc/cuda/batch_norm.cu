// CUDA BatchNorm (+ fused ReLU) kernels: csrc/KERNELS.md, "BatchNorm formulas".
//
// Same structure as the CPU kernels, with the element loop, flag sets, plans and per-channel coefficients of
// csrc/common/batch_norm*.h: pass 1 per-channel sums, per-channel coefficients, pass 2 one affine combination
// per element (a single pass in eval mode). What is CUDA-specific is below:
// - Layout of a pass (BnLayout): x is N x C x S (S = prod(spatial)). "Rows" (S >= kRowMin): a block reads a
//   range of one channel's elements, row by row (coalesced along S). "Columns" (short rows): a block reads a tile
//   of up to 32 consecutive positions e of the N rows of length L = C S (position e is channel e / S) for a range
//   of rows; threads along x are positions, along y rows, so a warp reads contiguous memory.
// - Deterministic reductions, no atomics: each thread accumulates in the compute type, the block merges its
//   threads in a fixed tree order (reduce_over_y) and writes one partial per (channel, block) in double to a
//   scratch buffer. The split of the work depends on the shape only, so results are the same on every GPU.
// - One launch per pass (issue 12 item 3; training forward + backward + double backward in 6 kernels): the
//   per-channel finishing step (finish_channel: merge a channel's partials in a fixed order, statistics, invstd,
//   running-statistics update, coefficients) runs at the start of the next pass, in every block that needs it
//   (each merges the same partials in the same order, so all get the same values), and one writer thread per
//   channel stores the per-channel outputs. It runs as its own kernel only after eval's single summing pass and
//   for an empty batch.
// - Statistics (bn_fwd): Welford per thread and Chan merges (BnMoments) in the compute type within a block, in
//   double across blocks.
// - Tested without a GPU by the CPU emulation of emulation.h (tests/_cuda_emulation.py).
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>

#include "../common/batch_norm.h"
#include "../common/batch_norm_element.h"
#include "../common/channel_vector.h"
#include "launch.cuh"

namespace fastjac::cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int64_t kRowMin = 32;          // spatial sizes from which blocks read one channel's rows
constexpr int64_t kTargetBlocks = 1024;  // blocks per pass (a constant, so that the split depends on the shape only)
constexpr int64_t kMinPerBlock = 4096;   // ... but at least this many elements per block

// The geometry and work split of a pass (see the file comment). Partials: P = parts() per channel, channel c's
// at [c P, (c + 1) P).
struct BnLayout {
  int64_t N = 0, C = 0, S = 1, M = 0, L = 0;
  bool rows = true;
  int64_t nsplit = 1;  // gridDim.y: splits of each channel's elements (rows) or of the N rows (columns)
  int64_t span = 0;    // elements per split (rows) or rows per split (columns)
  int tx = 1, ty = kThreads;
  int64_t step_n = 0, step_s = 0;  // rows: kThreads elements of a channel as (rows, positions)

  explicit BnLayout(const Tensor& x) : N(x.size(0)), C(x.size(1)) {
    for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
    M = N * S, L = C * S;
    rows = S >= kRowMin;
    if (rows) {
      nsplit = std::clamp<int64_t>(ceil_div(kTargetBlocks, std::max<int64_t>(C, 1)), 1,
                                   std::max<int64_t>(1, M / kMinPerBlock));
      span = ceil_div(std::max<int64_t>(M, 1), nsplit);
      nsplit = ceil_div(std::max<int64_t>(M, 1), span);
      step_n = kThreads / S, step_s = kThreads % S;
    } else {
      while (tx < 32 && tx < L) tx *= 2;
      ty = kThreads / tx;
      const int64_t tiles = std::max<int64_t>(1, ceil_div(L, tx));
      nsplit = std::clamp<int64_t>(ceil_div(kTargetBlocks, tiles), 1, std::max<int64_t>(1, N * tx / kMinPerBlock));
      span = ceil_div(std::max<int64_t>(N, 1), nsplit);
      nsplit = ceil_div(std::max<int64_t>(N, 1), span);
    }
  }
  int64_t numel() const { return N * L; }
  __host__ __device__ int64_t parts() const { return rows ? nsplit : S * nsplit; }
  dim3 grid() const {
    return rows ? dim3(unsigned(C), unsigned(nsplit)) : dim3(unsigned(ceil_div(L, tx)), unsigned(nsplit));
  }
  dim3 block() const { return dim3(tx, ty); }
};

// ---------------------------------------------------------------------------------------------------------
// Per-channel values and the finishing step

// Per-channel inputs and outputs of a kernel (statistics dtype A, which is also the compute type; nullptr =
// absent: gamma 1, beta / p / q 0, output not written).
template <typename A>
struct ChannelIO {
  const A *mean = nullptr, *invstd = nullptr;  // the forward's statistics (kernels after bn_fwd)
  const A *gamma = nullptr, *beta = nullptr, *p = nullptr, *q = nullptr;
  BnKind kind = BnKind::kFwd;
  bool training = false, want_z = false;
  double count = 0;
  A *out0 = nullptr, *out1 = nullptr;
  // bn_fwd: the statistics come from the moments pass (training) or the running statistics (eval) and are stored
  // to mean_out / invstd_out; in training with count > 0 the running statistics are updated, exactly once.
  bool fwd = false;
  ChannelVector running_mean, running_var;
  double eps = 0, momentum = 0;
  A *mean_out = nullptr, *invstd_out = nullptr;
};

// Channel c's partials merged in a fixed order by the threads of a column (same threadIdx.x): every thread of
// the block must call it.
template <typename Partial>
__device__ Partial merge_parts(const Partial* parts, int64_t P, int64_t c) {
  Partial acc;
  for (int64_t k = threadIdx.y; k < P; k += blockDim.y) acc.merge(parts[c * P + k]);
  return reduce_over_y(acc);
}

// The finishing step of channel c, folded into the pass that needs it (or run alone by bn_channel_kernel): the
// statistics (bn_fwd: mean and biased var from the moments pass's partials `moments`, invstd = bn_invstd, or the
// running statistics in eval; later kernels: the saved mean and invstd), the per-element constants (the fused
// ReLU's z = a x + c by bn_z_coef) and the coefficients of bn_kernel_coef from the previous pass's sums `sums`
// (zero when nullptr), all in double as on the CPU and rounded once to A. The channel's `writer` (one thread per
// channel in a launch) stores bn_fwd's statistics and running-statistics update, and, with `write_out`, out0 /
// out1. Every thread of the block calls it (the merges are block-wide); the partials are P per channel.
template <typename A>
__device__ BnChannel<A> finish_channel(const ChannelIO<A>& io, int64_t c, const BnMoments<double>* moments,
                                       const BnSums<double>* sums, int64_t P, bool writer, bool write_out) {
  double mean = 0, r = 0;
  if (io.fwd && io.training) {
    BnMoments<double> m;
    if (moments) m = merge_parts(moments, P, c);
    const BnMeanVar<double> mv = bn_mean_var(m);
    mean = double(A(mv.mean)), r = double(A(bn_invstd(mv.var, io.eps)));
    if (writer && io.running_mean.data && bn_updates_running(int64_t(io.count))) {
      io.running_mean.set(c, bn_running_mean(io.running_mean.get(c), mv.mean, io.momentum));
      io.running_var.set(c, bn_running_var(io.running_var.get(c), mv.var, io.count, io.momentum));
    }
  } else if (io.fwd) {
    mean = double(A(io.running_mean.get(c))), r = double(A(bn_invstd(io.running_var.get(c), io.eps)));
  } else {
    mean = double(io.mean[c]), r = double(io.invstd[c]);
  }
  if (io.fwd && writer) io.mean_out[c] = A(mean), io.invstd_out[c] = A(r);
  BnSums<double> s;
  if (sums) s = merge_parts(sums, P, c);
  auto value = [c](const A* v, double fill) { return v ? double(v[c]) : fill; };
  const double gamma = value(io.gamma, 1.0);
  BnChannel<A> k;
  k.mean = A(mean), k.r = A(r);
  if (io.want_z) {
    const BnZ<double> z = bn_z_coef(mean, r, gamma, value(io.beta, 0.0));
    k.z = BnZ<A>{A(z.a), A(z.c)};
  }
  const BnKernelCoef<double> kc =
      bn_kernel_coef(io.kind, s, io.count, gamma, r, value(io.p, 0.0), value(io.q, 0.0), io.training);
  auto cast = [](const BnAffine<double>& a) { return BnAffine<A>{A(a.cu), A(a.cg), A(a.cx), A(a.c0)}; };
  k.p = cast(kc.p), k.q = cast(kc.q);
  if (writer && write_out) {
    if (io.out0) io.out0[c] = A(kc.out0);
    if (io.out1) io.out1[c] = A(kc.out1);
  }
  return k;
}

// ---------------------------------------------------------------------------------------------------------
// Passes

// One pass: the finishing step of the thread's channel (Pass::channel), every element of the block's part, then
// (Pass::kSums) the block's partial per channel / position. Pass provides Acc (compute-type accumulator with
// merge), Partial (double, from partial(acc)), channel(c, P, writer) and element(k, i, acc).
template <typename Pass>
__global__ void __launch_bounds__(kThreads) bn_pass_kernel(const Pass pass, const BnLayout lay,
                                                           typename Pass::Partial* partials) {
  typename Pass::Acc acc;
  const int64_t split = blockIdx.y;
  // rows: the block's channel; columns: the thread's position e in a row of L = C S and its channel (clamped
  // beyond the row, so that every thread takes part in the finishing step's block-wide merges)
  const int64_t e = lay.rows ? 0 : int64_t(blockIdx.x) * lay.tx + threadIdx.x;
  const bool valid = lay.rows || e < lay.L;
  const int64_t c = lay.rows ? int64_t(blockIdx.x) : std::min(e, lay.L - 1) / lay.S;
  // the one thread of the launch that stores channel c's outputs: of split 0, holding the channel's first element
  const bool writer = split == 0 && threadIdx.y == 0 && (lay.rows || (valid && e % lay.S == 0));
  const auto k = pass.channel(c, lay.parts(), writer);
  int64_t slot;
  if (lay.rows) {
    const int64_t j1 = std::min(lay.M, (split + 1) * lay.span);
    int64_t j = split * lay.span + threadIdx.y, n = j / lay.S, s = j - n * lay.S;
    for (; j < j1; j += kThreads) {
      pass.element(k, (n * lay.C + c) * lay.S + s, acc);
      s += lay.step_s, n += lay.step_n;
      if (s >= lay.S) s -= lay.S, ++n;
    }
    slot = c * lay.nsplit + split;
  } else {
    if (valid) {
      const int64_t n1 = std::min(lay.N, (split + 1) * lay.span);
      for (int64_t n = split * lay.span + threadIdx.y; n < n1; n += lay.ty) pass.element(k, n * lay.L + e, acc);
    }
    slot = e * lay.nsplit + split;  // = c P + s nsplit + split with e = c S + s
  }
  if constexpr (Pass::kSums) {
    const typename Pass::Acc total = reduce_over_y(acc);
    if (threadIdx.y == 0 && valid) partials[slot] = Pass::partial(total);
  }
}

template <typename Pass>
void launch_pass(const Pass& pass, const BnLayout& lay, typename Pass::Partial* partials) {
  if (lay.numel() == 0) return;
  FASTJAC_LAUNCH(bn_pass_kernel<Pass>, lay.grid(), lay.block(), pass, lay, partials);
}

struct NoChannel {};

// bn_fwd's statistics: per-channel moments of x.
template <typename T>
struct MomentsPass {
  using A = at::opmath_type<T>;
  using Acc = BnMoments<A>;
  using Partial = BnMoments<double>;
  static constexpr bool kSums = true;
  const T* x;
  __device__ NoChannel channel(int64_t, int64_t, bool) const { return {}; }
  __device__ void element(NoChannel, int64_t i, Acc& acc) const { acc.push(static_cast<A>(x[i])); }
  __device__ static Partial partial(const Acc& a) {
    return Partial{double(a.n), double(a.mean), double(a.m2), double(a.sum)};
  }
};

// The affine passes: bn_element with flags F, the per-channel constants from the finishing step with the
// previous pass's partials (bn_fwd's moments, or the sums `prev` of pass 1; none: zero sums). A pass that does
// not sum is its kernel's last and stores the per-channel outputs (after a summing pass, bn_channel_kernel does).
template <unsigned F, typename T>
struct AffinePass {
  using A = at::opmath_type<T>;
  using Acc = BnSums<A>;
  using Partial = BnSums<double>;
  static constexpr bool kSums = (F & kSum) != 0;
  BnPtrs<T> io;
  ChannelIO<A> ch;
  const BnMoments<double>* moments;
  const BnSums<double>* prev;
  __device__ BnChannel<A> channel(int64_t c, int64_t P, bool writer) const {
    return finish_channel(ch, c, moments, prev, P, writer, !kSums);
  }
  __device__ void element(const BnChannel<A>& k, int64_t i, Acc& acc) const {
    bn_element<F>(k, io, i, acc.u, acc.ux, acc.g, acc.gx, acc.ug);
  }
  __device__ static Partial partial(const Acc& a) {
    return Partial{double(a.u), double(a.ux), double(a.g), double(a.gx), double(a.ug)};
  }
};

// The finishing step alone, one block per channel: the per-channel outputs from a pass's sums `parts` (eval's
// single pass), or of an empty batch (no pass runs: zero sums, bn_fwd's statistics).
template <typename A>
__global__ void __launch_bounds__(kThreads) bn_channel_kernel(const ChannelIO<A> io, const BnSums<double>* parts,
                                                              int64_t P) {
  finish_channel(io, blockIdx.x, static_cast<const BnMoments<double>*>(nullptr), parts, P, threadIdx.y == 0, true);
}

template <typename A>
void launch_channel(const ChannelIO<A>& io, const BnLayout& lay, const BnSums<double>* parts) {
  const dim3 block(1, parts ? kThreads : 1);
  FASTJAC_LAUNCH(bn_channel_kernel<A>, unsigned(lay.C), block, io, parts, lay.parts());
}

// Runs the affine pass with the runtime `flags`; returns its partial sums (undefined without kSum).
template <typename T, unsigned... Fs>
Tensor run_affine(unsigned flags, const BnLayout& lay, const BnPtrs<T>& io_all, const ChannelIO<at::opmath_type<T>>& ch,
                  const BnMoments<double>* moments, const BnSums<double>* prev, const Tensor& like,
                  std::integer_sequence<unsigned, Fs...>) {
  flags = bn_loop_flags(flags);
  const BnPtrs<T> io = bn_loop_io(flags, io_all);
  const Tensor parts = flags & kSum ? scratch<BnSums<double>>(lay.C * lay.parts(), like) : Tensor();
  BnSums<double>* pp = scratch_ptr<BnSums<double>>(parts);
  const bool compiled =
      ((flags == Fs && (launch_pass(AffinePass<Fs, T>{io, ch, moments, prev}, lay, pp), true)) || ...);
  TORCH_CHECK(compiled, "fastjac: no BatchNorm loop compiled for flags ", flags, " (add them to BnAffineFlags)");
  return parts;
}

// The common shape of the kernels (BnPlan), one launch per pass: pass 1 (its constants from the finishing step
// without sums), pass 2 (its constants and the per-channel outputs from the finishing step with pass 1's sums,
// or bn_fwd's statistics from `moments`), and the finishing step alone when eval's single pass summed (its
// per-channel outputs) or when there are no elements.
template <typename T>
void sums_then_affine(const BnPlan& plan, const BnLayout& lay, const BnPtrs<T>& io, ChannelIO<at::opmath_type<T>> ch,
                      const BnMoments<double>* moments, const Tensor& x) {
  if (lay.C == 0) return;
  ch.count = double(lay.M);
  ch.want_z = ch.kind == BnKind::kFwd || ((plan.sum | plan.out) & kZ);
  if (lay.numel() == 0) return launch_channel(ch, lay, nullptr);
  const unsigned first = bn_first_flags(plan);
  const Tensor sums = first ? run_affine(first, lay, io, ch, moments, nullptr, x, BnAffineFlags{}) : Tensor();
  const Tensor parts =
      run_affine(bn_second_flags(plan), lay, io, ch, moments, scratch_ptr<BnSums<double>>(sums), x, BnAffineFlags{});
  if (parts.defined()) launch_channel(ch, lay, scratch_ptr<BnSums<double>>(parts));
}

// ---------------------------------------------------------------------------------------------------------
// Arguments

// An optional per-channel vector as a contiguous tensor of the statistics dtype (undefined when absent).
Tensor channel_param(const OptTensor& t, const Tensor& x, const char* op, const char* name) {
  if (!t.has_value()) return Tensor();
  bn_check_channel(*t, x, op, name);
  return t->to(bn_stat_dtype(x)).contiguous();
}

template <typename P>
P* ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<P>() : nullptr;
}

// The per-channel inputs of a kernel after the forward (bias only with the fused ReLU, for the mask).
template <typename A>
ChannelIO<A> channel_io(BnKind kind, const Tensor& mean, const Tensor& invstd, const Tensor& gamma,
                        const Tensor& beta, const Tensor& p, const Tensor& q, bool training) {
  ChannelIO<A> ch;
  ch.kind = kind, ch.training = training;
  ch.mean = ptr<A>(mean), ch.invstd = ptr<A>(invstd), ch.gamma = ptr<A>(gamma), ch.beta = ptr<A>(beta);
  ch.p = ptr<A>(p), ch.q = ptr<A>(q);
  return ch;
}

// One of the kernels after the forward: argument checks, then sums_then_affine with the outputs p_out, q_out and
// the per-channel outputs out0, out1.
void after_forward(BnKind kind, const BnPlan& plan, const Tensor& x, const Tensor& g, const Tensor& u,
                   const Tensor& p_out, const Tensor& q_out, const Tensor& out0, const Tensor& out1,
                   const Tensor& mean, const Tensor& invstd, const OptTensor& weight, const OptTensor& bias,
                   const OptTensor& p_in, const OptTensor& q_in, bool training, bool relu, const char* op,
                   const char* p_name, const char* q_name) {
  const Tensor gamma = channel_param(weight, x, op, "weight");
  const Tensor p = channel_param(p_in, x, op, p_name), q = channel_param(q_in, x, op, q_name);
  bn_check_saved_stats(x, mean, invstd, op);
  const Tensor beta = relu ? channel_param(bias, x, op, "bias") : Tensor();
  const Tensor m = mean.contiguous(), r = invstd.contiguous();
  const BnLayout lay(x);
  FASTJAC_DISPATCH(x.scalar_type(), "fastjac::bn_bwd/bn_dbwd/bn_jvp", [&] {
    using A = at::opmath_type<scalar_t>;
    ChannelIO<A> ch = channel_io<A>(kind, m, r, gamma, beta, p, q, training);
    ch.out0 = ptr<A>(out0), ch.out1 = ptr<A>(out1);
    const BnPtrs<scalar_t> io{ptr<scalar_t>(x), ptr<scalar_t>(g), ptr<scalar_t>(u),
                              ptr<scalar_t>(p_out), ptr<scalar_t>(q_out)};
    sums_then_affine(plan, lay, io, ch, nullptr, x);
  });
}

Tensor stat_empty(const Tensor& x) { return at::empty({x.size(1)}, x.options().dtype(bn_stat_dtype(x))); }

// ---------------------------------------------------------------------------------------------------------
// Kernels

// The running statistics as read and written by the finishing step (absent: data nullptr).
ChannelVector channel_vector(const OptTensor& t) { return t.has_value() ? ChannelVector::of(*t) : ChannelVector{}; }

// bn_fwd: training batch statistics (biased var) and running-statistics update, or eval running statistics;
// y = z = gamma xh + beta (as bn_z), or relu(z) when `relu` (the mask is not stored: later kernels recompute it).
// Training: the moments pass, then the output pass, whose finishing step merges the channel's moments and stores
// mean, invstd and the running statistics; eval: the output pass alone.
std::tuple<Tensor, Tensor, Tensor> bn_fwd(const Tensor& x_, const OptTensor& weight, const OptTensor& bias,
                                          const OptTensor& running_mean, const OptTensor& running_var,
                                          bool training, double momentum, double eps, bool relu) {
  constexpr const char* op = "fastjac::bn_fwd";
  bn_check_input(x_, x_.device(), op);
  const DeviceGuard guard(x_.device());
  const Tensor x = x_.contiguous();
  const BnLayout lay(x);
  const Tensor gamma = channel_param(weight, x, op, "weight"), beta = channel_param(bias, x, op, "bias");
  bn_check_forward(x, lay.M, running_mean, running_var, training, op);
  const Tensor mean = stat_empty(x), invstd = stat_empty(x), y = at::empty_like(x);
  FASTJAC_DISPATCH(x.scalar_type(), op, [&] {
    using A = at::opmath_type<scalar_t>;
    ChannelIO<A> ch = channel_io<A>(BnKind::kFwd, Tensor(), Tensor(), gamma, beta, Tensor(), Tensor(), training);
    ch.fwd = true, ch.eps = eps, ch.momentum = momentum;
    ch.running_mean = channel_vector(running_mean), ch.running_var = channel_vector(running_var);
    ch.mean_out = mean.data_ptr<A>(), ch.invstd_out = invstd.data_ptr<A>();
    const Tensor moments = training ? scratch<BnMoments<double>>(lay.C * lay.parts(), x) : Tensor();
    if (training)
      launch_pass(MomentsPass<scalar_t>{x.data_ptr<scalar_t>()}, lay, scratch_ptr<BnMoments<double>>(moments));
    const BnPtrs<scalar_t> io{x.data_ptr<scalar_t>(), nullptr, nullptr, y.data_ptr<scalar_t>(), nullptr};
    sums_then_affine(bn_fwd_plan(relu), lay, io, ch, scratch_ptr<BnMoments<double>>(moments), x);
  });
  return {y, mean, invstd};
}

// bn_bwd: gx = gamma r (g~ - Sg/M - xh Sgx/M) (training) or gamma r g~ (eval); gw = Sgx, gb = Sg.
std::tuple<Tensor, Tensor, Tensor> bn_bwd(const Tensor& grad, const Tensor& x_, const Tensor& mean,
                                          const Tensor& invstd, const OptTensor& weight, const OptTensor& bias,
                                          bool training, bool relu) {
  constexpr const char* op = "fastjac::bn_bwd";
  bn_check_input(x_, x_.device(), op);
  check_like(grad, x_, op, "grad");
  const DeviceGuard guard(x_.device());
  const Tensor x = x_.contiguous(), g = grad.contiguous(), gx = at::empty_like(x);
  const Tensor gw = stat_empty(x), gb = stat_empty(x);
  after_forward(BnKind::kBwd, bn_bwd_plan(training, relu), x, g, Tensor(), Tensor(), gx, gw, gb, mean, invstd,
                weight, bias, std::nullopt, std::nullopt, training, relu, op, "", "");
  return {gx, gw, gb};
}

// bn_dbwd: (ggrad, gx, gw) of KERNELS.md with u = ggx, p = ggw, q = ggb; sums only of present operands.
std::tuple<Tensor, Tensor, Tensor> bn_dbwd(const OptTensor& ggx, const OptTensor& ggw, const OptTensor& ggb,
                                           const Tensor& grad, const Tensor& x_, const Tensor& mean,
                                           const Tensor& invstd, const OptTensor& weight, const OptTensor& bias,
                                           bool training, bool relu) {
  constexpr const char* op = "fastjac::bn_dbwd";
  bn_check_input(x_, x_.device(), op);
  check_like(grad, x_, op, "grad");
  if (ggx.has_value()) check_like(*ggx, x_, op, "ggx");
  const DeviceGuard guard(x_.device());
  const Tensor x = x_.contiguous(), g = grad.contiguous();
  const Tensor u = ggx.has_value() ? ggx->contiguous() : Tensor();
  const bool has_gx = u.defined() || ggw.has_value();
  const Tensor ggrad = at::empty_like(x), gx = has_gx ? at::empty_like(x) : at::zeros_like(x);
  const Tensor gw = stat_empty(x);
  after_forward(BnKind::kDbwd, bn_dbwd_plan(training, relu, u.defined(), ggw.has_value()), x, g, u, ggrad, gx, gw,
                Tensor(), mean, invstd, weight, bias, ggw, ggb, training, relu, op, "ggw", "ggb");
  return {ggrad, gx, gw};
}

// bn_jvp: z_dot = gamma r (tx - mean(tx) - xh mean(tx xh)) + tw xh + tb (training; eval without the means),
// times the mask when `relu`.
Tensor bn_jvp(const OptTensor& tx, const OptTensor& tw, const OptTensor& tb, const Tensor& x_, const Tensor& mean,
              const Tensor& invstd, const OptTensor& weight, const OptTensor& bias, bool training, bool relu) {
  constexpr const char* op = "fastjac::bn_jvp";
  bn_check_input(x_, x_.device(), op);
  if (tx.has_value()) check_like(*tx, x_, op, "tx");
  const DeviceGuard guard(x_.device());
  const Tensor x = x_.contiguous();
  const Tensor t = tx.has_value() ? tx->contiguous() : Tensor();
  const Tensor y_dot = at::empty_like(x);
  after_forward(BnKind::kJvp, bn_jvp_plan(training, relu, t.defined(), tw.has_value()), x, Tensor(), t, y_dot,
                Tensor(), Tensor(), Tensor(), mean, invstd, weight, bias, tw, tb, training, relu, op, "tw", "tb");
  return y_dot;
}

}  // namespace

#if !defined(FASTJAC_CUDA_EMULATION)  // the emulation registers them itself (tests/cuda_emulation/)
TORCH_LIBRARY_IMPL(fastjac, CUDA, m) {
  m.impl("bn_fwd", &bn_fwd);
  m.impl("bn_bwd", &bn_bwd);
  m.impl("bn_dbwd", &bn_dbwd);
  m.impl("bn_jvp", &bn_jvp);
}
#endif

}  // namespace fastjac::cuda
