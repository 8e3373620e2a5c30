// BatchNorm (+ReLU)'s autograd links (chain.h): bn_fwd -> bn_bwd -> bn_dbwd -> bn_dbwd_backward (reference).
//
// The backward links take the saved batch statistics (mean, invstd) as constants and return total derivatives
// (the statistics' dependence on x is in their formulas, csrc/KERNELS.md), so nothing downstream touches the
// running statistics: bn_fwd's kernel updates them in place, once per forward call.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <sstream>
#include <utility>

#include "chain.h"

namespace fastjac::autograd {
// The autograd functions are in the named namespace: their names are the autograd nodes' names
// (grad_fn.name(), profiler traces); the helpers are internal.
namespace {

using BnTriple = std::tuple<Tensor, Tensor, Tensor>;

const char* user_op(bool relu) { return relu ? "fastjac.ops.batch_norm_relu" : "fastjac.ops.batch_norm"; }

// check_channel_vector: one of bn_check_user_arguments' checks (below).
void check_channel_vector(const OptTensor& t, const char* name, const Tensor& x, bool relu) {
  if (!t.has_value()) return;
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), user_op(relu), ": ", name,
                   " must have a floating-point dtype, got ", t->scalar_type());
  const int64_t channels = x.size(1);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, user_op(relu), ": ", name, " must have shape (",
                    channels, ",) to match input channels x.shape[1] = ", channels, ", got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == x.device(), user_op(relu), ": ", name, " is on ", t->device(), " but x is on ",
                    x.device());
}


BnTriple bn_bwd_call(const Tensor& grad, const Tensor& x, const Tensor& mean, const Tensor& invstd,
                     const OptTensor& weight, const OptTensor& bias, bool training, bool relu) {
  static const auto op = op_handle<BnTriple(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                            const OptTensor&, const OptTensor&, bool, bool)>("fastjac::bn_bwd");
  const NextLink link;
  return op.call(grad, x, mean, invstd, weight, bias, training, relu);
}

BnTriple bn_dbwd_call(const OptTensor& ggx, const OptTensor& ggw, const OptTensor& ggb, const Tensor& grad,
                      const Tensor& x, const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
                      const OptTensor& bias, bool training, bool relu) {
  static const auto op = op_handle<BnTriple(const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                            const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                            const OptTensor&, bool, bool)>("fastjac::bn_dbwd");
  const NextLink link;
  return op.call(ggx, ggw, ggb, grad, x, mean, invstd, weight, bias, training, relu);
}

// The link's flags in one saved_data entry (each entry costs a string key and a hash-map insertion).
void save_flags(AutogradContext* ctx, bool training, bool relu, int64_t present) {
  ctx->saved_data["flags"] = int64_t(training) | int64_t(relu) << 1 | present << 2;
}

struct Flags {
  bool training, relu;
  int64_t present;
};

Flags flags(AutogradContext* ctx) {
  const int64_t f = ctx->saved_data["flags"].toInt();
  return {bool(f & 1), bool(f & 2), f >> 2};
}

// A per-channel vector as a tensor broadcasting against x (1 x C x 1 ...).
Tensor per_channel(const Tensor& v, const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return v.view(shape);
}

// The gradient reaching x through the batch statistics, from the gradients of the mean and invstd outputs
// (differentiable on a switchable graph only): dmean/dx = 1/M, dinvstd/dx = -r^3 (x - mean) / M, i.e. per channel
// a + b xh with a = g_mean / M, b = -g_invstd r^2 / M. Without create_graph that is one pass of bn_jvp's eval
// formula (tangents tw = b, tb = a, none for x: y_dot = tw xh + tb); with it, differentiable ATen ops.
Tensor through_statistics(const Tensor& g_mean, const Tensor& g_invstd, const Tensor& x, const Tensor& mean,
                          const Tensor& invstd) {
  const int64_t count = x.numel() / std::max<int64_t>(x.size(1), 1);
  if (count == 0) return at::zeros_like(x);
  const OptTensor a = g_mean.defined() ? OptTensor(g_mean / static_cast<double>(count)) : std::nullopt;
  const OptTensor b = g_invstd.defined() ? OptTensor(g_invstd * invstd * invstd * (-1.0 / count)) : std::nullopt;
  if (!at::GradMode::is_enabled()) {
    static const auto jvp = op_handle<Tensor(const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                             const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool,
                                             bool)>("fastjac::bn_jvp");
    at::AutoDispatchBelowADInplaceOrView below;
    return jvp.call(std::nullopt, b, a, x, mean, invstd, std::nullopt, std::nullopt, false, false);
  }
  Tensor out;
  if (b.has_value()) {
    const Tensor xh = (x.to(mean.scalar_type()) - per_channel(mean, x)) * per_channel(invstd, x);
    out = xh * per_channel(*b, x);
  }
  if (a.has_value()) out = out.defined() ? out + per_channel(*a, x) : per_channel(*a, x).expand_as(x);
  return out.to(x.scalar_type());
}

// Whether a switchable graph's frozen switch (csrc/autograd/chain.h) is on.
bool switch_on(AutogradContext* ctx) {
  const auto it = ctx->saved_data.find("switch");
  return it != ctx->saved_data.end() && it->second.toTensor().item<bool>();
}

}  // namespace

// bn_dbwd(ggx?, ggw?, ggb?, grad, x, mean, invstd, weight?, bias?) -> (ggrad, gx, gw): the third order comes
// from the reference formulas (bn_dbwd_backward, implemented in Python).
struct BnDoubleBackward : torch::autograd::Function<BnDoubleBackward> {
  static variable_list forward(AutogradContext* ctx, const OptTensor& ggx, const OptTensor& ggw,
                               const OptTensor& ggb, const Tensor& grad, const Tensor& x, const Tensor& mean,
                               const Tensor& invstd, const OptTensor& weight, const OptTensor& bias, bool training,
                               bool relu) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);  // absent output gradients stay undefined (no zero tensors)
    ctx->save_for_backward({or_undefined(ggx), or_undefined(ggw), or_undefined(ggb), grad, x, mean, invstd,
                            or_undefined(weight), or_undefined(bias)});
    save_flags(ctx, training, relu,
               present_bits({ggx.has_value(), ggw.has_value(), ggb.has_value(), true, true, true, true,
                             weight.has_value(), bias.has_value()}));
    auto [ggrad, gx, gw] = bn_dbwd_call(ggx, ggw, ggb, grad, x, mean, invstd, weight, bias, training, relu);
    return {ggrad, gx, gw};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) return variable_list(11);
    static const auto op = op_handle<std::vector<Tensor>(
        const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool, bool,
        c10::ArrayRef<bool>)>("fastjac::bn_dbwd_backward");
    const auto s = ctx->get_saved_variables();
    const Flags f = flags(ctx);
    const auto all = wanted_inputs(ctx, f.present, 9);
    // Statistics that require grad come only from a switchable graph's frozen link (its double backward, created
    // with create_graph); the reference VJP holds them constant, so a third derivative there would be wrong.
    TORCH_CHECK(!all[5] && !all[6], "fastjac: third derivatives through a FrozenBackward graph's frozen BatchNorm "
                "link are not implemented (the two-pass route of fastjac.record_batch_norm_stats supports them)");
    // Differentiable inputs: ggx, ggw, ggb, grad, x, weight (the statistics and bias are constants here).
    const std::vector<bool> wanted{all[0], all[1], all[2], all[3], all[4], all[7]};
    const bool mask[6] = {wanted[0], wanted[1], wanted[2], wanted[3], wanted[4], wanted[5]};
    const auto packed = op.call(present(grads[0]), present(grads[1]), present(grads[2]), present(s[0]),
                                present(s[1]), present(s[2]), s[3], s[4], s[5], s[6], present(s[7]), present(s[8]),
                                f.training, f.relu, c10::ArrayRef<bool>(mask, 6));
    const auto six = scatter_wanted(wanted, packed, 6);
    return {six[0], six[1], six[2], six[3], six[4], Tensor(), Tensor(), six[5], Tensor(), Tensor(), Tensor()};
  }
};

// bn_bwd(grad, x, mean, invstd, weight?, bias?) -> (gx, gw, gb); its VJP for (grad, x, weight) is bn_dbwd.
struct BnBackward : torch::autograd::Function<BnBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad, const Tensor& x, const Tensor& mean,
                               const Tensor& invstd, const OptTensor& weight, const OptTensor& bias, bool training,
                               bool relu) {
    at::AutoDispatchBelowADInplaceOrView below;
    // Absent gradients stay absent: a zero-filled ggw would add 0 * xh to ggrad, NaN at a non-finite x in eval
    // mode, where PyTorch's ggrad does not depend on x.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad, x, mean, invstd, or_undefined(weight), or_undefined(bias)});
    save_flags(ctx, training, relu, present_bits({true, true, true, true, weight.has_value(), bias.has_value()}));
    auto [gx, gw, gb] = bn_bwd_call(grad, x, mean, invstd, weight, bias, training, relu);
    return {gx, gw, gb};
  }

  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    if (!gg[0].defined() && !gg[1].defined() && !gg[2].defined()) return variable_list(8);
    const auto s = ctx->get_saved_variables();
    const Flags f = flags(ctx);
    const auto wanted = wanted_inputs(ctx, f.present, 6);
    const OptTensor weight = present(s[4]);
    auto [ggrad, gx, gw] = bn_dbwd_call(present(gg[0]), present(gg[1]), present(gg[2]), s[0], s[1], s[2], s[3],
                                        weight, present(s[5]), f.training, f.relu);
    Tensor g_mean, g_invstd;
    if (!f.training && (wanted[2] || wanted[3])) {
      // Statistics that require grad in the per-channel formula (gx, gw, gb) = (γ r g~, Σ g~ (x - μ) r, Σ g~):
      // the frozen link of a switchable graph. d/dr = γ Σ u g~ + p Σ g~ (x - μ), d/dμ = -p r Σ g~, with
      // Σ u g~ = gw / r (bn_dbwd's eval gw = r Σ u g~).
      const Tensor& r = s[3];
      if (gg[0].defined()) g_invstd = weight.has_value() ? gw / r * weight->to(r.scalar_type()) : gw / r;
      if (gg[1].defined()) {
        const auto [unused, sgx, sg] = bn_bwd_call(s[0], s[1], s[2], r, weight, present(s[5]), false, f.relu);
        const Tensor p = gg[1].to(r.scalar_type());
        g_invstd = g_invstd.defined() ? g_invstd + p * sgx / r : p * sgx / r;
        g_mean = -(p * r * sg);
      }
    }
    return {wanted[0] ? ggrad : Tensor(), wanted[1] ? gx : Tensor(), wanted[2] ? g_mean : Tensor(),
            wanted[3] ? g_invstd : Tensor(), wanted_as(wanted[4], gw, weight), Tensor(), Tensor(), Tensor()};
  }
};

// bn_fwd(x, weight?, bias?, running_mean?, running_var?, training, momentum, eps, relu) -> (y, mean, invstd).
//
// With a frozen switch (`frozen_switch`, training only: a switchable graph, chain.h) the statistics are
// differentiable outputs, and a backward call made while the switch is on uses the per-channel formula
// gx = γ r g~ with the batch statistics as this sample's constants (the frozen link, whose own backward
// returns the statistics' gradients, which reach x here through dmean/dx and dinvstd/dx).
//
// The running statistics are not autograd inputs (they are passed by pointer: no edge, no input metadata), and
// without a switch the statistics are returned through `stats_out`, not as outputs of the node (autograd wraps one
// output instead of three; they are constants, as non-differentiable outputs would be): on a tiny tensor this
// bookkeeping is a measurable part of the call (benchmarks/call_overhead.py).
struct BnForward : torch::autograd::Function<BnForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor* running_mean, const OptTensor* running_var, bool training,
                               double momentum, double eps, bool relu, const Tensor* frozen_switch,
                               std::pair<Tensor, Tensor>* stats_out) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = op_handle<BnTriple(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                              const OptTensor&, bool, double, double, bool)>("fastjac::bn_fwd");
    auto [y, mean, invstd] = op.call(x, weight, bias, *running_mean, *running_var, training, momentum, eps, relu);
    // Absent gradients stay undefined: a zero-filled one for mean / invstd would send 0 * xh through the statistics
    // path, NaN at a non-finite x (and a pass over x for nothing).
    ctx->set_materialize_grads(false);
    // bias is read by the backward links only for the fused ReLU's mask.
    ctx->save_for_backward({x, or_undefined(weight), relu ? or_undefined(bias) : Tensor(), mean, invstd});
    save_flags(ctx, training, relu, present_bits({true, weight.has_value(), bias.has_value()}));
    if (frozen_switch != nullptr && training) {
      ctx->saved_data["switch"] = *frozen_switch;  // not a saved variable: flipping it is no in-place error
      return {y, mean, invstd};
    }
    *stats_out = {mean, invstd};
    return {y};
  }

  // grads: (y) or, from a switchable graph, (y, mean, invstd).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    grads.resize(3);
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) return variable_list(11);
    const auto s = ctx->get_saved_variables();
    const Flags f = flags(ctx);
    const auto wanted = wanted_inputs(ctx, f.present, 3);
    const OptTensor weight = present(s[1]);
    Tensor gx, gw, gb;
    if (grads[0].defined()) {
      const bool training_formula = f.training && !switch_on(ctx);
      std::tie(gx, gw, gb) = bn_bwd_call(grads[0], s[0], s[3], s[4], weight, present(s[2]), training_formula, f.relu);
    }
    if (wanted[0] && (grads[1].defined() || grads[2].defined())) {
      const Tensor stats_path = through_statistics(grads[1], grads[2], s[0], s[3], s[4]);
      gx = gx.defined() ? gx + stats_path : stats_path;
    }
    return {wanted[0] ? gx : Tensor(), gw.defined() ? wanted_as(wanted[1], gw, weight) : Tensor(),
            gb.defined() ? wanted_as(wanted[2], gb, weight) : Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The user-facing argument checks of fastjac.ops.batch_norm (the same messages as the Python chain's, which
// serves the Python-kernel backends), made by the C++ chain's entry so that a call crosses into C++ once; the
// kernel ops keep their own checks (RuntimeErrors naming the kernel argument).
void bn_check_user_arguments(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                             const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps,
                             bool relu) {
  const char* op = user_op(relu);
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must have a floating-point dtype, got ",
                   x.scalar_type());
  // PyTorch's F.batch_norm: eps > 0 in training, eps >= 0 in eval (where 1 / sqrt(running_var + eps) may be inf).
  TORCH_CHECK_VALUE(!training || eps > 0, op, ": eps must be positive in training mode, got ", eps);
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be non-negative, got ", eps);
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must be N x C x (spatial...) with at least 2 dims, got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(), op,
                    ": running_mean and running_var must both be given or both be None");
  TORCH_CHECK_VALUE(training || running_mean.has_value(), op,
                    ": running_mean and running_var are required when training=False");
  check_channel_vector(running_mean, "running_mean", x, relu);
  check_channel_vector(running_var, "running_var", x, relu);
  check_channel_vector(weight, "weight", x, relu);
  check_channel_vector(bias, "bias", x, relu);
  // Values per channel N * prod(spatial), as PyTorch counts them; an empty batch (0) is allowed in training, as in
  // PyTorch: an empty output, no batch statistics, the running statistics left alone.
  int64_t count = x.size(0);
  for (int64_t d = 2; d < x.dim(); ++d) count *= x.size(d);
  TORCH_CHECK_VALUE(!training || count != 1, op,
                    ": expected more than 1 value per channel when training, got x of shape ", x.sizes());
}

BnTriple bn_fwd_switchable(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                           const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
                           double eps, bool relu, const Tensor* frozen_switch) {
  std::pair<Tensor, Tensor> stats;
  auto out = BnForward::apply(x, weight, bias, &running_mean, &running_var, training, momentum, eps, relu,
                              frozen_switch, &stats);
  if (training && running_mean.has_value()) {  // updated in place by the kernel, once
    torch::autograd::increment_version(*running_mean);
    torch::autograd::increment_version(*running_var);
  }
  if (out.size() == 3) return {out[0], out[1], out[2]};
  return {out[0], stats.first, stats.second};
}

namespace {

BnTriple bn_fwd_autograd(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                         const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
                         double eps, bool relu) {
  return bn_fwd_switchable(x, weight, bias, running_mean, running_var, training, momentum, eps, relu, nullptr);
}

BnTriple bn_bwd_autograd(const Tensor& grad, const Tensor& x, const Tensor& mean, const Tensor& invstd,
                         const OptTensor& weight, const OptTensor& bias, bool training, bool relu) {
  auto out = BnBackward::apply(grad, x, mean, invstd, weight, bias, training, relu);
  return {out[0], out[1], out[2]};
}

BnTriple bn_dbwd_autograd(const OptTensor& ggx, const OptTensor& ggw, const OptTensor& ggb, const Tensor& grad,
                          const Tensor& x, const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
                          const OptTensor& bias, bool training, bool relu) {
  auto out = BnDoubleBackward::apply(ggx, ggw, ggb, grad, x, mean, invstd, weight, bias, training, relu);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastjac, Autograd, m) {
  m.impl("bn_fwd", &bn_fwd_autograd);
  m.impl("bn_bwd", &bn_bwd_autograd);
  m.impl("bn_dbwd", &bn_dbwd_autograd);
}

}  // namespace fastjac::autograd
