// A per-channel vector of any floating dtype and stride, read and written through double: BatchNorm's running
// statistics and saved per-channel tensors, whose dtype may differ from the statistics dtype. One definition for
// the CPU kernels (csrc/cpu/channel_vectors.h, on the host) and the CUDA kernels' finishing step (on the device),
// so that both convert exactly alike (a float16 / bfloat16 value through float, as static_cast does).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "config.h"

namespace fastjac {

struct ChannelVector {
  void* data = nullptr;  // nullptr: absent
  int64_t stride = 1;
  at::ScalarType dtype = at::kFloat;

  // The vector of a 1-D (or 0-D) floating tensor (host only).
  static ChannelVector of(const at::Tensor& t) { return {t.data_ptr(), t.dim() ? t.stride(0) : 1, t.scalar_type()}; }

  FASTJAC_HOST_DEVICE double get(int64_t c) const {
    const int64_t i = c * stride;
    switch (dtype) {
      case at::kDouble: return static_cast<const double*>(data)[i];
      case at::kHalf: return double(float(static_cast<const c10::Half*>(data)[i]));
      case at::kBFloat16: return double(float(static_cast<const c10::BFloat16*>(data)[i]));
      default: return double(static_cast<const float*>(data)[i]);
    }
  }
  FASTJAC_HOST_DEVICE void set(int64_t c, double v) const {
    const int64_t i = c * stride;
    switch (dtype) {
      case at::kDouble: static_cast<double*>(data)[i] = v; break;
      case at::kHalf: static_cast<c10::Half*>(data)[i] = c10::Half(float(v)); break;
      case at::kBFloat16: static_cast<c10::BFloat16*>(data)[i] = c10::BFloat16(float(v)); break;
      default: static_cast<float*>(data)[i] = float(v);
    }
  }
};

}  // namespace fastjac
