// Python entry points of the C++ chain (fastjac._C.relu, .softplus, .batch_norm, .batch_norm_with_stats, .conv): one
// unboxed dispatcher call each, returning the op's output only (batch_norm_with_stats: and its statistics). Calling through torch.ops instead boxes every argument into IValues
// and every result (mean, invstd, the mask) into Python objects: on a tiny tensor that is most of the call.
// fastjac/ops/ uses these on the C++ chain (fastjac/ops/_paths.py says when).
#include <torch/python.h>

#include "chain.h"

namespace fastjac::autograd {
namespace {

Tensor relu(const Tensor& x) {
  static const auto op = op_handle<std::tuple<Tensor, Tensor>(const Tensor&)>("fastjac::relu_fwd");
  return std::get<0>(op.call(x));
}

Tensor softplus(const Tensor& x, double beta, double threshold) {
  static const auto op = op_handle<Tensor(const Tensor&, double, double)>("fastjac::softplus_fwd");
  return op.call(x, beta, threshold);
}

// bn_fwd's (y, mean, invstd): the statistics are those y was normalised with (differentiable outputs on a switchable
// graph, chain.h; fastjac.batch_norm_stats records them from here instead of recomputing them).
std::tuple<Tensor, Tensor, Tensor> batch_norm_with_stats(const Tensor& x, const OptTensor& weight,
                                                         const OptTensor& bias, const OptTensor& running_mean,
                                                         const OptTensor& running_var, bool training, double momentum,
                                                         double eps, bool relu, const OptTensor& frozen_switch) {
  bn_check_user_arguments(x, weight, bias, running_mean, running_var, training, eps, relu);
  if (frozen_switch.has_value()) {  // a switchable graph (chain.h): the autograd function directly
    TORCH_CHECK_VALUE(frozen_switch->dim() == 0 && frozen_switch->scalar_type() == at::kBool &&
                          frozen_switch->device().is_cpu(),
                      "fastjac._C.batch_norm: frozen_switch must be a 0-dim CPU bool tensor");
    return bn_fwd_switchable(x, weight, bias, running_mean, running_var, training, momentum, eps, relu,
                             &*frozen_switch);
  }
  static const auto op = op_handle<std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool, double, double,
      bool)>("fastjac::bn_fwd");
  return op.call(x, weight, bias, running_mean, running_var, training, momentum, eps, relu);
}

Tensor batch_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                  const OptTensor& running_var, bool training, double momentum, double eps, bool relu,
                  const OptTensor& frozen_switch) {
  return std::get<0>(batch_norm_with_stats(x, weight, bias, running_mean, running_var, training, momentum, eps, relu,
                                           frozen_switch));
}

// conv_fwd (csrc/autograd/conv.cpp): ATen's convolution with fastjac's double backward.
Tensor conv(const Tensor& x, const Tensor& weight, const OptTensor& bias, c10::IntArrayRef stride,
            c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  static const auto op = op_handle<Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::IntArrayRef,
                                          c10::IntArrayRef, c10::IntArrayRef, int64_t)>("fastjac::conv_fwd");
  return op.call(x, weight, bias, stride, padding, dilation, groups);
}

}  // namespace

void bind_entries(pybind11::module& m) {
  namespace py = pybind11;
  // The GIL is released around the call, as for PyTorch's own ops.
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("relu", &relu, "fastjac::relu_fwd's output y (C++ chain)", py::arg("x"), release);
  m.def("softplus", &softplus, "fastjac::softplus_fwd (C++ chain)", py::arg("x"), py::arg("beta"),
        py::arg("threshold"), release);
  m.def("batch_norm", &batch_norm, "fastjac::bn_fwd's output y (C++ chain); updates the running statistics once",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("training"), py::arg("momentum"), py::arg("eps"), py::arg("relu"),
        py::arg("frozen_switch") = py::none(), release);
  m.def("conv", &conv, "fastjac::conv_fwd (C++ chain): a convolution whose double backward is fastjac's",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), release);
  m.def("batch_norm_with_stats", &batch_norm_with_stats,
        "fastjac::bn_fwd's (y, mean, invstd) (C++ chain); updates the running statistics once", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("running_mean"), py::arg("running_var"), py::arg("training"),
        py::arg("momentum"), py::arg("eps"), py::arg("relu"), py::arg("frozen_switch") = py::none(), release);
}

}  // namespace fastjac::autograd
