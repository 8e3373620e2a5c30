// The schemas of the kernels of csrc/KERNELS.md, implemented per backend (csrc/cpu/, csrc/cuda/). Defined for
// the fastjac library by csrc/fastjac.cpp, and for the CPU emulation of the CUDA kernels by
// tests/cuda_emulation/, so that both libraries declare the same operators.
#pragma once

namespace fastjac::schema {

inline constexpr const char* kReluFwd = "relu_fwd(Tensor x) -> (Tensor, Tensor)";
inline constexpr const char* kReluBwd = "relu_bwd(Tensor grad, Tensor mask) -> Tensor";
inline constexpr const char* kSoftplusFwd = "softplus_fwd(Tensor x, float beta, float threshold) -> Tensor";
inline constexpr const char* kSoftplusBwd =
    "softplus_bwd(Tensor grad, Tensor x, float beta, float threshold) -> Tensor";
inline constexpr const char* kSoftplusDbwd =
    "softplus_dbwd(Tensor ggrad, Tensor grad, Tensor x, float beta, float threshold) -> (Tensor, Tensor)";
inline constexpr const char* kBnFwd =
    "bn_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "bool training, float momentum, float eps, bool relu) -> (Tensor, Tensor, Tensor)";
inline constexpr const char* kBnBwd =
    "bn_bwd(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, bool training, "
    "bool relu) -> (Tensor, Tensor, Tensor)";
inline constexpr const char* kBnDbwd =
    "bn_dbwd(Tensor? ggx, Tensor? ggw, Tensor? ggb, Tensor grad, Tensor x, Tensor mean, Tensor invstd, "
    "Tensor? weight, Tensor? bias, bool training, bool relu) -> (Tensor, Tensor, Tensor)";
inline constexpr const char* kBnJvp =
    "bn_jvp(Tensor? tx, Tensor? tw, Tensor? tb, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
    "Tensor? bias, bool training, bool relu) -> Tensor";
inline constexpr const char* kPhiloxWords = "philox_words(Tensor like, int seed, int offset) -> Tensor";
inline constexpr const char* kPerturbFwd =
    "perturb_fwd(Tensor x, Tensor sigma, int seed, int offset, int distribution) -> Tensor";
inline constexpr const char* kNoiseRowDot = "noise_row_dot(Tensor g, int seed, int offset, int distribution) -> Tensor";

}  // namespace fastjac::schema
