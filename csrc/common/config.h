// Shared configuration of the header-only math in csrc/common/ (used by the CPU and CUDA kernels).
#pragma once

#if defined(__CUDACC__)
#define FASTJAC_HOST_DEVICE __host__ __device__
#else
#define FASTJAC_HOST_DEVICE
#endif
