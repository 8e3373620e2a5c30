// ReLU's autograd links (chain.h): relu_fwd saves its packed mask, relu_bwd's VJP is relu_bwd again.
#include <torch/library.h>

#include "chain.h"

namespace fastjac::autograd {
// The autograd functions are in the named namespace: their names are the autograd nodes' names
// (grad_fn.name(), profiler traces); the helpers are internal.
namespace {

Tensor relu_bwd_call(const Tensor& grad, const Tensor& mask) {
  static const auto op = op_handle<Tensor(const Tensor&, const Tensor&)>("fastjac::relu_bwd");
  const NextLink link;
  return op.call(grad, mask);
}

}  // namespace

// relu_bwd(grad, mask) = grad * m is linear in grad: its VJP is relu_bwd(ggrad, mask).
struct ReluBackward : torch::autograd::Function<ReluBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad, const Tensor& mask) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);  // absent output gradients stay undefined (no zero tensors)
    ctx->save_for_backward({mask});
    return {relu_bwd_call(grad, mask)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list ggrad) {
    if (!ggrad[0].defined()) return {Tensor(), Tensor()};
    return {relu_bwd_call(ggrad[0], ctx->get_saved_variables()[0]), Tensor()};
  }
};

// Returns y only: the mask is handed back through `mask_out` (a plain, non-differentiable tensor), so that
// autograd wraps one output, not two.
struct ReluForward : torch::autograd::Function<ReluForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, Tensor* mask_out) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);  // absent output gradients stay undefined (no zero tensors)
    static const auto op = op_handle<std::tuple<Tensor, Tensor>(const Tensor&)>("fastjac::relu_fwd");
    auto [y, mask] = op.call(x);
    ctx->save_for_backward({mask});
    *mask_out = mask;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {Tensor(), Tensor()};
    return {relu_bwd_call(grads[0], ctx->get_saved_variables()[0]), Tensor()};
  }
};

namespace {

std::tuple<Tensor, Tensor> relu_fwd_autograd(const Tensor& x) {
  Tensor mask;
  Tensor y = ReluForward::apply(x, &mask)[0];
  return {y, mask};
}

Tensor relu_bwd_autograd(const Tensor& grad, const Tensor& mask) { return ReluBackward::apply(grad, mask)[0]; }

}  // namespace

TORCH_LIBRARY_IMPL(fastjac, Autograd, m) {
  m.impl("relu_fwd", &relu_fwd_autograd);
  m.impl("relu_bwd", &relu_bwd_autograd);
}

}  // namespace fastjac::autograd
