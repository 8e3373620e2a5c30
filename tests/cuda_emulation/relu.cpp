// The CUDA ReLU kernels of csrc/cuda/relu.cu compiled for the CPU emulation of csrc/cuda/emulation.h, registered in
// fastjac_cuda_emulation with the schemas of fastjac::relu_* (csrc/kernel_schemas.h). Built by
// tests/_cuda_emulation.py.
#define FASTJAC_CUDA_EMULATION 1
#include "cuda/relu.cu"
#include "kernel_schemas.h"

TORCH_LIBRARY_FRAGMENT(fastjac_cuda_emulation, m) {
  m.def(fastjac::schema::kReluFwd, &fastjac::cuda::relu_fwd);
  m.def(fastjac::schema::kReluBwd, &fastjac::cuda::relu_bwd);
}
