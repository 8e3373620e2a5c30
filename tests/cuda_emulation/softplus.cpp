// The CUDA Softplus kernels of csrc/cuda/softplus.cu compiled for the CPU emulation of csrc/cuda/emulation.h,
// registered in fastjac_cuda_emulation with the schemas of fastjac::softplus_* (csrc/fastjac.cpp). Built by
// tests/_cuda_emulation.py.
#define FASTJAC_CUDA_EMULATION 1
#include "cuda/softplus.cu"

TORCH_LIBRARY_FRAGMENT(fastjac_cuda_emulation, m) {
  using namespace fastjac::cuda;
  m.def("softplus_fwd(Tensor x, float beta, float threshold) -> Tensor", &softplus_fwd);
  m.def("softplus_bwd(Tensor grad, Tensor x, float beta, float threshold) -> Tensor", &softplus_bwd);
  m.def("softplus_dbwd(Tensor ggrad, Tensor grad, Tensor x, float beta, float threshold) -> (Tensor, Tensor)",
        &softplus_dbwd);
}
