// The CUDA perturbation kernels of csrc/cuda/perturb.cu compiled for the CPU emulation of csrc/cuda/emulation.h,
// registered in fastjac_cuda_emulation with the schemas of fastjac::philox_words / perturb_fwd / noise_row_dot
// (csrc/kernel_schemas.h). Built by tests/_cuda_emulation.py.
#define FASTJAC_CUDA_EMULATION 1
#include "cuda/perturb.cu"
#include "kernel_schemas.h"

TORCH_LIBRARY_FRAGMENT(fastjac_cuda_emulation, m) {
  using namespace fastjac::cuda_perturb;
  m.def(fastjac::schema::kPhiloxWords, &philox_words);
  m.def(fastjac::schema::kPerturbFwd, &perturb_fwd);
  m.def(fastjac::schema::kNoiseRowDot, &noise_row_dot);
}
