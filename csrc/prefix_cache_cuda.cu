// CUDA kernel of appo::gather_prefix_kv (schema and CPU kernel in prefix_cache.cpp; see there for the op).
//
// One launch covers every layer: a device array of per-cache descriptors (source/output pointers, strides,
// heads) is indexed by blockIdx.x over the flattened (cache, branch, head) items; blockIdx.y splits each
// item's out_len rows into chunks. Bytes move in 16-byte vectors when source and destination share their
// alignment modulo 16, with scalar head and tail; the launch runs on torch's current CUDA stream.

#include <ATen/ATen.h>
// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls cuBLAS/cuSPARSE headers the kernel does not need):
// c10::cuda::getCurrentCUDAStream is the function at::cuda::getCurrentCUDAStream re-exports.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "prefix_cache.h"

namespace appo {
namespace {

struct CacheDescriptor {
  const char* source;       // cache [R, H, T, D]
  char* output;             // [K, H, out_len, D], contiguous
  int64_t batch_stride;     // bytes between rollouts
  int64_t head_stride;      // bytes between heads
  int64_t time_stride;      // bytes between positions
  int64_t row_bytes;        // D * element size
  int64_t time_length;      // T
  int64_t heads;            // H
  int64_t first_item;       // index of this cache's first (branch, head) item
};

constexpr int kThreads = 256;
constexpr int64_t kChunkBytes = 64 * 1024;

// Block-cooperative copy of n bytes; 16-byte vectors where source and destination align alike.
__device__ void copy_bytes(char* dest, const char* source, int64_t n) {
  const auto d = reinterpret_cast<uintptr_t>(dest), s = reinterpret_cast<uintptr_t>(source);
  int64_t head = n, body = 0;
  if (((d ^ s) & 15) == 0) {
    head = min(n, static_cast<int64_t>((16 - (d & 15)) & 15));
    body = (n - head) / 16;
  }
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) dest[i] = source[i];
  const int4* source_vec = reinterpret_cast<const int4*>(source + head);
  int4* dest_vec = reinterpret_cast<int4*>(dest + head);
  for (int64_t i = threadIdx.x; i < body; i += blockDim.x) dest_vec[i] = source_vec[i];
  for (int64_t i = head + body * 16 + threadIdx.x; i < n; i += blockDim.x) dest[i] = source[i];
}

// Block-cooperative zero fill of n bytes, 16-byte vectors on the aligned part.
__device__ void zero_bytes(char* dest, int64_t n) {
  const auto d = reinterpret_cast<uintptr_t>(dest);
  const int64_t head = min(n, static_cast<int64_t>((16 - (d & 15)) & 15));
  const int64_t body = (n - head) / 16;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) dest[i] = 0;
  int4* dest_vec = reinterpret_cast<int4*>(dest + head);
  for (int64_t i = threadIdx.x; i < body; i += blockDim.x) dest_vec[i] = make_int4(0, 0, 0, 0);
  for (int64_t i = head + body * 16 + threadIdx.x; i < n; i += blockDim.x) dest[i] = 0;
}

__global__ void gather_prefix_kv_kernel(const CacheDescriptor* __restrict__ caches, int num_caches,
                                        const int64_t* __restrict__ src, const int64_t* __restrict__ length,
                                        int64_t out_len, int64_t rows_per_chunk) {
  const int64_t item = blockIdx.x;
  int lo = 0, hi = num_caches - 1;  // the last cache whose first_item <= item
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (caches[mid].first_item <= item) lo = mid; else hi = mid - 1;
  }
  const CacheDescriptor c = caches[lo];
  const int64_t local = item - c.first_item;
  const int64_t k = local / c.heads, h = local % c.heads;
  const int64_t len = length[k], pad = out_len - len;
  CUDA_KERNEL_ASSERT(len >= 0 && len <= out_len && len <= c.time_length);
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = min(out_len, row_begin + rows_per_chunk);
  if (row_begin >= row_end) return;
  char* dest = c.output + (local * out_len) * c.row_bytes;
  const int64_t zero_end = min(row_end, pad);
  if (row_begin < zero_end) zero_bytes(dest + row_begin * c.row_bytes, (zero_end - row_begin) * c.row_bytes);
  const int64_t copy_begin = max(row_begin, pad);
  if (copy_begin >= row_end) return;
  const char* source = c.source + src[k] * c.batch_stride + h * c.head_stride;
  if (c.time_stride == c.row_bytes) {
    copy_bytes(dest + copy_begin * c.row_bytes, source + (copy_begin - pad) * c.row_bytes,
               (row_end - copy_begin) * c.row_bytes);
  } else {
    for (int64_t r = copy_begin; r < row_end; ++r) {
      copy_bytes(dest + r * c.row_bytes, source + (r - pad) * c.time_stride, c.row_bytes);
    }
  }
}

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

  const int64_t element_bytes = static_cast<int64_t>(caches[0].element_size());
  auto table = at::empty({static_cast<int64_t>(caches.size() * sizeof(CacheDescriptor))},
                         at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* descriptors = reinterpret_cast<CacheDescriptor*>(table.data_ptr<uint8_t>());
  int64_t items = 0, max_row_bytes = 1;
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& x = caches[i];
    descriptors[i] = {static_cast<const char*>(x.data_ptr()), static_cast<char*>(outputs[i].data_ptr()),
                      x.stride(0) * element_bytes, x.stride(1) * element_bytes, x.stride(2) * element_bytes,
                      x.size(3) * element_bytes, x.size(2), x.size(1), items};
    items += branches * x.size(1);
    max_row_bytes = std::max(max_row_bytes, x.size(3) * element_bytes);
  }
  const size_t layers = key_list.size();
  if (items > 0 && out_len > 0) {
    TORCH_CHECK(items < (1LL << 31), "gather_prefix_kv: too many (cache, branch, head) items: ", items);
    const auto device_table = table.to(key_list[0].device(), /*non_blocking=*/true);
    const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkBytes / max_row_bytes);
    const int64_t chunks = (out_len + rows_per_chunk - 1) / rows_per_chunk;
    TORCH_CHECK(chunks < 65536, "gather_prefix_kv: out_len too large: ", out_len);
    const dim3 grid(static_cast<unsigned>(items), static_cast<unsigned>(chunks));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    gather_prefix_kv_kernel<<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<const CacheDescriptor*>(device_table.data_ptr<uint8_t>()),
        static_cast<int>(caches.size()), src.contiguous().data_ptr<int64_t>(),
        length.contiguous().data_ptr<int64_t>(), out_len, rows_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  std::vector<at::Tensor> key_out(outputs.begin(), outputs.begin() + layers);
  std::vector<at::Tensor> value_out(outputs.begin() + layers, outputs.end());
  return {key_out, value_out};
}

}  // namespace
}  // namespace appo

TORCH_LIBRARY_IMPL(appo, CUDA, m) {
  m.impl("gather_prefix_kv", &appo::gather_prefix_kv_cuda);
}
