// The upload protocol without gRPC or a process: sessions of an
// UploadManager over a storage in a fresh directory, on each catalog.
#include "server/upload_manager.h"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/synchronization/notification.h"
#include "core/sha256.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/postgres_database.h"

namespace amalgam::server {
namespace {

using ::testing::HasSubstr;

// A safetensors file of one F32 tensor "w" of `n` elements 0, 1, 2, ...
std::string Safetensors(int n) {
  std::string header = "{\"w\":{\"dtype\":\"F32\",\"shape\":[" +
                       std::to_string(n) + "],\"data_offsets\":[0," +
                       std::to_string(4 * n) + "]}}";
  while (header.size() % 8 != 0) header += ' ';
  std::string file(8, '\0');
  uint64_t length = header.size();
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>(length >> (8 * i));
  file += header;
  for (int i = 0; i < n; ++i) {
    const float value = static_cast<float>(i);
    char bytes[4];
    std::memcpy(bytes, &value, 4);
    file.append(bytes, 4);
  }
  return file;
}

std::string Sha256Of(const std::string& bytes) {
  core::Sha256 hash;
  hash.Update(bytes);
  return hash.HexDigest();
}

v1::UploadHeader HeaderFor(const std::string& bytes,
                           const std::string& upload_id = "") {
  v1::UploadHeader header;
  header.set_kind(v1::ARTIFACT_KIND_WEIGHTS);
  header.set_name("model");
  header.set_size_bytes(static_cast<int64_t>(bytes.size()));
  header.set_sha256(Sha256Of(bytes));
  header.set_upload_id(upload_id);
  return header;
}

v1::UploadChunk Chunk(const std::string& bytes, int64_t offset, int64_t size) {
  v1::UploadChunk chunk;
  chunk.set_offset(offset);
  chunk.set_data(bytes.substr(offset, size));
  return chunk;
}

// Each test runs on the embedded catalog and on PostgreSQL.
class UploadManagerTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "postgres") AMALGAM_SKIP_WITHOUT_POSTGRES();
    const char* tmp = std::getenv("TMPDIR");
    std::string name =
        ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::replace(name.begin(), name.end(), '/', '-');
    dir_ = std::string(tmp != nullptr ? tmp : "/tmp") + "/amalgam-upload-" +
           name + "-" + std::to_string(::getpid());
    std::filesystem::remove_all(dir_);
    auto storage = Storage::Open(
        dir_,
        GetParam() == "sqlite" ? "sqlite" : testing::PostgresDatabaseFor(dir_));
    ASSERT_TRUE(storage.ok()) << storage.status();
    storage_ = *std::move(storage);
  }

  void TearDown() override { std::filesystem::remove_all(dir_); }

  UploadManager Manager(UploadOptions options = {}) {
    return UploadManager(storage_.get(), options);
  }

  // Files left in tmp/ and uploads/.
  int LeftoverFiles() const {
    int count = 0;
    for (const char* sub : {"tmp", "uploads"}) {
      for (const auto& entry :
           std::filesystem::recursive_directory_iterator(dir_ + "/" + sub)) {
        count += entry.is_regular_file() ? 1 : 0;
      }
    }
    return count;
  }

  std::string dir_;
  std::unique_ptr<Storage> storage_;
};

INSTANTIATE_TEST_SUITE_P(Catalogs, UploadManagerTest,
                         ::testing::Values("sqlite", "postgres"));

TEST_P(UploadManagerTest, AnUploadBecomesAnArtifactOnlyOnceVerified) {
  UploadManager uploads = Manager();
  const std::string bytes = Safetensors(64);
  auto session = uploads.Begin("org-a", HeaderFor(bytes), [] {});
  ASSERT_TRUE(session.ok()) << session.status();
  v1::UploadChunk first = Chunk(bytes, 0, 100);
  v1::UploadChunk rest = Chunk(bytes, 100, bytes.size());
  ASSERT_TRUE((*session)->Append(&first).ok());
  EXPECT_TRUE(storage_->ListArtifacts()->empty()) << "nothing before the end";
  ASSERT_TRUE((*session)->Append(&rest).ok());
  ASSERT_TRUE((*session)->EndOfStream().ok());
  auto artifact = (*session)->Complete();
  ASSERT_TRUE(artifact.ok()) << artifact.status();
  EXPECT_EQ(artifact->sha256(), Sha256Of(bytes));
  EXPECT_EQ(artifact->owner(), "org-a");
  EXPECT_EQ(artifact->tensor_count(), 1);
  std::ifstream blob(storage_->BlobPath(artifact->sha256()), std::ios::binary);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(blob), {}), bytes);
  session->reset();
  EXPECT_EQ(LeftoverFiles(), 0);
}

TEST_P(UploadManagerTest, BadBytesAreRefusedAndDiscarded) {
  UploadManager uploads = Manager();
  const std::string bytes = Safetensors(8);
  {
    v1::UploadHeader header = HeaderFor(bytes, "wrong-digest");
    header.set_sha256(std::string(64, 'a'));
    auto session = uploads.Begin("org-a", header, [] {});
    ASSERT_TRUE(session.ok()) << session.status();
    v1::UploadChunk all = Chunk(bytes, 0, bytes.size());
    ASSERT_TRUE((*session)->Append(&all).ok());
    ASSERT_TRUE((*session)->EndOfStream().ok());
    auto artifact = (*session)->Complete();
    EXPECT_EQ(artifact.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(artifact.status().message(), HasSubstr("\"model\""));
  }
  EXPECT_EQ(uploads.Status("org-a", "wrong-digest").status().code(),
            absl::StatusCode::kNotFound)
      << "a resumable upload of bad bytes starts again";
  {
    const std::string junk = "not a safetensors file at all";
    auto session = uploads.Begin("org-a", HeaderFor(junk), [] {});
    ASSERT_TRUE(session.ok()) << session.status();
    v1::UploadChunk all = Chunk(junk, 0, junk.size());
    ASSERT_TRUE((*session)->Append(&all).ok());
    ASSERT_TRUE((*session)->EndOfStream().ok());
    auto artifact = (*session)->Complete();
    EXPECT_EQ(artifact.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(artifact.status().message(),
                HasSubstr("not a valid safetensors file"));
  }
  EXPECT_TRUE(storage_->ListArtifacts()->empty());
  EXPECT_EQ(LeftoverFiles(), 0);
}

TEST_P(UploadManagerTest, AResumableUploadContinuesFromTheBytesHeld) {
  UploadManager uploads = Manager();
  const std::string bytes = Safetensors(1000);
  const v1::UploadHeader header = HeaderFor(bytes, "resume-1");
  {
    auto session = uploads.Begin("org-a", header, [] {});
    ASSERT_TRUE(session.ok()) << session.status();
    v1::UploadChunk part = Chunk(bytes, 0, 1500);
    ASSERT_TRUE((*session)->Append(&part).ok());
    // The stream breaks here.
    EXPECT_EQ((*session)->EndOfStream().code(),
              absl::StatusCode::kInvalidArgument);
  }
  auto status = uploads.Status("org-a", "resume-1");
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(status->committed_bytes(), 1500);
  EXPECT_EQ(uploads.Status("org-b", "resume-1").status().code(),
            absl::StatusCode::kNotFound)
      << "ids are per organisation";
  std::string artifact_id;
  {
    auto session = uploads.Begin("org-a", header, [] {});
    ASSERT_TRUE(session.ok()) << session.status();
    EXPECT_EQ((*session)->received(), 1500);
    v1::UploadChunk stale = Chunk(bytes, 0, 10);
    absl::Status refused = (*session)->Append(&stale);
    EXPECT_EQ(refused.code(), absl::StatusCode::kAborted);
    EXPECT_THAT(refused.message(), HasSubstr("holds 1500 bytes"));
    v1::UploadChunk rest = Chunk(bytes, 1500, bytes.size());
    ASSERT_TRUE((*session)->Append(&rest).ok());
    ASSERT_TRUE((*session)->EndOfStream().ok());
    auto artifact = (*session)->Complete();
    ASSERT_TRUE(artifact.ok()) << artifact.status();
    EXPECT_EQ(artifact->sha256(), Sha256Of(bytes)) << "hashed from the file";
    artifact_id = artifact->id();
  }
  // The client lost the response: the same id answers with the artifact.
  auto again = uploads.Begin("org-a", header, [] {});
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_TRUE((*again)->finished().has_value());
  EXPECT_EQ((*again)->finished()->id(), artifact_id);
  EXPECT_EQ(uploads.Status("org-a", "resume-1")->artifact_id(), artifact_id);
  EXPECT_EQ(storage_->ListArtifacts()->size(), 1u);
  again->reset();

  v1::UploadHeader changed = header;
  changed.set_name("another");
  auto refused = uploads.Begin("org-a", changed, [] {});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(), HasSubstr("resume-1"));
}

TEST_P(UploadManagerTest, OffsetsAndSizesAreHeldToTheHeader) {
  UploadManager uploads = Manager();
  const std::string bytes = Safetensors(16);
  auto session = uploads.Begin("org-a", HeaderFor(bytes), [] {});
  ASSERT_TRUE(session.ok()) << session.status();
  v1::UploadChunk skip = Chunk(bytes, 8, 8);
  EXPECT_EQ((*session)->Append(&skip).code(),
            absl::StatusCode::kFailedPrecondition);
  v1::UploadChunk all = Chunk(bytes, 0, bytes.size());
  ASSERT_TRUE((*session)->Append(&all).ok());
  v1::UploadChunk extra;
  extra.set_offset(static_cast<int64_t>(bytes.size()));
  extra.set_data("x");
  absl::Status over = (*session)->Append(&extra);
  EXPECT_EQ(over.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(over.message(), HasSubstr("declared size_bytes"));

  v1::UploadHeader bad = HeaderFor(bytes);
  bad.set_sha256("xyz");
  EXPECT_EQ(uploads.Begin("org-a", bad, [] {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(UploadManagerTest, SlotsQuotasAndOneStreamPerUploadId) {
  UploadOptions options;
  options.max_uploads_per_org = 1;
  options.quota_bytes_per_org = 1000;
  UploadManager uploads = Manager(options);
  const std::string bytes = Safetensors(100);  // over 400 bytes
  bool cancelled = false;
  auto first = uploads.Begin("org-a", HeaderFor(bytes, "one"),
                             [&] { cancelled = true; });
  ASSERT_TRUE(first.ok()) << first.status();
  // The same id on a second stream: the first (whose client is most likely
  // gone) is cancelled, and this one told to retry.
  auto second = uploads.Begin("org-a", HeaderFor(bytes, "one"), [] {});
  EXPECT_EQ(second.status().code(), absl::StatusCode::kAborted);
  EXPECT_TRUE(cancelled);
  auto busy = uploads.Begin("org-a", HeaderFor(bytes), [] {});
  EXPECT_EQ(busy.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(busy.status().message(), HasSubstr("org-a"));
  EXPECT_TRUE(uploads.Begin("org-b", HeaderFor(bytes), [] {}).ok())
      << "limits are per organisation";
  first->reset();
  // The unfinished upload "one" counts against the quota: a second of the
  // same size would take org-a over 1000 bytes.
  const std::string big = Safetensors(150);
  auto over = uploads.Begin("org-a", HeaderFor(big), [] {});
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(over.status().message(), HasSubstr("org-a"));
  EXPECT_TRUE(uploads.Begin("org-a", HeaderFor(bytes), [] {}).ok());
}

// Two managers on one catalog stand for two replicas (on SQLite, two on
// one connection).
TEST_P(UploadManagerTest, LimitsAndUploadIdsHoldAcrossProcessesOnOneCatalog) {
  UploadOptions options;
  options.max_uploads_per_org = 1;
  options.stream_lease = absl::Milliseconds(300);  // renewed every 100 ms
  options.holder = "replica-1";
  UploadManager first = Manager(options);
  options.holder = "replica-2";
  UploadManager second = Manager(options);
  const std::string bytes = Safetensors(16);
  absl::Notification cancelled;
  auto held = first.Begin("org-a", HeaderFor(bytes, "shared-id"),
                          [&] { cancelled.Notify(); });
  ASSERT_TRUE(held.ok()) << held.status();
  auto busy = second.Begin("org-a", HeaderFor(bytes), [] {});
  EXPECT_EQ(busy.status().code(), absl::StatusCode::kResourceExhausted)
      << "the limit counts the other replica's stream";
  auto taken = second.Begin("org-a", HeaderFor(bytes, "shared-id"), [] {});
  EXPECT_EQ(taken.status().code(), absl::StatusCode::kAborted);
  // The other replica's stream is cancelled at its next renewal.
  EXPECT_TRUE(cancelled.WaitForNotificationWithTimeout(absl::Seconds(5)));
  held->reset();
  auto retried = second.Begin("org-a", HeaderFor(bytes, "shared-id"), [] {});
  EXPECT_TRUE(retried.ok()) << retried.status();
  retried->reset();

  // A stream whose replica died (no renewal) holds nothing once its lease
  // has run out.
  ASSERT_TRUE(storage_->catalog()
                  ->OpenStream("stream_dead", "org-a", "shared-id", "gone",
                               absl::Milliseconds(1), 1)
                  .ok());
  absl::SleepFor(absl::Milliseconds(20));
  auto after = first.Begin("org-a", HeaderFor(bytes, "shared-id"), [] {});
  EXPECT_TRUE(after.ok()) << after.status();
}

TEST_P(UploadManagerTest, StaleUploadsExpireUnlessBeingReceived) {
  UploadOptions options;
  // Everything touched before a second from now is stale.
  options.upload_expiry = absl::Seconds(-1);
  UploadManager uploads = Manager(options);
  const std::string bytes = Safetensors(32);
  auto session = uploads.Begin("org-a", HeaderFor(bytes, "idle"), [] {});
  ASSERT_TRUE(session.ok()) << session.status();
  v1::UploadChunk part = Chunk(bytes, 0, 20);
  ASSERT_TRUE((*session)->Append(&part).ok());
  EXPECT_EQ(*uploads.ExpireStale(), 0) << "a stream is receiving it";
  session->reset();
  EXPECT_EQ(*uploads.ExpireStale(), 1);
  EXPECT_EQ(uploads.Status("org-a", "idle").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(LeftoverFiles(), 0);
}

TEST_P(UploadManagerTest, StatisticsMustDescribeAWeightsArtifactTheOwnerSees) {
  UploadManager uploads = Manager();
  v1::UploadHeader header = HeaderFor(Safetensors(4));
  header.set_kind(v1::ARTIFACT_KIND_GRAM);
  header.set_describes("art_unknown");
  auto refused = uploads.Begin("org-a", header, [] {});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(refused.status().message(), HasSubstr("art_unknown"));
}

}  // namespace
}  // namespace amalgam::server
