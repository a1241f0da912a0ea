#include "core/cpu_cache.h"

#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace amalgam::core {
namespace {

// Buffers are mapped in whole huge pages, so that one size class serves the
// slightly different sizes of a shape and the kernel can back them with
// transparent huge pages (one fault per 2 MiB instead of per 4 KiB).
constexpr size_t kGranule = size_t{2} << 20;

struct Block {
  void* data;
  size_t bytes;
};

class CachingCpuAllocator final : public c10::Allocator {
 public:
  // LibTorch 1.13 declares allocate const, 2.3 and later not: both are here
  // (so neither says override), each overriding where it is declared.
  c10::DataPtr allocate(size_t n) const { return Allocate(n); }
  c10::DataPtr allocate(size_t n) { return Allocate(n); }

  // Pure virtual in LibTorch 2.x, absent from 1.13.
  void copy_data(void* dest, const void* src, std::size_t count) const {
    std::memcpy(dest, src, count);
  }

  void AddScope(size_t max_cached_bytes) {
    absl::MutexLock lock(&mu_);
    ++scopes_;
    max_cached_bytes_ = std::max(max_cached_bytes_, max_cached_bytes);
  }

  void RemoveScope() {
    std::vector<Block*> evicted;
    {
      absl::MutexLock lock(&mu_);
      if (--scopes_ > 0) return;
      max_cached_bytes_ = 0;
      evicted.swap(free_);
      cached_bytes_ = 0;
    }
    for (Block* block : evicted) Unmap(block);
  }

  CpuCacheStats Stats() const {
    absl::MutexLock lock(&mu_);
    CpuCacheStats stats;
    stats.hits = hits_;
    stats.misses = misses_;
    stats.cached_bytes = static_cast<int64_t>(cached_bytes_);
    stats.scopes = scopes_;
    return stats;
  }

  static CachingCpuAllocator& Get() {
    // Never destroyed: tensors may be freed during static destruction.
    static CachingCpuAllocator* const allocator = [] {
      auto* created = new CachingCpuAllocator();
      c10::SetCPUAllocator(created, /*priority=*/1);
      return created;
    }();
    return *allocator;
  }

 private:
  c10::DataPtr Allocate(size_t n) const {
    if (n < CpuCacheScope::kMinCachedBytes) {
      return c10::GetDefaultCPUAllocator()->allocate(n);
    }
    const size_t bytes = (n + kGranule - 1) / kGranule * kGranule;
    bool cached = false;
    Block* block = nullptr;
    {
      absl::MutexLock lock(&mu_);
      cached = scopes_ > 0;
      if (cached) block = TakeFree(bytes);
    }
    if (!cached) return c10::GetDefaultCPUAllocator()->allocate(n);
    if (block == nullptr) block = Map(bytes);
    return c10::DataPtr(block->data, block, &Free,
                        c10::Device(c10::DeviceType::CPU));
  }

  // The smallest free block that fits without wasting over a quarter.
  Block* TakeFree(size_t bytes) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if ((*it)->bytes >= bytes && (*it)->bytes <= bytes + bytes / 4 &&
          (best == free_.end() || (*it)->bytes < (*best)->bytes)) {
        best = it;
      }
    }
    if (best == free_.end()) {
      ++misses_;
      return nullptr;
    }
    Block* block = *best;
    free_.erase(best);
    cached_bytes_ -= block->bytes;
    ++hits_;
    return block;
  }

  Block* Map(size_t bytes) const {
    void* data = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) {
      // Give the cache back and try once more before reporting it.
      std::vector<Block*> evicted;
      {
        absl::MutexLock lock(&mu_);
        evicted.swap(free_);
        cached_bytes_ = 0;
      }
      for (Block* block : evicted) Unmap(block);
      data = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(data != MAP_FAILED,
                  "CachingCpuAllocator: can't allocate memory: you tried to "
                  "allocate ",
                  bytes, " bytes");
    }
    ::madvise(data, bytes, MADV_HUGEPAGE);  // best effort
    return new Block{data, bytes};
  }

  static void Unmap(Block* block) {
    ::munmap(block->data, block->bytes);
    delete block;
  }

  static void Free(void* context) {
    Get().Release(static_cast<Block*>(context));
  }

  void Release(Block* block) {
    std::vector<Block*> evicted;
    {
      absl::MutexLock lock(&mu_);
      if (block->bytes <= max_cached_bytes_) {
        free_.push_back(block);
        cached_bytes_ += block->bytes;
        // Least recently freed first out.
        size_t drop = 0;
        while (cached_bytes_ > max_cached_bytes_) {
          cached_bytes_ -= free_[drop]->bytes;
          evicted.push_back(free_[drop++]);
        }
        free_.erase(free_.begin(), free_.begin() + drop);
      } else {
        evicted.push_back(block);
      }
    }
    for (Block* old : evicted) Unmap(old);
  }

  mutable absl::Mutex mu_;
  mutable std::vector<Block*> free_ ABSL_GUARDED_BY(mu_);  // oldest first
  mutable size_t cached_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  mutable int64_t hits_ ABSL_GUARDED_BY(mu_) = 0;
  mutable int64_t misses_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t scopes_ ABSL_GUARDED_BY(mu_) = 0;
  size_t max_cached_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

CpuCacheScope::CpuCacheScope(size_t max_cached_bytes) {
  CachingCpuAllocator::Get().AddScope(max_cached_bytes);
}

CpuCacheScope::~CpuCacheScope() { CachingCpuAllocator::Get().RemoveScope(); }

void InstallCpuCache() { CachingCpuAllocator::Get(); }

CpuCacheStats GetCpuCacheStats() { return CachingCpuAllocator::Get().Stats(); }

}  // namespace amalgam::core
