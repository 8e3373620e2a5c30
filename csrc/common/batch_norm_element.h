// The element loop of the BatchNorm passes (csrc/KERNELS.md, "BatchNorm formulas"), shared by the CPU and CUDA
// kernels: what one element reads, accumulates and writes (bn_element), which flag sets the kernels compile
// (BnAffineFlags) and which ones each kernel runs (bn_*_plan). The backends only supply the loops (indexing,
// per-channel coefficients, reductions); every arithmetic operation on an element is here.
#pragma once

#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

#include "batch_norm.h"
#include "config.h"

namespace fastjac {

// What one element loop reads and writes (compile-time flags). Inputs: u (ggx / tx), g (grad), x (as xh with
// kX; as the forward's z = bn_z(x) with kY or kZ). kZ fuses the ReLU: the mask m = bn_relu_on(z) is recomputed
// from x (csrc/KERNELS.md, "Fused ReLU"), g is read as g~ = m ? g : 0 and p is 0 where m = 0 (without kZ, m = 1
// and g~ = g). Outputs: p = m (cu u + cx xh + c0), or with kY the forward's y = z (relu(z) with kZ);
// q = cu u + cg g~ + cx xh + c0. With kSum, every sum of BnSums whose operands are read is accumulated. With
// kQNoXh, q omits its cx xh term although xh is read (by the sums or p): eval mode's gx of bn_bwd (gamma r g~) and
// bn_dbwd (p r g~) do not depend on x, and 0 * xh would make them NaN at a non-finite x, where PyTorch's are finite.
enum BnFlag : unsigned { kU = 1, kG = 2, kX = 4, kOutP = 8, kOutQ = 16, kY = 32, kSum = 64, kZ = 128, kQNoXh = 256 };

// Per-channel constants of one loop, in the compute type A.
template <typename A>
struct BnChannel {
  A mean = A(0), r = A(0);
  BnAffine<A> p, q;
  BnZ<A> z;  // the forward's z = a x + c (bn_fwd's output, the fused ReLU's mask)
};

// The arrays of one loop (nullptr = not read / not written), indexed by the element index j.
template <typename T>
struct BnPtrs {
  const T* __restrict__ x;
  const T* __restrict__ g;
  const T* __restrict__ u;
  T* __restrict__ p;
  T* __restrict__ q;
};

// on ? v : 0 for a float / double v, as an AND of v's bits with all ones or all zeros: bit for bit the selection
// (v, or +0 where v is NaN or inf), but a just-loaded v stays a plain load. gcc 12 turns the selection, or an AND
// with the unsigned 0 - on, into a zero-masking load (vmovups (mem), zmm{k}{z}), which made BN+ReLU's row loops
// up to 1.25x BN's on AMD Zen 5; with the mask built as the signed -on it loads with vpandd (mem)
// (benchmarks/RESULTS.md, stops 25 and 26). The CUDA kernels share it (a LOP3 instead of a SEL).
template <typename A>
FASTJAC_HOST_DEVICE FASTJAC_INLINE A bn_keep_if(bool on, A v) {
  static_assert(sizeof(A) == 4 || sizeof(A) == 8, "float or double");
  using Bits = std::conditional_t<sizeof(A) == 8, uint64_t, uint32_t>;
  using Signed = std::conditional_t<sizeof(A) == 8, int64_t, int32_t>;
  Bits b;
  memcpy(&b, &v, sizeof b);
  b &= Bits(-Signed(on));
  memcpy(&v, &b, sizeof b);
  return v;
}

// One element j of every pass after the forward statistics: accumulates the sums, writes the outputs.
template <unsigned F, typename T, typename A>
FASTJAC_HOST_DEVICE FASTJAC_INLINE void bn_element(const BnChannel<A>& k, const BnPtrs<T>& a, int64_t j, A& su,
                                                   A& sux, A& sg, A& sgx, A& sug) {
  constexpr bool U = F & kU, G = F & kG, X = F & kX, P = F & kOutP, Q = F & kOutQ, Y = F & kY, Z = F & kZ,
                 Sum = F & kSum, XQ = X && !(F & kQNoXh);
  // The mask is applied as a selection for float and double (bn_keep_if for g, m ? v : 0 for p): gcc does not
  // vectorise the bool -> float conversion of a 0 / 1 factor. For float16 / bfloat16 it is a product with m as
  // 0 / 1 (the form these loops had with a stored mask): with the selection, gcc 13 computed wrong sums u g~ in the
  // eval row loop of bfloat16 (tests/test_kernels_cpu.py::test_bn_half); to be looked at, half types are not
  // vectorised anyway.
  constexpr bool kSelect = std::is_same<T, A>::value;
  A uj = A(0), gj = A(0), xh = A(0), z = A(0), m = A(1);
  bool on = true;
  if constexpr (U) uj = static_cast<A>(a.u[j]);
  if constexpr (X || Y || Z) {
    const A xj = static_cast<A>(a.x[j]);
    if constexpr (X) xh = bn_xhat(xj, k.mean, k.r);
    if constexpr (Y || Z) z = bn_z(BnZ<A>{k.z.a, k.z.c}, xj);
  }
  if constexpr (Z) on = bn_relu_on<T>(z);
  if constexpr (Z && !kSelect) m = on ? A(1) : A(0);
  if constexpr (G) {
    // g is read unconditionally, then masked: a read under the mask (on ? g[j] : 0) kept the row loops' sums in
    // memory, stored and reloaded every iteration (a store-forwarding chain: BN+ReLU's bn_bwd took 1.7x BN's on
    // AVX-512, benchmarks/RESULTS.md).
    const A graw = static_cast<A>(a.g[j]);
    gj = !Z ? graw : kSelect ? bn_keep_if(on, graw) : graw * m;
  }
  if constexpr (Sum && U) su += uj;
  if constexpr (Sum && U && X) sux += uj * xh;
  if constexpr (Sum && G) sg += gj;
  if constexpr (Sum && G && X) sgx += gj * xh;
  if constexpr (Sum && U && G) sug += uj * gj;
  if constexpr (P && Y) a.p[j] = on ? static_cast<T>(z) : T(0);
  if constexpr (P && !Y) {
    const A v = bn_affine<U, false, X>(k.p, uj, gj, xh);
    a.p[j] = static_cast<T>(!Z ? v : kSelect ? (on ? v : A(0)) : v * m);
  }
  if constexpr (Q) a.q[j] = static_cast<T>(bn_affine<U, G, XQ>(k.q, uj, gj, xh));
}

// ---------------------------------------------------------------------------------------------------------
// Flag sets: one compiled loop each (a backend rejects others).

template <unsigned Extra, unsigned... Fs>
constexpr auto bn_with_flag(std::integer_sequence<unsigned, Fs...>) {
  return std::integer_sequence<unsigned, (Fs | Extra)...>{};
}
template <unsigned... A, unsigned... B>
constexpr auto bn_concat(std::integer_sequence<unsigned, A...>, std::integer_sequence<unsigned, B...>) {
  return std::integer_sequence<unsigned, A..., B...>{};
}

// bn_fwd's, the one pass that neither reads g nor writes p (so never masked), and the others without and with
// the fused ReLU.
using BnMaskableFlags = std::integer_sequence<unsigned,  //
                                              kOutP, kU | kOutP, kX | kOutP, kU | kX | kOutP,  //
                                              kG | kX | kOutQ, kG | kX | kOutP | kOutQ, kU | kG | kX | kOutP | kOutQ,
                                              kG | kX | kSum, kU | kG | kX | kSum, kU | kG | kOutP | kOutQ | kSum,
                                              // eval (kQNoXh): bn_bwd, bn_dbwd with ggw (with and without ggx)
                                              kG | kX | kOutQ | kSum | kQNoXh, kG | kX | kOutP | kOutQ | kQNoXh,
                                              kU | kG | kX | kOutP | kOutQ | kSum | kQNoXh>;
using BnAffineFlags =
    decltype(bn_concat(bn_concat(std::integer_sequence<unsigned, kY | kOutP, kY | kOutP | kZ, kU | kX | kSum>{},
                                 BnMaskableFlags{}),
                       bn_with_flag<kZ>(BnMaskableFlags{})));

// The flags a loop runs with: the mask only scales g and p; kQNoXh only matters when xh is read.
inline unsigned bn_loop_flags(unsigned flags) {
  if (!(flags & kX)) flags &= ~unsigned(kQNoXh);
  return flags & (kG | kOutP) ? flags : flags & ~unsigned(kZ);
}

// The arrays a loop with `flags` touches (the others set to nullptr); IO has members x, g, u, p, q.
template <typename IO>
inline IO bn_loop_io(unsigned flags, IO io) {
  if (!(flags & kU)) io.u = nullptr;
  if (!(flags & kG)) io.g = nullptr;
  if (!(flags & (kX | kY | kZ))) io.x = nullptr;
  if (!(flags & kOutP)) io.p = nullptr;
  if (!(flags & kOutQ)) io.q = nullptr;
  return io;
}

// ---------------------------------------------------------------------------------------------------------
// Plans: each kernel is "pass 1 sums `sum` (none when 0); per-channel coefficients (bn_kernel_coef); pass 2
// writes `out`", in a single pass when `fused` (eval: the coefficients do not depend on the sums). With the
// fused ReLU both passes recompute the mask (kZ). u = ggx (bn_dbwd) / tx (bn_jvp); p = ggw / tw.
struct BnPlan {
  unsigned sum = 0, out = 0;
  bool fused = false;
};

inline BnPlan bn_with_relu(BnPlan plan, bool relu) {
  const unsigned mask = relu ? kZ : 0;
  plan.out |= mask;
  if (plan.sum) plan.sum |= kSum | mask;
  return plan;
}

// The flags of the first loop (none when 0) and the second one.
inline unsigned bn_first_flags(const BnPlan& plan) { return plan.fused ? 0 : plan.sum; }
inline unsigned bn_second_flags(const BnPlan& plan) { return plan.fused ? plan.sum | plan.out : plan.out; }

inline BnPlan bn_fwd_plan(bool relu) { return bn_with_relu(BnPlan{0, kOutP | kY, false}, relu); }

inline BnPlan bn_bwd_plan(bool training, bool relu) {
  return bn_with_relu(BnPlan{kG | kX, kG | kOutQ | (training ? kX : kQNoXh), !training}, relu);
}

inline BnPlan bn_dbwd_plan(bool training, bool relu, bool has_u, bool has_p) {
  const bool has_gx = has_u || has_p;
  const unsigned U = has_u ? kU : 0;
  BnPlan plan;
  plan.sum = training ? (has_gx ? kG | kX | U : 0u) : (has_u ? kU | kG : 0u);
  plan.out = kOutP | U | (has_p || (training && has_u) ? kX : 0u) |
             (has_gx ? kOutQ | kG | (training ? kX | U : kQNoXh) : 0u);
  plan.fused = !training;
  return bn_with_relu(plan, relu);
}

inline BnPlan bn_jvp_plan(bool training, bool relu, bool has_t, bool has_tw) {
  BnPlan plan;
  plan.sum = training && has_t ? kU | kX : 0u;
  plan.out = kOutP | (has_t ? kU : 0u) | (has_tw || (training && has_t) ? kX : 0u);
  return bn_with_relu(plan, relu);
}

}  // namespace fastjac
