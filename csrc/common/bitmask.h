// Packed 1-bit masks (csrc/KERNELS.md, "Conventions"): ceil(numel / 8) uint8 bytes, element i is
// bit i % 8 of byte i / 8 (little-endian bit order); padding bits of the last byte are zero.
#pragma once

#include <stdint.h>

#include "config.h"

namespace fastjac {

FASTJAC_HOST_DEVICE inline int64_t mask_bytes(int64_t numel) { return (numel + 7) >> 3; }

FASTJAC_HOST_DEVICE inline int64_t mask_byte_index(int64_t i) { return i >> 3; }

FASTJAC_HOST_DEVICE inline uint8_t mask_bit(int64_t i) { return static_cast<uint8_t>(1u << (i & 7)); }

// Element i of the mask.
FASTJAC_HOST_DEVICE inline bool mask_get(const uint8_t* mask, int64_t i) {
  return (mask[mask_byte_index(i)] >> (i & 7)) & 1u;
}

// Sets or clears element i (plain read-modify-write: the caller owns the byte).
FASTJAC_HOST_DEVICE inline void mask_set(uint8_t* mask, int64_t i, bool value) {
  uint8_t& byte = mask[mask_byte_index(i)];
  byte = value ? static_cast<uint8_t>(byte | mask_bit(i)) : static_cast<uint8_t>(byte & ~mask_bit(i));
}

// The byte holding flags[0..n) (n <= 8) as bits 0..n-1; flags beyond n are padding (zero).
template <typename Flag>
FASTJAC_HOST_DEVICE inline uint8_t mask_pack_byte(const Flag& flag, int n = 8) {
  unsigned byte = 0;
  for (int j = 0; j < n; ++j) byte |= static_cast<unsigned>(static_cast<bool>(flag(j))) << j;
  return static_cast<uint8_t>(byte);
}

}  // namespace fastjac
