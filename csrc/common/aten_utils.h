// Host-side ATen helpers shared by the CPU (csrc/cpu/) and CUDA (csrc/cuda/) kernels: the dtype dispatch and the
// argument checks (clear errors naming the argument), so that both backends accept and reject the same inputs.
// (The BatchNorm statistics themselves are per-channel math of batch_norm.h, run by each backend's own code.)
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "batch_norm.h"
#include "bitmask.h"

namespace fastjac {

// Dtypes of every kernel; inside, scalar_t is the element type and at::opmath_type<scalar_t> the compute type
// (float for float32 / float16 / bfloat16, double for float64).
#define FASTJAC_DISPATCH(dtype, op, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, __VA_ARGS__)

// A floating-point tensor on `device`.
inline void check_float(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.device() == device, op, ": expected ", name, " on ", device, ", got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected ", name,
              " to be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// `t` must have x's shape, dtype and device.
inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": expected ", name, " of shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": expected ", name, " of dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
}

// A packed mask for `numel` elements on `device`.
inline void check_mask(const at::Tensor& mask, int64_t numel, const at::Device& device, const char* op) {
  TORCH_CHECK(mask.device() == device, op, ": expected mask on ", device, ", got ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kByte, op, ": expected mask of dtype uint8, got ", mask.scalar_type());
  TORCH_CHECK(mask.numel() == mask_bytes(numel), op, ": expected a packed mask of ", mask_bytes(numel),
              " bytes for ", numel, " elements, got ", mask.numel());
}

// ---------------------------------------------------------------------------------------------------------
// BatchNorm

// float32 statistics for float32 / float16 / bfloat16 inputs, float64 for float64.
inline at::ScalarType bn_stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void bn_check_input(const at::Tensor& x, const at::Device& device, const char* op) {
  check_float(x, device, op, "x");
  TORCH_CHECK(x.dim() >= 2, op, ": expected x of shape N x C x ..., got ", x.sizes());
}

// A per-channel vector of x's channels, on x's device.
inline void bn_check_channel(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_float(t, x.device(), op, name);
  TORCH_CHECK(t.numel() == x.size(1), op, ": expected ", name, " with ", x.size(1),
              " elements (one per channel), got shape ", t.sizes());
}

// The saved statistics of bn_bwd / bn_dbwd / bn_jvp: per-channel, in the statistics dtype.
inline void bn_check_saved_stats(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                 const char* op) {
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"}, {invstd, "invstd"}}) {
    bn_check_channel(t, x, op, name);
    TORCH_CHECK(t.scalar_type() == bn_stat_dtype(x), op, ": expected ", name, " of dtype ", bn_stat_dtype(x),
                " for x of dtype ", x.scalar_type(), ", got ", t.scalar_type());
  }
}

// bn_fwd's checks of the running statistics; in training, not exactly one value per channel.
inline void bn_check_forward(const at::Tensor& x, int64_t count, const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, bool training, const char* op) {
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean and running_var must be given together");
  if (running_mean.has_value()) {
    bn_check_channel(*running_mean, x, op, "running_mean");
    bn_check_channel(*running_var, x, op, "running_var");
  }
  if (training) {  // an empty batch (count 0) is allowed, as in PyTorch
    TORCH_CHECK(count != 1, op, ": Expected more than 1 value per channel when training, got input size ",
                x.sizes());
  } else {
    TORCH_CHECK(running_mean.has_value(), op, ": running_mean and running_var are required when training=false");
  }
}

}  // namespace fastjac
