// Shared configuration of the header-only math in csrc/common/ (used by the CPU and CUDA kernels).
#pragma once

#if defined(__CUDACC__)
#define FASTJAC_HOST_DEVICE __host__ __device__
#define FASTJAC_INLINE __forceinline__
#else
#define FASTJAC_HOST_DEVICE
#define FASTJAC_INLINE [[gnu::always_inline]] inline
#endif
