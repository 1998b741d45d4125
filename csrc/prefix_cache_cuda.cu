// CUDA launcher of appo::gather_prefix_kv (schema and CPU kernel in prefix_cache.cpp; the kernel itself in
// prefix_cache_kernel.h, see there). Safe under CUDA-graph capture: the descriptors are a kernel
// parameter, src and length stay on the device (checked there), and the launches run on torch's current
// stream. More caches than one launch takes (kMaxCachesPerLaunch) are gathered in several launches.

#include <ATen/ATen.h>
// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls cuBLAS/cuSPARSE headers the kernel does not need):
// c10::cuda::getCurrentCUDAStream is the function at::cuda::getCurrentCUDAStream re-exports.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "prefix_cache.h"
#include "prefix_cache_kernel.h"

namespace appo {
namespace {

constexpr int64_t kChunkBytes = 64 * 1024;  // rows of one (branch, head) item per block

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> gather_prefix_kv_cuda(
    at::TensorList keys, at::TensorList values, const at::Tensor& src, const at::Tensor& length,
    int64_t out_len) {
  std::vector<at::Tensor> key_list(keys.begin(), keys.end()), value_list(values.begin(), values.end());
  check_gather_args(key_list, value_list, src, length, out_len);
  const c10::cuda::CUDAGuard guard(key_list[0].device());
  const int64_t branches = src.size(0);
  std::vector<at::Tensor> caches = key_list;
  caches.insert(caches.end(), value_list.begin(), value_list.end());
  std::vector<at::Tensor> outputs = allocate_outputs(caches, branches, out_len);
  const size_t layers = key_list.size();
  std::vector<at::Tensor> key_out(outputs.begin(), outputs.begin() + layers);
  std::vector<at::Tensor> value_out(outputs.begin() + layers, outputs.end());
  if (branches == 0 || out_len == 0) return {key_out, value_out};

  const auto src_c = src.contiguous(), length_c = length.contiguous();
  const int64_t element_bytes = static_cast<int64_t>(caches[0].element_size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t first = 0; first < caches.size(); first += kMaxCachesPerLaunch) {
    const size_t count = std::min<size_t>(kMaxCachesPerLaunch, caches.size() - first);
    GatherParams params{};
    int64_t items = 0, max_row_bytes = 1;
    for (size_t i = 0; i < count; ++i) {
      const at::Tensor& x = caches[first + i];
      const int64_t row_bytes = x.size(3) * element_bytes;
      TORCH_CHECK(row_bytes <= std::numeric_limits<int32_t>::max() && x.size(2) <= std::numeric_limits<int32_t>::max(),
                  "gather_prefix_kv: cache dimensions too large: ", x.sizes());
      params.caches[i] = {static_cast<const char*>(x.data_ptr()), static_cast<char*>(outputs[first + i].data_ptr()),
                          x.stride(0) * element_bytes, x.stride(1) * element_bytes, x.stride(2) * element_bytes,
                          static_cast<int32_t>(row_bytes), static_cast<int32_t>(x.size(2)),
                          static_cast<int32_t>(x.size(1)), static_cast<int32_t>(items)};
      items += branches * x.size(1);
      max_row_bytes = std::max(max_row_bytes, row_bytes);
    }
    if (items == 0) continue;
    TORCH_CHECK(items < (1LL << 31), "gather_prefix_kv: too many (cache, branch, head) items: ", items);
    params.src = src_c.data_ptr<int64_t>();
    params.length = length_c.data_ptr<int64_t>();
    params.out_len = out_len;
    params.rows_per_chunk = std::max<int64_t>(1, kChunkBytes / max_row_bytes);
    params.num_caches = static_cast<int32_t>(count);
    params.rollouts = static_cast<int32_t>(caches[0].size(0));
    const int64_t chunks = (out_len + params.rows_per_chunk - 1) / params.rows_per_chunk;
    TORCH_CHECK(chunks < 65536, "gather_prefix_kv: out_len too large: ", out_len);
    const dim3 grid(static_cast<unsigned>(items), static_cast<unsigned>(chunks));
    gather_prefix_kv_kernel<<<grid, kGatherThreads, 0, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {key_out, value_out};
}

}  // namespace
}  // namespace appo

TORCH_LIBRARY_IMPL(appo, CUDA, m) {
  m.impl("gather_prefix_kv", &appo::gather_prefix_kv_cuda);
}
