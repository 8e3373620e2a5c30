// The CUDA BatchNorm kernels of csrc/cuda/batch_norm.cu compiled for the CPU emulation of csrc/cuda/emulation.h and
// registered in the operator library fastjac_cuda_emulation (defined here): the schemas of fastjac::bn_*
// (csrc/kernel_schemas.h) on CPU tensors, plus launch_count(), the kernels launched so far, and set_schedule(s), the
// order of a block's threads (0 in order, 1 reversed). Built by tests/_cuda_emulation.py.
#define FASTJAC_CUDA_EMULATION 1
#include "cuda/batch_norm.cu"
#include "kernel_schemas.h"

TORCH_LIBRARY(fastjac_cuda_emulation, m) {
  using namespace fastjac::cuda;
  m.def(fastjac::schema::kBnFwd, &bn_fwd);
  m.def(fastjac::schema::kBnBwd, &bn_bwd);
  m.def(fastjac::schema::kBnDbwd, &bn_dbwd);
  m.def(fastjac::schema::kBnJvp, &bn_jvp);
  m.def("launch_count() -> int", [] { return int64_t(emulation::launch_count.load()); });
  m.def("set_schedule(int schedule) -> ()", [](int64_t s) {
    TORCH_CHECK(s == emulation::kInOrder || s == emulation::kReverse, "set_schedule: expected 0 or 1, got ", s);
    emulation::schedule = emulation::Schedule(s);
  });
}
