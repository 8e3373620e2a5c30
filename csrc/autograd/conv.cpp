// Convolution's autograd links (chain.h): conv_fwd -> conv_bwd_input -> (conv_fwd, ATen's weight gradient).
//
// The kernels are ATen's own (at::convolution, at::convolution_backward, any device, so both links are
// CompositeExplicitAutograd); what fastjac changes is the double backward. PyTorch differentiates the input
// gradient gx = conv_transpose(g, W) with its generic convolution double backward, which takes the weight part,
// d<gg, gx>/dW = corr(gg, g), as a convolution of the transposed tensors (batch as channels), on CPU slower than
// the weight-gradient kernel of an ordinary backward. conv_bwd_input's VJP takes it from at::convolution_backward
// instead (1.1-3.7x faster at VGG-9's layer shapes of 8x8 and more, benchmarks/conv_double_backward.py; on CPU
// at output planes of at most 16 elements from one convolution of the transposed tensors that, unlike PyTorch's,
// gives the gradient in W's layout: weight_part_swapped):
//
//   conv_fwd(x, W, b)              = W * x + b                      (cross-correlation, as F.conv*d)
//   conv_bwd_input(g, x, W)        = W^T * g                         (x for its shape only)
//   VJP of conv_bwd_input for gg:  g-part = conv_fwd(gg, W)          (a forward convolution, next link)
//                                  W-part = weight gradient of conv(gg; W) at output gradient g (ATen;
//                                           small CPU planes: weight_part_swapped)
//
// The weight gradient of the first link (ATen's convolution_backward) keeps PyTorch's own derivatives; every
// order is exact. conv_fwd's backward asks convolution_backward for exactly the gradients the engine wants
// (input and weight in one call when both are, as PyTorch does).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "chain.h"

namespace fastjac::autograd {
namespace {

using IntList = c10::IntArrayRef;

std::vector<int64_t> zeros_like_list(IntList a) { return std::vector<int64_t>(a.size(), 0); }

Tensor conv_fwd_kernel(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntList stride, IntList padding,
                       IntList dilation, int64_t groups) {
  return at::convolution(x, weight, bias, stride, padding, dilation, false, zeros_like_list(stride), groups);
}

// ATen's convolution_backward with the given output mask (input, weight, bias: of `bias_channels` when wanted).
std::tuple<Tensor, Tensor, Tensor> aten_conv_backward(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                                      IntList stride, IntList padding, IntList dilation,
                                                      int64_t groups, bool want_input, bool want_weight,
                                                      bool want_bias = false) {
  const int64_t bias_channels = weight.size(0);
  return at::convolution_backward(grad, x, weight,
                                  want_bias ? at::OptionalIntArrayRef(bias_channels) : at::OptionalIntArrayRef(),
                                  stride, padding, dilation, false, zeros_like_list(stride), groups,
                                  {want_input, want_weight, want_bias});
}

Tensor conv_bwd_input_kernel(const Tensor& grad, const Tensor& x, const Tensor& weight, IntList stride,
                             IntList padding, IntList dilation, int64_t groups) {
  return std::get<0>(aten_conv_backward(grad, x, weight, stride, padding, dilation, groups, true, false));
}

Tensor conv_fwd_call(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntList stride, IntList padding,
                     IntList dilation, int64_t groups) {
  static const auto op = op_handle<Tensor(const Tensor&, const Tensor&, const OptTensor&, IntList, IntList, IntList,
                                          int64_t)>("fastjac::conv_fwd");
  const NextLink link;
  return op.call(x, weight, bias, stride, padding, dilation, groups);
}

Tensor conv_bwd_input_call(const Tensor& grad, const Tensor& x, const Tensor& weight, IntList stride,
                           IntList padding, IntList dilation, int64_t groups) {
  static const auto op = op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, IntList, IntList, IntList,
                                          int64_t)>("fastjac::conv_bwd_input");
  const NextLink link;
  return op.call(grad, x, weight, stride, padding, dilation, groups);
}

// The geometry (stride, padding, dilation, groups) and whether a bias was given, in one saved_data entry (each
// entry costs a string key and a hash-map insertion).
struct Geometry {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  bool has_bias;
};

void save_geometry(AutogradContext* ctx, IntList stride, IntList padding, IntList dilation, int64_t groups,
                   bool has_bias = false) {
  std::vector<int64_t> all(stride.begin(), stride.end());
  all.insert(all.end(), padding.begin(), padding.end());
  all.insert(all.end(), dilation.begin(), dilation.end());
  all.push_back(groups);
  all.push_back(has_bias);
  ctx->saved_data["geometry"] = std::move(all);
}

Geometry geometry(AutogradContext* ctx) {
  const auto all = ctx->saved_data["geometry"].toIntVector();
  const size_t d = (all.size() - 2) / 3;
  return {{all.begin(), all.begin() + d}, {all.begin() + d, all.begin() + 2 * d},
          {all.begin() + 2 * d, all.begin() + 3 * d}, all[3 * d], all[3 * d + 1] != 0};
}

// Whether conv_bwd_input's VJP takes the small-plane route: on CPU at output planes of at most 16 elements
// (VGG's 4x4 and 2x2). There oneDNN's weight-gradient kernel is slow on some hosts (an AMD EPYC with AVX-512
// IFMA: 0.55-0.8x PyTorch's double backward at 4x4; 1.2x faster on another EPYC; benchmarks/RESULTS.md), and a
// convolution of the batch-transposed tensors is faster on both; above, the split with ATen's weight gradient.
bool small_cpu_plane(const Tensor& grad) {
  int64_t plane = 1;
  for (int64_t d = 2; d < grad.dim(); ++d) plane *= grad.size(d);
  return grad.is_cpu() && plane <= 16;
}

// Whether weight_part_swapped applies: stride 1, dilation 1, one group, padding at most kernel - 1.
bool swapped_weight_part_applies(const Geometry& g, const Tensor& weight) {
  if (g.groups != 1) return false;
  for (size_t d = 0; d < g.stride.size(); ++d) {
    if (g.stride[d] != 1 || g.dilation[d] != 1 || g.padding[d] > weight.size(2 + d) - 1) return false;
  }
  return true;
}

// The weight part corr(gg, g) as one convolution of the batch-transposed tensors, giving the weight gradient in
// W's own layout: with stride and dilation 1,
//   dW[o, i, a] = sum_{n, y} g[n, o, y] gg[n, i, y + a - p] = conv(g^T, gg^T; padding k - 1 - p)[o, i, k - 1 - a]
// (g^T: batch as channels; a, y, p, k per spatial dim), i.e. that convolution flipped in every spatial dim.
// PyTorch's double backward convolves with the roles swapped (gg^T by g^T), whose [C_in, C_out, k] output is W's
// layout transposed: every later add or copy of that gradient (AccumulateGrad) is then a strided transpose, ~10x
// a contiguous add. Built from differentiable ATen ops, so autograd records it when the backward builds a graph.
Tensor weight_part_swapped(const Tensor& grad, const Tensor& gg, const Tensor& weight, IntList padding) {
  const int64_t d = weight.dim() - 2;
  std::vector<int64_t> ones(d, 1), swapped_padding(d), spatial(d);
  for (int64_t i = 0; i < d; ++i) {
    swapped_padding[i] = weight.size(2 + i) - 1 - padding[i];
    spatial[i] = 2 + i;
  }
  return at::convolution(grad.transpose(0, 1), gg.transpose(0, 1), std::nullopt, ones, swapped_padding, ones,
                         false, std::vector<int64_t>(d, 0), 1)
      .flip(spatial);
}

}  // namespace

// conv_bwd_input(grad, x, weight) = W^T * grad, linear in grad and in W, independent of x's values (x is passed
// by pointer: its shape only, no autograd edge).
struct ConvBackwardInput : torch::autograd::Function<ConvBackwardInput> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad, const Tensor& weight, const Tensor* x,
                               IntList stride, IntList padding, IntList dilation, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);  // absent output gradients stay undefined (no zero tensors)
    ctx->save_for_backward({grad, weight});
    save_geometry(ctx, stride, padding, dilation, groups);
    return {conv_bwd_input_call(grad, *x, weight, stride, padding, dilation, groups)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list ggx) {
    variable_list out(7);
    if (!ggx[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor &grad = saved[0], &weight = saved[1];
    const auto g = geometry(ctx);
    const bool want_grad = ctx->needs_input_grad(0), want_weight = ctx->needs_input_grad(1);
    const bool small = small_cpu_plane(grad);
    if (small && !swapped_weight_part_applies(g, weight)) {  // PyTorch's own, both parts in one call (ggx stands
      auto [gg_grad, unused, gg_weight] = at::_convolution_double_backward(  // in for x: only its shape is read)
          ggx[0], std::nullopt, std::nullopt, grad, weight, ggx[0], g.stride, g.padding, g.dilation, false,
          zeros_like_list(g.stride), g.groups, {want_grad, false, want_weight});
      out[0] = want_grad ? gg_grad : Tensor();
      out[1] = want_weight ? gg_weight : Tensor();
      return out;
    }
    if (want_grad) out[0] = conv_fwd_call(ggx[0], weight, std::nullopt, g.stride, g.padding, g.dilation, g.groups);
    if (want_weight && small) {
      out[1] = weight_part_swapped(grad, ggx[0], weight, g.padding);
    } else if (want_weight) {  // recorded by autograd when this backward builds a graph (PyTorch's derivatives)
      out[1] = std::get<1>(aten_conv_backward(grad, ggx[0], weight, g.stride, g.padding, g.dilation, g.groups,
                                              false, true));
    }
    return out;
  }
};

struct ConvForward : torch::autograd::Function<ConvForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                               IntList stride, IntList padding, IntList dilation, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);  // absent output gradients stay undefined (no zero tensors)
    ctx->save_for_backward({x, weight});
    save_geometry(ctx, stride, padding, dilation, groups, bias.has_value() && bias->defined());
    static const auto op = op_handle<Tensor(const Tensor&, const Tensor&, const OptTensor&, IntList, IntList,
                                            IntList, int64_t)>("fastjac::conv_fwd");
    return {op.call(x, weight, bias, stride, padding, dilation, groups)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);
    const Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1];
    const auto g = geometry(ctx);
    const bool want_x = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    const bool want_b = g.has_bias && ctx->needs_input_grad(2);  // edge 2 exists only when a bias was given
    // With a graph to build, the input gradient goes through its own link (its double backward is fastjac's);
    // the weight and bias gradients are ATen's (recorded with PyTorch's derivatives). Without, one ATen call.
    const bool own_link = want_x && at::GradMode::is_enabled();
    if (own_link) out[0] = conv_bwd_input_call(grad, x, weight, g.stride, g.padding, g.dilation, g.groups);
    if ((want_x && !own_link) || want_w || want_b) {
      auto [gx, gw, gb] = aten_conv_backward(grad, x, weight, g.stride, g.padding, g.dilation, g.groups,
                                             want_x && !own_link, want_w, want_b);
      if (!own_link) out[0] = gx;
      out[1] = gw;
      out[2] = gb;
    }
    return out;
  }
};

namespace {

Tensor conv_fwd_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntList stride,
                         IntList padding, IntList dilation, int64_t groups) {
  return ConvForward::apply(x, weight, bias, stride, padding, dilation, groups)[0];
}

Tensor conv_bwd_input_autograd(const Tensor& grad, const Tensor& x, const Tensor& weight, IntList stride,
                               IntList padding, IntList dilation, int64_t groups) {
  return ConvBackwardInput::apply(grad, weight, &x, stride, padding, dilation, groups)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(fastjac, CompositeExplicitAutograd, m) {
  m.impl("conv_fwd", &conv_fwd_kernel);
  m.impl("conv_bwd_input", &conv_bwd_input_kernel);
}

TORCH_LIBRARY_IMPL(fastjac, Autograd, m) {
  m.impl("conv_fwd", &conv_fwd_autograd);
  m.impl("conv_bwd_input", &conv_bwd_input_autograd);
}

}  // namespace fastjac::autograd
