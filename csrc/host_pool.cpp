// Caching pool of large host blocks (host_pool.h says why).
#include "host_pool.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(_WIN32)
#include <malloc.h>
#endif

namespace fastclt {
namespace host_pool {
namespace {

constexpr size_t kAlign = size_t(2) << 20;  // one transparent huge page

// `bytes` is a multiple of kAlign. MSVC has no std::aligned_alloc (and its blocks need their own free).
void* aligned_block(size_t bytes) {
#if defined(_WIN32)
  return _aligned_malloc(bytes, kAlign);
#else
  return std::aligned_alloc(kAlign, bytes);
#endif
}

void free_block(void* p) {
#if defined(_WIN32)
  _aligned_free(p);
#else
  std::free(p);
#endif
}

int64_t limit_from_env() {
  const char* env = std::getenv("FASTCLT_HOST_POOL_MB");
  if (env == nullptr || *env == '\0') return int64_t(4096) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mb >= 0, "FASTCLT_HOST_POOL_MB: expected a non-negative "
              "integer (MiB; 0 turns the host pool off), got '", env, "'");
  return int64_t(mb) << 20;
}

class Pool {
 public:
  Pool() : limit_(limit_from_env()) {}

  void* acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= int64_t(bytes);
        ++hits_;
        return p;
      }
      ++misses_;
    }
    void* p = aligned_block(bytes);
    TORCH_CHECK(p != nullptr, "fastclt: out of host memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // advice only: a failure leaves ordinary pages
#endif
    return p;
  }

  // Keeps the block unless it alone exceeds the limit; to make room, older unused blocks of other
  // sizes are freed first (largest first), so the pool holds what the program uses now.
  void give_back(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (int64_t(bytes) > limit_) {
        drop.push_back(p);
      } else {
        for (auto it = free_.rbegin(); it != free_.rend() && cached_ + int64_t(bytes) > limit_; ++it) {
          while (!it->second.empty() && cached_ + int64_t(bytes) > limit_) {
            drop.push_back(it->second.back());
            it->second.pop_back();
            cached_ -= int64_t(it->first);
          }
        }
        free_[bytes].push_back(p);
        cached_ += int64_t(bytes);
      }
    }
    for (void* q : drop) free_block(q);
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t blocks = 0;
    for (auto& kv : free_) blocks += int64_t(kv.second.size());
    return {cached_, blocks, limit_, hits_, misses_};
  }

  bool enabled() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_ > 0;
  }

  // Frees unused blocks, largest first, until at most `keep` bytes are held.
  void trim(int64_t keep) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.rbegin(); it != free_.rend() && cached_ > keep; ++it) {
        while (!it->second.empty() && cached_ > keep) {
          drop.push_back(it->second.back());
          it->second.pop_back();
          cached_ -= int64_t(it->first);
        }
      }
    }
    for (void* p : drop) free_block(p);
  }

  void set_limit(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes;
    }
    trim(bytes);
  }

 private:
  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;  // unused blocks by size
  int64_t cached_ = 0;
  int64_t limit_;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "fastclt host_pool::empty: expected a CPU device, got ",
              options.device());
  int64_t numel = 1;
  for (int64_t s : sizes) {
    TORCH_CHECK(s >= 0, "fastclt host_pool::empty: negative size in ", sizes);
    numel *= s;
  }
  const int64_t nbytes = numel * int64_t(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (nbytes < kMinBytes || !pool().enabled()) return at::empty(sizes, options);
  const size_t bytes = (size_t(nbytes) + kAlign - 1) / kAlign * kAlign;
  void* p = pool().acquire(bytes);
  return at::from_blob(p, sizes, [bytes](void* q) { pool().give_back(q, bytes); }, options);
}

Stats stats() { return pool().stats(); }

void release() { pool().trim(0); }

void set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "fastclt host_pool::set_limit: bytes must be >= 0, got ", bytes);
  pool().set_limit(bytes);
}

}  // namespace host_pool
}  // namespace fastclt
