#pragma once

#include <cstddef>
#include <cstdint>

namespace amalgam::core {

// Large CPU tensor buffers are kept for reuse while a merge runs.
//
// A merge allocates the same few shapes for every layer (float64 copies of
// Grams and weights, factors, results). Fresh multi-MiB buffers come from
// mmap and cost a page fault and a zeroed page per 4 KiB on first touch, and
// a munmap on free: in a RegMean merge that was about a sixth of the time.
// While at least one CpuCacheScope is alive, LibTorch's CPU allocations of
// kMinCachedBytes or more are served from, and returned to, a cache of freed
// buffers (at most `max_cached_bytes`, least recently freed dropped first).
// When the last scope ends the cache is emptied, so an idle server holds no
// more memory than before. Smaller allocations, and all allocations outside
// a scope, go to LibTorch's default allocator unchanged.
class CpuCacheScope {
 public:
  static constexpr size_t kMinCachedBytes = size_t{1} << 20;
  static constexpr size_t kDefaultMaxCachedBytes = size_t{2} << 30;

  explicit CpuCacheScope(size_t max_cached_bytes = kDefaultMaxCachedBytes);
  ~CpuCacheScope();
  CpuCacheScope(const CpuCacheScope&) = delete;
  CpuCacheScope& operator=(const CpuCacheScope&) = delete;
};

// Puts the caching allocator in place (LibTorch's CPU allocator slot). The
// first CpuCacheScope does it otherwise; a process with several threads
// calls this once at start-up, before they run, since the slot is a plain
// global. The allocator has no raw_deleter(): c10's raw_allocate() is not
// for it (LibTorch's tensor paths do not use it).
void InstallCpuCache();

struct CpuCacheStats {
  int64_t hits = 0;          // allocations served from the cache
  int64_t misses = 0;        // cached-size allocations that mapped new memory
  int64_t cached_bytes = 0;  // freed buffers held for reuse now
  int64_t scopes = 0;        // live CpuCacheScope objects
};

CpuCacheStats GetCpuCacheStats();

}  // namespace amalgam::core
