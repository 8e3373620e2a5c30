// The CUDA Softplus kernels of csrc/cuda/softplus.cu compiled for the CPU emulation of csrc/cuda/emulation.h,
// registered in fastjac_cuda_emulation with the schemas of fastjac::softplus_* (csrc/kernel_schemas.h). Built by
// tests/_cuda_emulation.py.
#define FASTJAC_CUDA_EMULATION 1
#include "cuda/softplus.cu"
#include "kernel_schemas.h"

TORCH_LIBRARY_FRAGMENT(fastjac_cuda_emulation, m) {
  using namespace fastjac::cuda;
  m.def(fastjac::schema::kSoftplusFwd, &softplus_fwd);
  m.def(fastjac::schema::kSoftplusBwd, &softplus_bwd);
  m.def(fastjac::schema::kSoftplusDbwd, &softplus_dbwd);
}
