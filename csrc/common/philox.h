// Counter-based random numbers for the perturbation kernels (csrc/KERNELS.md, "Perturbations"): Philox-4x32-10
// (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) and the maps from its 32-bit words to
// Gaussian (Box-Muller) and Rademacher noise. Every value is a pure function of (seed, element index), so a
// kernel can regenerate the noise of any element instead of storing it, and the CPU, CUDA and reference
// (fastjac/reference/perturb.py) implementations produce the same integer stream bit for bit.
//
// The stream: element e (e = offset + flat index, e >= 0) owns word W[e] = word (e & 3) of
// philox4x32_10(counter = (lo32(e >> 2), hi32(e >> 2), 0, 0), key = (lo32(seed), hi32(seed))).
//   Rademacher: z[e] = +1 if the top bit of W[e] is 0, else -1.
//   Gaussian:   the pair (z[2k], z[2k+1]) is one Box-Muller pair of the words (W[2k], W[2k+1]):
//               u1 = ((W[2k] >> 8) + 1) 2^-24 in (0, 1],  u2 = (W[2k+1] >> 8) 2^-24 in [0, 1),
//               r = sqrt(-2 log u1),  z[2k] = r cos(2 pi u2),  z[2k+1] = r sin(2 pi u2).
// The 24-bit uniforms are exact in float and double, so float and double noise differ by rounding only; they
// truncate the Gaussian at |z| <= sqrt(48 log 2) = 5.77 (probability of a larger |z|: 8e-9).
#pragma once

#include <cmath>
#include <cstdint>

#include "config.h"

namespace fastjac {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;  // key schedule (Weyl) increments

enum PerturbDistribution : int64_t { kGaussian = 0, kRademacher = 1 };

struct Philox4 {
  uint32_t w[4];
};

FASTJAC_HOST_DEVICE inline uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi) {
  const uint64_t p = uint64_t(a) * uint64_t(b);
  hi = uint32_t(p >> 32);
  return uint32_t(p);
}

// Philox-4x32 with 10 rounds (Random123's philox4x32_10) of counter c under key (k0, k1).
FASTJAC_HOST_DEVICE inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                                  uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(kPhiloxM0, c0, hi0);
    const uint32_t lo1 = philox_mulhilo(kPhiloxM1, c2, hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
    k0 += kPhiloxW0, k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four words of block b = e >> 2 of the stream of `seed`.
FASTJAC_HOST_DEVICE inline Philox4 philox_block(uint64_t seed, uint64_t block) {
  return philox4x32_10(uint32_t(block), uint32_t(block >> 32), 0u, 0u, uint32_t(seed), uint32_t(seed >> 32));
}

FASTJAC_HOST_DEVICE inline float rademacher_from_word(uint32_t w) { return (w >> 31) ? -1.0f : 1.0f; }

// Box-Muller in the compute type A (float or double) from two words: (r cos(2 pi u2), r sin(2 pi u2)).
template <typename A>
FASTJAC_HOST_DEVICE inline void box_muller(uint32_t w1, uint32_t w2, A& z0, A& z1) {
  using std::cos;
  using std::log;
  using std::sin;
  using std::sqrt;
  const A scale = A(1.0 / 16777216.0);  // 2^-24
  const A u1 = A((w1 >> 8) + 1u) * scale, u2 = A(w2 >> 8) * scale;
  const A r = sqrt(A(-2) * log(u1)), theta = A(6.283185307179586476925286766559) * u2;
  z0 = r * cos(theta);
  z1 = r * sin(theta);
}

// The four noise values of block b (elements 4b .. 4b + 3) in the compute type A.
template <typename A>
FASTJAC_HOST_DEVICE inline void noise_block(uint64_t seed, uint64_t block, int64_t distribution, A z[4]) {
  const Philox4 r = philox_block(seed, block);
  if (distribution == kRademacher) {
    for (int j = 0; j < 4; ++j) z[j] = A(rademacher_from_word(r.w[j]));
  } else {
    box_muller<A>(r.w[0], r.w[1], z[0], z[1]);
    box_muller<A>(r.w[2], r.w[3], z[2], z[3]);
  }
}

}  // namespace fastjac
