// Host-side per-channel vectors of the CPU BatchNorm kernels (statistics, running statistics, weight, bias),
// read and written through their data pointers: a handful of values per channel, for which ATen tensor ops
// (a dispatch and an allocation each) cost far more than the arithmetic. On tiny inputs they were most of a
// kernel call.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <vector>

#include "../common/aten_utils.h"
#include "../common/batch_norm.h"
#include "../common/channel_vector.h"

namespace fastjac::cpu {

// The values of a 1-D floating CPU tensor (any stride, any floating dtype) as double.
inline std::vector<double> read_channels(const at::Tensor& t) {
  const ChannelVector v = ChannelVector::of(t);
  std::vector<double> out(t.numel());
  for (size_t c = 0; c < out.size(); ++c) out[c] = v.get(int64_t(c));
  return out;
}

// A new 1-D tensor of `dtype` holding `v` (rounded once from double).
inline at::Tensor channel_tensor(const std::vector<double>& v, at::ScalarType dtype) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(dtype));
  const ChannelVector out = ChannelVector::of(t);
  for (size_t c = 0; c < v.size(); ++c) out.set(int64_t(c), v[c]);
  return t;
}

// r[c] <- f(r[c], c) for each channel, computed in double and stored in r's dtype (the running statistics'
// update, bn_running_mean / bn_running_var, as PyTorch's CPU batch norm and the CUDA kernels' finishing step do).
template <typename F>
inline void update_channels(const at::Tensor& r, const F& f) {
  const ChannelVector v = ChannelVector::of(r);
  for (int64_t c = 0; c < r.numel(); ++c) v.set(c, f(v.get(c), size_t(c)));
}

// bn_fwd's statistics tensors (statistics dtype).
struct ChannelStats {
  at::Tensor mean, invstd;
};

// Training statistics of bn_fwd from the per-channel moments: mean and invstd = 1 / sqrt(var + eps), and the
// running statistics' update with the unbiased variance var M / (M - 1) (none for an empty batch,
// bn_updates_running).
inline ChannelStats bn_train_stats(const at::Tensor& x, const std::vector<double>& mean, const std::vector<double>& var,
                                 int64_t count, double eps, const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, double momentum) {
  const at::ScalarType dtype = bn_stat_dtype(x);
  std::vector<double> invstd(var.size());
  for (size_t c = 0; c < var.size(); ++c) invstd[c] = bn_invstd(var[c], eps);
  if (running_mean.has_value() && bn_updates_running(count)) {
    update_channels(*running_mean, [&](double rm, size_t c) { return bn_running_mean(rm, mean[c], momentum); });
    update_channels(*running_var,
                    [&](double rv, size_t c) { return bn_running_var(rv, var[c], double(count), momentum); });
  }
  return {channel_tensor(mean, dtype), channel_tensor(invstd, dtype)};
}

// Eval statistics: (mean, invstd) = (rm, 1 / sqrt(rv + eps)) in the statistics dtype.
inline ChannelStats bn_eval_stats_cpu(const at::Tensor& x, const at::Tensor& running_mean,
                                    const at::Tensor& running_var, double eps) {
  const std::vector<double> rv = read_channels(running_var);
  std::vector<double> invstd(rv.size());
  for (size_t c = 0; c < rv.size(); ++c) invstd[c] = bn_invstd(rv[c], eps);
  return {channel_tensor(read_channels(running_mean), bn_stat_dtype(x)), channel_tensor(invstd, bn_stat_dtype(x))};
}

}  // namespace fastjac::cpu
