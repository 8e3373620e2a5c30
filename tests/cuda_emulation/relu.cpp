// The CUDA ReLU kernels of csrc/cuda/relu.cu compiled for the CPU emulation of csrc/cuda/emulation.h, registered in
// fastjac_cuda_emulation with the schemas of fastjac::relu_* (csrc/fastjac.cpp). Built by tests/_cuda_emulation.py.
#define FASTJAC_CUDA_EMULATION 1
#include "cuda/relu.cu"

TORCH_LIBRARY_FRAGMENT(fastjac_cuda_emulation, m) {
  m.def("relu_fwd(Tensor x) -> (Tensor, Tensor)", &fastjac::cuda::relu_fwd);
  m.def("relu_bwd(Tensor grad, Tensor mask) -> Tensor", &fastjac::cuda::relu_bwd);
}
