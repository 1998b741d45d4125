// Shared declarations of the prefix-cache ops (CPU in prefix_cache.cpp, CUDA in prefix_cache_cuda.cu).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace appo {

// TORCH_CHECKs the arguments of appo::gather_prefix_kv that can be checked without reading device memory:
// as many key as value layers, [R, H, T, D] caches of one dtype/device/R with unit stride on D, 1-D int64
// src/length of one size on the caches' device, out_len >= 0.
void check_gather_args(const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                       const at::Tensor& src, const at::Tensor& length, int64_t out_len);

// One contiguous [branches, H, out_len, D] output per cache, same dtype/device as the cache (uninitialised).
std::vector<at::Tensor> allocate_outputs(const std::vector<at::Tensor>& caches, int64_t branches,
                                         int64_t out_len);

}  // namespace appo
