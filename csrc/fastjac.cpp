// The fastjac operator library: kernel schemas (csrc/KERNELS.md), implemented per backend in csrc/cpu/
// (and csrc/cuda/ when built with CUDA), their autograd links in csrc/autograd/, plus the Python module fastjac._C.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "kernel_schemas.h"

namespace fastjac::autograd {
void bind_entries(pybind11::module& m);  // csrc/autograd/entries.cpp
}
namespace fastjac::cpu {
void bind_output_pool(pybind11::module& m);  // csrc/cpu/output_pool.cpp
}

TORCH_LIBRARY(fastjac, m) {
  m.def(fastjac::schema::kReluFwd);
  m.def(fastjac::schema::kReluBwd);
  m.def(fastjac::schema::kSoftplusFwd);
  m.def(fastjac::schema::kSoftplusBwd);
  m.def(fastjac::schema::kSoftplusDbwd);
  m.def(fastjac::schema::kBnFwd);
  m.def(fastjac::schema::kBnBwd);
  m.def(fastjac::schema::kBnDbwd);
  m.def(fastjac::schema::kBnJvp);
  // Third-order links of the autograd chain (csrc/autograd/chain.h): the VJPs of softplus_dbwd and bn_dbwd,
  // implemented in Python (fastjac/ops/) by differentiating the reference formulas. `output_mask` says which
  // differentiable inputs need a gradient ((ggrad, grad, x) and (ggx, ggw, ggb, grad, x, weight)); the result
  // holds those gradients only, in order.
  m.def(
      "softplus_dbwd_backward(Tensor? grad_a, Tensor? grad_b, Tensor ggrad, Tensor grad, Tensor x, float beta, "
      "float threshold, bool[3] output_mask) -> Tensor[]");
  m.def(
      "bn_dbwd_backward(Tensor? grad_ggrad, Tensor? grad_gx, Tensor? grad_gw, Tensor? ggx, Tensor? ggw, "
      "Tensor? ggb, Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
      "bool training, bool relu, bool[6] output_mask) -> Tensor[]");
  // Convolution with a cheaper double backward (csrc/autograd/conv.cpp): ATen's kernels, fastjac's derivatives.
  m.def(
      "conv_fwd(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups) "
      "-> Tensor");
  m.def(
      "conv_bwd_input(Tensor grad, Tensor x, Tensor weight, int[] stride, int[] padding, int[] dilation, "
      "int groups) -> Tensor");
  // Perturbations (csrc/common/philox.h): counter-based noise regenerated from (seed, offset), never stored.
  m.def(fastjac::schema::kPhiloxWords);
  m.def(fastjac::schema::kPerturbFwd);
  m.def(fastjac::schema::kNoiseRowDot);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastjac compiled kernels (registered as torch.ops.fastjac.*)";
  m.def(
      "compiled_with_cuda",
      [] {
#ifdef FASTJAC_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the extension was built with the CUDA kernels.");
  fastjac::autograd::bind_entries(m);
  fastjac::cpu::bind_output_pool(m);
}
