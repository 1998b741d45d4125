// appo::gather_prefix_kv: build left-padded branch caches from the per-layer key/value caches of a forward
// pass over R rollouts, all layers in one call.
//
// For every layer tensor X of shape [R, H, T, D] (keys and values alike) the op writes Y of shape
// [K, H, out_len, D] (contiguous) with
//     Y[k, h, out_len - length[k] + t, :] = X[src[k], h, t, :]   for 0 <= t < length[k]
//     Y[k, h, s, :]                       = 0                    for s < out_len - length[k]
// so that row k holds the first length[k] cached positions of rollout src[k], aligned to the right (the
// layout of a left-padded batch). Work is parallel over (layer, branch, head): each item streams the pad
// zeros and then one contiguous run (or length[k] rows of D elements when the source's time stride is not
// D) with non-temporal stores. The copy is dtype-agnostic: it moves bytes. Output memory is reused across
// calls (see SpareBlocks).
//
// The CUDA kernel for the same schema lives in prefix_cache_cuda.cu; the fake (meta) implementation used by
// torch.compile is registered from Python (appo/prefix_cache.py).

#include <Python.h>  // first, as Python requires; only for the module object at the end

#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "prefix_cache.h"

namespace appo {

void check_gather_args(const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                       const at::Tensor& src, const at::Tensor& length, int64_t out_len) {
  TORCH_CHECK(keys.size() == values.size(),
              "gather_prefix_kv: keys and values must have as many layers, got ", keys.size(), " and ",
              values.size());
  TORCH_CHECK(!keys.empty(), "gather_prefix_kv: keys must hold at least one layer");
  TORCH_CHECK(src.dim() == 1 && length.dim() == 1 && src.size(0) == length.size(0),
              "gather_prefix_kv: src and length must be 1-D of the same size");
  TORCH_CHECK(src.scalar_type() == at::kLong && length.scalar_type() == at::kLong,
              "gather_prefix_kv: src and length must be int64");
  TORCH_CHECK(out_len >= 0, "gather_prefix_kv: out_len must be >= 0, got ", out_len);
  const auto& first = keys[0];
  for (const auto* list : {&keys, &values}) {
    for (const auto& x : *list) {
      TORCH_CHECK(x.dim() == 4, "gather_prefix_kv: each cache must be [R, H, T, D], got ", x.dim(), " dims");
      TORCH_CHECK(x.scalar_type() == first.scalar_type(), "gather_prefix_kv: caches must share one dtype");
      TORCH_CHECK(x.device() == first.device(), "gather_prefix_kv: caches must share one device");
      TORCH_CHECK(x.size(0) == first.size(0), "gather_prefix_kv: caches must share the batch size R");
      TORCH_CHECK(x.size(3) == 0 || x.stride(3) == 1, "gather_prefix_kv: caches need a unit stride on D");
      TORCH_CHECK(x.size(2) >= 0, "gather_prefix_kv: bad cache length");
    }
  }
  TORCH_CHECK(src.device() == first.device() && length.device() == first.device(),
              "gather_prefix_kv: src and length must be on the caches' device");
}

std::vector<at::Tensor> allocate_outputs(const std::vector<at::Tensor>& caches, int64_t branches,
                                         int64_t out_len) {
  std::vector<at::Tensor> outputs;
  outputs.reserve(caches.size());
  for (const auto& x : caches) {
    outputs.push_back(at::empty({branches, x.size(1), out_len, x.size(3)}, x.options()));
  }
  return outputs;
}

namespace {

// Writes n bytes at dest (a copy of source, or zeros when source is null) with non-temporal 16-byte stores
// where dest is 16-byte aligned: the output is far larger than the caches and is not read back soon, so
// streaming stores skip the read-for-ownership of every destination line (a third of the traffic).
void stream_bytes(char* dest, const char* source, size_t n) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dest) & 15) == 0) {
    const size_t vectors = n / 16;
    auto* dest_vec = reinterpret_cast<__m128i*>(dest);
    if (source != nullptr) {
      const auto* source_vec = reinterpret_cast<const __m128i*>(source);
      for (size_t i = 0; i < vectors; ++i) _mm_stream_si128(dest_vec + i, _mm_loadu_si128(source_vec + i));
      source += vectors * 16;
    } else {
      const __m128i zero = _mm_setzero_si128();
      for (size_t i = 0; i < vectors; ++i) _mm_stream_si128(dest_vec + i, zero);
    }
    dest += vectors * 16;
    n -= vectors * 16;
  }
#endif
  if (source != nullptr) {
    std::memcpy(dest, source, n);
  } else {
    std::memset(dest, 0, n);
  }
}

// Output memory of the CPU op. A fresh block of megabytes is page-faulted on first touch (the kernel
// zero-fills every 4 KiB page: as much memory traffic as the gather itself), and glibc hands freed blocks
// of that size back to the OS. So freed output blocks are kept (up to kMaxSpareBytes in all) for the next
// call, which in appo's loop asks for the same sizes. appo::release_cached_memory() frees them.
class SpareBlocks {
 public:
  static constexpr size_t kAlign = 64, kMaxSpareBytes = size_t(1) << 30;

  // A block of at least `bytes`: a spare one that fits without wasting more than half, else a new one.
  void* take(size_t bytes, size_t* block_bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < spares_.size(); ++i) {
        if (spares_[i].second >= bytes && spares_[i].second <= 2 * bytes) {
          void* block = spares_[i].first;
          *block_bytes = spares_[i].second;
          spare_total_ -= *block_bytes;
          spares_[i] = spares_.back();
          spares_.pop_back();
          return block;
        }
      }
    }
    *block_bytes = (std::max<size_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign;
    void* block = std::aligned_alloc(kAlign, *block_bytes);
    TORCH_CHECK(block != nullptr, "gather_prefix_kv: could not allocate ", *block_bytes, " bytes");
    return block;
  }

  // Called when an output's storage dies: keep the block while the spares stay under the cap, else free it.
  void give_back(void* block, size_t block_bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (spare_total_ + block_bytes <= kMaxSpareBytes) {
        spares_.emplace_back(block, block_bytes);
        spare_total_ += block_bytes;
        return;
      }
    }
    std::free(block);
  }

  int64_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& spare : spares_) std::free(spare.first);
    spares_.clear();
    const auto released = static_cast<int64_t>(spare_total_);
    spare_total_ = 0;
    return released;
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> spares_;
  size_t spare_total_ = 0;
};

SpareBlocks& spare_blocks() {
  static auto* instance = new SpareBlocks();  // never destroyed: deleters may run during interpreter exit
  return *instance;
}

// One contiguous [branches, H, out_len, D] output per cache, each in its own (possibly reused) block.
std::vector<at::Tensor> allocate_outputs_cpu(const std::vector<at::Tensor>& caches, int64_t branches,
                                             int64_t out_len) {
  std::vector<at::Tensor> outputs;
  outputs.reserve(caches.size());
  for (const auto& x : caches) {
    const int64_t numel = branches * x.size(1) * out_len * x.size(3);
    size_t block_bytes = 0;
    void* block = spare_blocks().take(static_cast<size_t>(numel * x.element_size()), &block_bytes);
    outputs.push_back(at::from_blob(
        block, {branches, x.size(1), out_len, x.size(3)},
        [block_bytes](void* p) { spare_blocks().give_back(p, block_bytes); }, x.options()));
  }
  return outputs;
}

int64_t release_cached_memory() { return spare_blocks().release(); }

// Copies one (layer, branch, head) run: pad zeros, then `len` rows of D elements.
void copy_run(const char* source, int64_t time_stride_bytes, char* dest, int64_t pad, int64_t len,
              int64_t row_bytes) {
  stream_bytes(dest, nullptr, static_cast<size_t>(pad * row_bytes));
  dest += pad * row_bytes;
  if (time_stride_bytes == row_bytes) {
    stream_bytes(dest, source, static_cast<size_t>(len * row_bytes));
    return;
  }
  for (int64_t t = 0; t < len; ++t) {
    stream_bytes(dest + t * row_bytes, source + t * time_stride_bytes, static_cast<size_t>(row_bytes));
  }
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> gather_prefix_kv_cpu(
    at::TensorList keys, at::TensorList values, const at::Tensor& src, const at::Tensor& length,
    int64_t out_len) {
  std::vector<at::Tensor> key_list(keys.begin(), keys.end()), value_list(values.begin(), values.end());
  check_gather_args(key_list, value_list, src, length, out_len);
  const int64_t branches = src.size(0);
  const int64_t rollouts = key_list[0].size(0);
  auto src_c = src.contiguous();
  auto length_c = length.contiguous();
  const int64_t* src_ptr = src_c.data_ptr<int64_t>();
  const int64_t* len_ptr = length_c.data_ptr<int64_t>();
  for (int64_t k = 0; k < branches; ++k) {
    TORCH_CHECK(src_ptr[k] >= 0 && src_ptr[k] < rollouts, "gather_prefix_kv: src[", k, "] = ", src_ptr[k],
                " is outside [0, ", rollouts, ")");
    TORCH_CHECK(len_ptr[k] >= 0 && len_ptr[k] <= out_len, "gather_prefix_kv: length[", k, "] = ", len_ptr[k],
                " is outside [0, out_len]");
  }

  std::vector<at::Tensor> caches = key_list;
  caches.insert(caches.end(), value_list.begin(), value_list.end());
  for (const auto& x : caches) {
    for (int64_t k = 0; k < branches; ++k) {
      TORCH_CHECK(len_ptr[k] <= x.size(2), "gather_prefix_kv: length[", k, "] = ", len_ptr[k],
                  " exceeds the cache length ", x.size(2));
    }
  }
  std::vector<at::Tensor> outputs = allocate_outputs_cpu(caches, branches, out_len);

  // Work items are (cache, branch, head) triples, flattened; heads may differ across caches.
  std::vector<int64_t> first_item(caches.size() + 1, 0);
  for (size_t c = 0; c < caches.size(); ++c) {
    first_item[c + 1] = first_item[c] + branches * caches[c].size(1);
  }
  const int64_t element_bytes = static_cast<int64_t>(caches[0].element_size());
  // Grain: each item moves out_len * D elements, so a few items per task is plenty.
  at::parallel_for(0, first_item.back(), 4, [&](int64_t begin, int64_t end) {
    size_t c = 0;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= first_item[c + 1]) ++c;
      const at::Tensor& x = caches[c];
      const int64_t heads = x.size(1);
      const int64_t local = item - first_item[c];
      const int64_t k = local / heads, h = local % heads;
      const int64_t row_bytes = x.size(3) * element_bytes;
      const char* source = static_cast<const char*>(x.data_ptr()) +
                           (src_ptr[k] * x.stride(0) + h * x.stride(1)) * element_bytes;
      char* dest = static_cast<char*>(outputs[c].data_ptr()) + ((k * heads + h) * out_len) * row_bytes;
      copy_run(source, x.stride(2) * element_bytes, dest, out_len - len_ptr[k], len_ptr[k], row_bytes);
    }
#if defined(__SSE2__)
    _mm_sfence();  // make this thread's streaming stores visible before parallel_for returns
#endif
  });

  const size_t layers = key_list.size();
  std::vector<at::Tensor> key_out(outputs.begin(), outputs.begin() + layers);
  std::vector<at::Tensor> value_out(outputs.begin() + layers, outputs.end());
  return {key_out, value_out};
}

}  // namespace

}  // namespace appo

TORCH_LIBRARY(appo, m) {
  m.def("gather_prefix_kv(Tensor[] keys, Tensor[] values, Tensor src, Tensor length, int out_len)"
        " -> (Tensor[], Tensor[])");
  // Frees the CPU op's spare output block; returns the bytes released.
  m.def("release_cached_memory() -> int", &appo::release_cached_memory);
}

TORCH_LIBRARY_IMPL(appo, CPU, m) {
  m.impl("gather_prefix_kv", &appo::gather_prefix_kv_cpu);
}

// The module object makes `import appo._C` load the library (and so run the registrations above).
static struct PyModuleDef appo_c_module = {PyModuleDef_HEAD_INIT, "_C", "appo C++/CUDA ops (torch.ops.appo)",
                                           -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&appo_c_module); }
