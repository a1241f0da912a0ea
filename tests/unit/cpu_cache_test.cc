#include "core/cpu_cache.h"

#include <ATen/ATen.h>

#include <optional>

#include "gtest/gtest.h"

namespace amalgam::core {
namespace {

constexpr int64_t kMiB = 1 << 20;

// Bytes-sized float tensor.
at::Tensor Buffer(int64_t bytes) { return at::empty({bytes / 4}, at::kFloat); }

TEST(CpuCacheTest, AFreedBufferIsReusedWithinAScope) {
  CpuCacheScope scope;
  const CpuCacheStats before = GetCpuCacheStats();
  void* first = nullptr;
  {
    at::Tensor t = Buffer(8 * kMiB);
    first = t.data_ptr();
    t.fill_(1.0f);
  }
  EXPECT_EQ(GetCpuCacheStats().cached_bytes - before.cached_bytes, 8 * kMiB);
  // A slightly smaller request fits the same block.
  at::Tensor again = Buffer(8 * kMiB - 4096);
  EXPECT_EQ(again.data_ptr(), first);
  const CpuCacheStats after = GetCpuCacheStats();
  EXPECT_EQ(after.hits - before.hits, 1);
  EXPECT_EQ(after.misses - before.misses, 1);
  // Contents are the caller's business (like at::empty), but the memory is
  // usable in full.
  again.fill_(2.0f);
  EXPECT_EQ(again.sum().item<double>(), 2.0 * again.numel());
}

TEST(CpuCacheTest, ABlockMuchLargerThanTheRequestIsNotUsed) {
  CpuCacheScope scope;
  void* large = nullptr;
  {
    at::Tensor t = Buffer(64 * kMiB);
    large = t.data_ptr();
  }
  at::Tensor small = Buffer(16 * kMiB);
  EXPECT_NE(small.data_ptr(), large);
}

TEST(CpuCacheTest, SmallAllocationsAndAllocationsOutsideAScopeAreNotCached) {
  const CpuCacheStats before = GetCpuCacheStats();
  ASSERT_EQ(before.scopes, 0);
  { at::Tensor t = Buffer(8 * kMiB); }
  {
    CpuCacheScope scope;
    { at::Tensor t = Buffer(64 * 1024); }
    EXPECT_EQ(GetCpuCacheStats().cached_bytes, 0);
  }
  const CpuCacheStats after = GetCpuCacheStats();
  EXPECT_EQ(after.hits, before.hits);
  EXPECT_EQ(after.misses, before.misses);
}

TEST(CpuCacheTest, TheCacheIsEmptiedWhenTheLastScopeEnds) {
  std::optional<CpuCacheScope> outer(std::in_place);
  {
    CpuCacheScope inner;
    { at::Tensor t = Buffer(4 * kMiB); }
  }
  // The outer scope still runs: the block stays for it.
  EXPECT_EQ(GetCpuCacheStats().cached_bytes, 4 * kMiB);
  // A buffer still in use when the last scope ends is freed, not cached,
  // when it is dropped later.
  at::Tensor held = Buffer(6 * kMiB);
  outer.reset();
  EXPECT_EQ(GetCpuCacheStats().cached_bytes, 0);
  held = at::Tensor();
  EXPECT_EQ(GetCpuCacheStats().cached_bytes, 0);
}

TEST(CpuCacheTest, TheCacheHoldsAtMostItsLimitDroppingTheOldestFirst) {
  CpuCacheScope scope(/*max_cached_bytes=*/10 * kMiB);
  void* oldest = nullptr;
  void* newest = nullptr;
  {
    at::Tensor a = Buffer(4 * kMiB);
    at::Tensor b = Buffer(4 * kMiB);
    at::Tensor c = Buffer(4 * kMiB);
    oldest = a.data_ptr();
    newest = c.data_ptr();
    a = at::Tensor();
    b = at::Tensor();
    c = at::Tensor();
  }
  EXPECT_EQ(GetCpuCacheStats().cached_bytes, 8 * kMiB);
  at::Tensor x = Buffer(4 * kMiB);
  at::Tensor y = Buffer(4 * kMiB);
  EXPECT_NE(x.data_ptr(), oldest);
  EXPECT_NE(y.data_ptr(), oldest);
  EXPECT_TRUE(x.data_ptr() == newest || y.data_ptr() == newest);
}

}  // namespace
}  // namespace amalgam::core
