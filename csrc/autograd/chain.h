// The C++ autograd chain (csrc/autograd/): every link of a fused op is a dispatcher op with a C++ autograd
// function registered for the Autograd key, whose backward calls the next link through the dispatcher, so a
// gradient of a gradient composes with no Python on the way (torchvision's csrc/ops/autograd/ shape).
//
//   relu:      relu_fwd -> relu_bwd -> relu_bwd ...                         (closed: every order is exact)
//   softplus:  softplus_fwd -> softplus_bwd -> softplus_dbwd -> softplus_dbwd_backward (reference, Python)
//   bn (+relu): bn_fwd -> bn_bwd -> bn_dbwd -> bn_dbwd_backward (reference, Python)
//   conv:      conv_fwd -> conv_bwd_input -> (conv_fwd, ATen's weight gradient)  (ATen's kernels; exact)
//
// The `*_backward` links of the last column are declared in C++ (csrc/fastjac.cpp) and implemented in Python
// as CompositeImplicitAutograd ops that differentiate the reference formulas (fastjac/ops/), so third and
// higher derivatives stay exact; they are reached only at the third order.
//
// A switchable graph (BatchNorm only): a forward built with a frozen switch, a 0-dim CPU bool tensor captured by
// the graph's BatchNorm nodes, lets one training-mode forward serve two backward semantics: calls made while
// the switch is on take every batch-statistics BatchNorm's input gradient with the per-channel formula
// gx = γ r g~ (each row that sample's own Jacobian, the statistics constant in the input), calls made while it
// is off the training-mode backward; the statistics stay differentiable outputs, so a loss on the frozen
// input gradient is still differentiated through them w.r.t. the parameters (fastjac/ops/frozen_backward.py).
// The switch belongs to the graph, not to a thread: the engine's worker threads read the same tensor.
//
// C++ autograd functions support neither forward-mode AD nor torch.func transforms (PyTorch raises for
// them); fastjac/ops/_paths.py routes those calls, and every call of the Python-kernel backends, to the
// Python chain instead.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <optional>
#include <string>
#include <vector>

namespace fastjac::autograd {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The dispatcher handle of `fastjac::<name>` with C++ signature Sig (looked up once per call site).
template <class Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Guard for calling the next link from a backward: through its autograd function when the call records a graph
// (create_graph: GradMode is on), straight to the kernel otherwise. A first-order backward builds no node, so
// skipping the Autograd key saves its bookkeeping (on a tiny tensor, more than the kernel costs).
struct NextLink {
  std::optional<at::AutoDispatchBelowADInplaceOrView> below;
  NextLink() {
    if (!at::GradMode::is_enabled()) below.emplace();
  }
};

// An optional tensor as an autograd input/output: an undefined tensor is "absent".
inline OptTensor present(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
inline Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// `t` cast to `like`'s dtype (a differentiable ATen op), or undefined when not wanted.
inline Tensor wanted_as(bool wanted, const Tensor& t, const OptTensor& like) {
  if (!wanted) return Tensor();
  return like.has_value() && like->scalar_type() != t.scalar_type() ? t.to(like->scalar_type()) : t;
}

// needs_input_grad per tensor argument, in argument order: `present` has bit i set when tensor argument i was
// given (an absent optional tensor has no autograd edge, so edge indices skip it).
inline std::vector<bool> wanted_inputs(AutogradContext* ctx, int64_t present, size_t num_tensor_args) {
  std::vector<bool> out(num_tensor_args, false);
  size_t edge = 0;
  for (size_t i = 0; i < num_tensor_args; ++i) {
    if (present >> i & 1) out[i] = ctx->needs_input_grad(edge++);
  }
  return out;
}

// The `present` bits of wanted_inputs for a list of optional tensor arguments.
inline int64_t present_bits(std::initializer_list<bool> given) {
  int64_t bits = 0, i = 0;
  for (bool g : given) bits |= int64_t(g) << i++;
  return bits;
}

// Maps a list holding the gradients of the wanted inputs only (in order) back to one slot per input.
inline variable_list scatter_wanted(const std::vector<bool>& wanted, const std::vector<Tensor>& packed,
                                    size_t num_inputs) {
  variable_list out(num_inputs);
  size_t k = 0;
  for (size_t i = 0; i < wanted.size(); ++i) {
    if (wanted[i]) out[i] = packed.at(k++);
  }
  return out;
}

// fastjac.ops.batch_norm(_relu)'s argument checks, with its messages (ValueError / TypeError naming the argument).
void bn_check_user_arguments(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                             const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps,
                             bool relu);

// bn_fwd's autograd entry with an optional frozen switch (csrc/autograd/batch_norm.cpp).
std::tuple<Tensor, Tensor, Tensor> bn_fwd_switchable(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                     const OptTensor& running_mean, const OptTensor& running_var,
                                                     bool training, double momentum, double eps, bool relu,
                                                     const Tensor* frozen_switch);

}  // namespace fastjac::autograd
