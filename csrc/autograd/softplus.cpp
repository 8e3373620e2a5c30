// Softplus's autograd links (chain.h): softplus_fwd saves x; softplus_bwd(g, x) = g d1 has the VJP
// softplus_dbwd(gg, g, x) = (gg d1, gg g d2); the VJP of that is the reference's (softplus_dbwd_backward).
#include <torch/library.h>

#include "chain.h"

namespace fastjac::autograd {
// The autograd functions are in the named namespace: their names are the autograd nodes' names
// (grad_fn.name(), profiler traces); the helpers are internal.
namespace {

Tensor softplus_bwd_call(const Tensor& grad, const Tensor& x, double beta, double threshold) {
  static const auto op =
      op_handle<Tensor(const Tensor&, const Tensor&, double, double)>("fastjac::softplus_bwd");
  const NextLink link;
  return op.call(grad, x, beta, threshold);
}

std::tuple<Tensor, Tensor> softplus_dbwd_call(const Tensor& ggrad, const Tensor& grad, const Tensor& x,
                                              double beta, double threshold) {
  static const auto op = op_handle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double,
                                                              double)>("fastjac::softplus_dbwd");
  const NextLink link;
  return op.call(ggrad, grad, x, beta, threshold);
}

// (beta, threshold) in one saved_data entry (each entry costs a string key and a hash-map insertion).
void save_scalars(AutogradContext* ctx, double beta, double threshold) {
  ctx->saved_data["scalars"] = c10::complex<double>(beta, threshold);
}

std::pair<double, double> scalars(AutogradContext* ctx) {
  const auto s = ctx->saved_data["scalars"].toComplexDouble();
  return {s.real(), s.imag()};
}

}  // namespace

// softplus_dbwd(ggrad, grad, x) -> (ggrad d1, ggrad grad d2); third order from the reference formulas.
struct SoftplusDoubleBackward : torch::autograd::Function<SoftplusDoubleBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& ggrad, const Tensor& grad, const Tensor& x,
                               double beta, double threshold) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);  // absent output gradients stay undefined (no zero tensors)
    ctx->save_for_backward({ggrad, grad, x});
    save_scalars(ctx, beta, threshold);
    auto [a, b] = softplus_dbwd_call(ggrad, grad, x, beta, threshold);
    return {a, b};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined() && !grads[1].defined()) return variable_list(5);
    static const auto op =
        op_handle<std::vector<Tensor>(const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                                      const Tensor&, double, double, c10::ArrayRef<bool>)>(
            "fastjac::softplus_dbwd_backward");
    const auto saved = ctx->get_saved_variables();
    const auto [beta, threshold] = scalars(ctx);
    const std::vector<bool> wanted{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    const bool mask[3] = {wanted[0], wanted[1], wanted[2]};
    const auto packed = op.call(present(grads[0]), present(grads[1]), saved[0], saved[1], saved[2], beta, threshold,
                                c10::ArrayRef<bool>(mask, 3));
    return scatter_wanted(wanted, packed, 5);
  }
};

// softplus_bwd(grad, x) = grad d1(x); its VJP for (grad, x) is softplus_dbwd.
struct SoftplusBackward : torch::autograd::Function<SoftplusBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad, const Tensor& x, double beta,
                               double threshold) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);  // absent output gradients stay undefined (no zero tensors)
    ctx->save_for_backward({grad, x});
    save_scalars(ctx, beta, threshold);
    return {softplus_bwd_call(grad, x, beta, threshold)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list ggrad) {
    if (!ggrad[0].defined()) return variable_list(4);
    const auto saved = ctx->get_saved_variables();
    const auto [beta, threshold] = scalars(ctx);
    auto [g_grad, g_x] = softplus_dbwd_call(ggrad[0], saved[0], saved[1], beta, threshold);
    return {ctx->needs_input_grad(0) ? g_grad : Tensor(), ctx->needs_input_grad(1) ? g_x : Tensor(), Tensor(),
            Tensor()};
  }
};

struct SoftplusForward : torch::autograd::Function<SoftplusForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, double beta, double threshold) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);  // absent output gradients stay undefined (no zero tensors)
    static const auto op = op_handle<Tensor(const Tensor&, double, double)>("fastjac::softplus_fwd");
    ctx->save_for_backward({x});
    save_scalars(ctx, beta, threshold);
    return {op.call(x, beta, threshold)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(3);
    const auto [beta, threshold] = scalars(ctx);
    return {softplus_bwd_call(grads[0], ctx->get_saved_variables()[0], beta, threshold), Tensor(), Tensor()};
  }
};

namespace {

Tensor softplus_fwd_autograd(const Tensor& x, double beta, double threshold) {
  return SoftplusForward::apply(x, beta, threshold)[0];
}

Tensor softplus_bwd_autograd(const Tensor& grad, const Tensor& x, double beta, double threshold) {
  return SoftplusBackward::apply(grad, x, beta, threshold)[0];
}

std::tuple<Tensor, Tensor> softplus_dbwd_autograd(const Tensor& ggrad, const Tensor& grad, const Tensor& x,
                                                  double beta, double threshold) {
  auto out = SoftplusDoubleBackward::apply(ggrad, grad, x, beta, threshold);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastjac, Autograd, m) {
  m.impl("softplus_fwd", &softplus_fwd_autograd);
  m.impl("softplus_bwd", &softplus_bwd_autograd);
  m.impl("softplus_dbwd", &softplus_dbwd_autograd);
}

}  // namespace fastjac::autograd
