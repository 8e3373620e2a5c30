// The CUDA perturbation kernels of csrc/cuda/perturb.cu compiled for the CPU emulation of csrc/cuda/emulation.h,
// registered in fastjac_cuda_emulation with the schemas of fastjac::philox_words / perturb_fwd / noise_row_dot
// (csrc/fastjac.cpp). Built by tests/_cuda_emulation.py.
#define FASTJAC_CUDA_EMULATION 1
#include "cuda/perturb.cu"

TORCH_LIBRARY_FRAGMENT(fastjac_cuda_emulation, m) {
  using namespace fastjac::cuda_perturb;
  m.def("philox_words(Tensor like, int seed, int offset) -> Tensor", &philox_words);
  m.def("perturb_fwd(Tensor x, Tensor sigma, int seed, int offset, int distribution) -> Tensor", &perturb_fwd);
  m.def("noise_row_dot(Tensor g, int seed, int offset, int distribution) -> Tensor", &noise_row_dot);
}
