// CUDA device code of appo::gather_prefix_kv (the op and its CPU kernel: prefix_cache.cpp; the launcher:
// prefix_cache_cuda.cu, the only file that includes this one). Free of torch headers, so that
// bench/sm90_static.py compiles it for sm_90 alone; a .h so that packaging and appo/_extension.py's
// on-first-use build pick it up with the other headers.
//
// Fit for CUDA graphs: the per-cache descriptors travel by value as a __grid_constant__ kernel parameter
// (no host-to-device copy per call); src and length are read on the device and checked there.
//
// One launch covers up to kMaxCachesPerLaunch caches (layers x {keys, values}); blockIdx.x runs over their
// (branch, head) items, blockIdx.y over chunks of out_len rows. Each item writes zeros for its padding rows,
// then copies its prefix rows:
//   * contiguous time (time_stride == row_bytes): one run of bytes, four 16-byte loads in flight per thread;
//   * strided time: rows of row_bytes each; consecutive lanes take consecutive 16-byte vectors of a row, so
//     a warp covers one row (or several short rows) at a time, again four loads in flight per thread.
// Stores are streaming (st.global.cs): the output is not read back soon. Unaligned data (row or base not a
// multiple of 16 bytes) takes a byte loop.
//
// Byte model at the benchmark size (Qwen2.5-7B caches: 28 layers x {keys, values}, 4 rollouts x 8,192
// positions, 4 KV heads of 128 bf16; K = 12 branches, prefixes of up to 8,191 positions): the output is
// 56 x 12 x 4 x 8,191 x 256 B = 5.6 GB written, of which the prefixes (about half) are 2.8 GB read: ~8.4 GB,
// a floor of ~2.0 ms at 4.3 TB/s. sm_90 SASS (bench/sm90_static.py): 8.5 instructions per 16-byte vector
// in the contiguous loop, 46 registers, so 5 blocks of 256 threads per SM with four 16-byte loads in flight
// per thread (up to 80 KiB per SM against the ~23 KiB that 4.3 TB/s x ~700 ns needs): predicted 85-90% of
// the copy bandwidth, against the 80% target.
#pragma once

#include <cstdint>

namespace appo {

struct GatherCache {
  const char* source;      // cache [R, H, T, D]
  char* output;            // [K, H, out_len, D], contiguous
  int64_t batch_stride;    // bytes between rollouts
  int64_t head_stride;     // bytes between heads
  int64_t time_stride;     // bytes between positions
  int32_t row_bytes;       // D * element size
  int32_t time_length;     // T
  int32_t heads;           // H
  int32_t first_item;      // index of this cache's first (branch, head) item in the launch
};

// 64 descriptors of 56 bytes: 3.6 KB, within the classic 4 KB kernel-parameter limit.
constexpr int kMaxCachesPerLaunch = 64;
constexpr int kGatherThreads = 256;
constexpr int kLoadsInFlight = 4;

struct GatherParams {
  GatherCache caches[kMaxCachesPerLaunch];
  const int64_t* src;      // [K] rollout of each branch, in [0, rollouts)
  const int64_t* length;   // [K] cached positions of each branch, in [0, min(out_len, T)]
  int64_t out_len;
  int64_t rows_per_chunk;
  int32_t num_caches;
  int32_t rollouts;
};

// The checks read device memory, so they run here: a bad index stops the kernel with a device-side assert
// (reported by torch as "device-side assert triggered") instead of reading or writing out of bounds.
#define APPO_DEVICE_CHECK(condition)                                     \
  do {                                                                   \
    if (!(condition)) __assert_fail(#condition, __FILE__, __LINE__, __func__); \
  } while (0)

__device__ __forceinline__ bool aligned16(const void* pointer) {
  return (reinterpret_cast<uintptr_t>(pointer) & 15) == 0;
}

// Block-cooperative copy of n bytes (16-byte vectors when both ends are aligned and n is a multiple of 16).
__device__ void copy_run(char* dest, const char* source, int64_t n) {
  if (aligned16(dest) && aligned16(source) && (n & 15) == 0) {
    const int4* in = reinterpret_cast<const int4*>(source);
    int4* out = reinterpret_cast<int4*>(dest);
    const int64_t vectors = n >> 4, step = blockDim.x;
    int64_t i = threadIdx.x;
    for (; i + (kLoadsInFlight - 1) * step < vectors; i += kLoadsInFlight * step) {
      int4 v[kLoadsInFlight];
#pragma unroll
      for (int j = 0; j < kLoadsInFlight; ++j) v[j] = __ldg(in + i + j * step);
#pragma unroll
      for (int j = 0; j < kLoadsInFlight; ++j) __stcs(out + i + j * step, v[j]);
    }
    for (; i < vectors; i += step) __stcs(out + i, __ldg(in + i));
    return;
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dest[i] = source[i];
}

// Vectors [first, vectors) of a row-strided copy, per_row 16-byte vectors per row, blockDim apart, four
// loads in flight per thread. Consecutive lanes take consecutive vectors: a warp covers one row (or several
// rows shorter than 32 vectors). Row lookup: a shift when per_row is a power of two, else a division.
template <bool kPowerOfTwo>
__device__ void copy_vectors(int4* dest, const char* source, uint32_t vectors, uint32_t per_row,
                             int64_t time_stride) {
  const uint32_t shift = __ffs(per_row) - 1, step = blockDim.x;
  for (uint32_t i = threadIdx.x; i < vectors; i += kLoadsInFlight * step) {
    int4 v[kLoadsInFlight];
#pragma unroll
    for (int j = 0; j < kLoadsInFlight; ++j) {
      const uint32_t k = i + j * step;
      const uint32_t row = kPowerOfTwo ? k >> shift : k / per_row;
      if (k < vectors) v[j] = __ldg(reinterpret_cast<const int4*>(source + row * time_stride) + (k - row * per_row));
    }
#pragma unroll
    for (int j = 0; j < kLoadsInFlight; ++j) {
      if (i + j * step < vectors) __stcs(dest + i + j * step, v[j]);
    }
  }
}

// Block-cooperative copy of `rows` rows of row_bytes each, the source rows time_stride bytes apart. A chunk
// holds at most 64 KiB, so vector indices fit 32 bits.
__device__ void copy_rows(char* dest, const char* source, int64_t rows, int32_t row_bytes, int64_t time_stride) {
  if (aligned16(dest) && aligned16(source) && (row_bytes & 15) == 0 && (time_stride & 15) == 0) {
    const uint32_t per_row = row_bytes >> 4;
    const uint32_t vectors = static_cast<uint32_t>(rows) * per_row;
    if ((per_row & (per_row - 1)) == 0) {
      copy_vectors<true>(reinterpret_cast<int4*>(dest), source, vectors, per_row, time_stride);
    } else {
      copy_vectors<false>(reinterpret_cast<int4*>(dest), source, vectors, per_row, time_stride);
    }
    return;
  }
  for (int64_t i = threadIdx.x; i < rows * row_bytes; i += blockDim.x) {
    dest[i] = source[(i / row_bytes) * time_stride + i % row_bytes];
  }
}

// Block-cooperative zero fill of n bytes.
__device__ void zero_run(char* dest, int64_t n) {
  if (aligned16(dest) && (n & 15) == 0) {
    int4* out = reinterpret_cast<int4*>(dest);
    for (int64_t i = threadIdx.x; i < (n >> 4); i += blockDim.x) __stcs(out + i, make_int4(0, 0, 0, 0));
    return;
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dest[i] = 0;
}

__global__ void __launch_bounds__(kGatherThreads) gather_prefix_kv_kernel(const __grid_constant__ GatherParams p) {
  const int32_t item = blockIdx.x;
  int lo = 0, hi = p.num_caches - 1;  // the last cache whose first_item <= item
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.caches[mid].first_item <= item) lo = mid; else hi = mid - 1;
  }
  const GatherCache& c = p.caches[lo];
  const int64_t local = item - c.first_item;
  const int64_t k = local / c.heads, h = local % c.heads;
  const int64_t rollout = p.src[k], len = p.length[k];
  APPO_DEVICE_CHECK(rollout >= 0 && rollout < p.rollouts);
  APPO_DEVICE_CHECK(len >= 0 && len <= p.out_len && len <= c.time_length);
  const int64_t pad = p.out_len - len;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * p.rows_per_chunk;
  const int64_t row_end = min(p.out_len, row_begin + p.rows_per_chunk);
  if (row_begin >= row_end) return;
  char* dest = c.output + local * p.out_len * c.row_bytes;
  const int64_t zero_end = min(row_end, pad);
  if (row_begin < zero_end) zero_run(dest + row_begin * c.row_bytes, (zero_end - row_begin) * c.row_bytes);
  const int64_t copy_begin = max(row_begin, pad);
  if (copy_begin >= row_end) return;
  const char* source = c.source + rollout * c.batch_stride + h * c.head_stride + (copy_begin - pad) * c.time_stride;
  if (c.time_stride == c.row_bytes) {
    copy_run(dest + copy_begin * c.row_bytes, source, (row_end - copy_begin) * c.row_bytes);
  } else {
    copy_rows(dest + copy_begin * c.row_bytes, source, row_end - copy_begin, c.row_bytes, c.time_stride);
  }
}

}  // namespace appo
