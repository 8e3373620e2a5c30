// The CUDA BatchNorm kernels of csrc/cuda/batch_norm.cu compiled for the CPU emulation of csrc/cuda/emulation.h and
// registered in the operator library fastjac_cuda_emulation (defined here): the schemas of fastjac::bn_*
// (csrc/fastjac.cpp) on CPU tensors, plus launch_count(), the kernels launched so far, and set_schedule(s), the
// order of a block's threads (0 in order, 1 reversed). Built by tests/_cuda_emulation.py.
#define FASTJAC_CUDA_EMULATION 1
#include "cuda/batch_norm.cu"

TORCH_LIBRARY(fastjac_cuda_emulation, m) {
  using namespace fastjac::cuda;
  m.def(
      "bn_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps, bool relu) -> (Tensor, Tensor, Tensor)",
      &bn_fwd);
  m.def(
      "bn_bwd(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, bool training, "
      "bool relu) -> (Tensor, Tensor, Tensor)",
      &bn_bwd);
  m.def(
      "bn_dbwd(Tensor? ggx, Tensor? ggw, Tensor? ggb, Tensor grad, Tensor x, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor? bias, bool training, bool relu) -> (Tensor, Tensor, Tensor)",
      &bn_dbwd);
  m.def(
      "bn_jvp(Tensor? tx, Tensor? tw, Tensor? tb, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor? bias, bool training, bool relu) -> Tensor",
      &bn_jvp);
  m.def("launch_count() -> int", [] { return int64_t(emulation::launch_count.load()); });
  m.def("set_schedule(int schedule) -> ()", [](int64_t s) {
    TORCH_CHECK(s == emulation::kInOrder || s == emulation::kReverse, "set_schedule: expected 0 or 1, got ", s);
    emulation::schedule = emulation::Schedule(s);
  });
}
