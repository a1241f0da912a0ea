#include "core/sha256.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "gtest/gtest.h"

namespace amalgam::core {
namespace {

// FIPS 180-2 test vectors.
constexpr char kAbc[] =
    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
constexpr char kMillionA[] =
    "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";

TEST(Sha256Test, KnownVectors) {
  Sha256 abc;
  abc.Update("abc");
  EXPECT_EQ(abc.HexDigest(), kAbc);
  BackgroundSha256 background;
  background.Update("abc");
  EXPECT_EQ(background.HexDigest(), kAbc);
}

// More than kMaxPendingBytes in pieces of uneven sizes: the producer has to
// wait for the thread, the order of the pieces must be kept, and recycled
// buffers must not be reused too early.
TEST(Sha256Test, BackgroundHashOfManyPiecesEqualsTheOneShotHash) {
  BackgroundSha256 background;
  std::mt19937 rng(7);
  int64_t total = 0;
  std::string all;
  while (total < 3 * static_cast<int64_t>(BackgroundSha256::kMaxPendingBytes)) {
    // Filled in buffers the hasher hands back: one still being hashed
    // must never come back.
    std::string piece = background.TakeSpare();
    piece.resize(std::uniform_int_distribution<int>(0, 3 << 20)(rng));
    for (char& c : piece) c = static_cast<char>(rng());
    total += static_cast<int64_t>(piece.size());
    all += piece;
    background.Update(std::move(piece));
  }
  Sha256 reference;
  reference.Update(all);
  EXPECT_EQ(background.HexDigest(), reference.HexDigest());
}

TEST(Sha256Test, FileHash) {
  const char* dir = std::getenv("AMALGAM_TEST_TMPDIR");
  const std::filesystem::path base =
      dir != nullptr ? dir : std::filesystem::temp_directory_path();
  std::filesystem::create_directories(base);
  const std::string path = (base / "sha256_test_million_a").string();
  {
    std::ofstream out(path, std::ios::binary);
    out << std::string(1000000, 'a');
  }
  auto digest = Sha256File(path);
  ASSERT_TRUE(digest.ok()) << digest.status();
  EXPECT_EQ(*digest, kMillionA);
  EXPECT_EQ(Sha256File(path + ".missing").status().code(),
            absl::StatusCode::kNotFound);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace amalgam::core
