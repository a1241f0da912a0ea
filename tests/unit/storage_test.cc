// The embedded catalog: inserts never overwrite, changes never resurrect,
// and results appear with their job in one transaction.
#include "server/storage.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/postgres_database.h"

namespace amalgam::server {
namespace {

using ::testing::HasSubstr;

std::string FreshDir(const std::string& name) {
  const char* tmp = std::getenv("TMPDIR");
  const std::string dir = std::string(tmp != nullptr ? tmp : "/tmp") +
                          "/amalgam-storage-test-" + name + "-" +
                          std::to_string(::getpid());
  std::filesystem::remove_all(dir);
  return dir;
}

std::string WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

v1::Artifact Weights(const std::string& owner, const std::string& sha256) {
  v1::Artifact artifact;
  artifact.set_kind(v1::ARTIFACT_KIND_WEIGHTS);
  artifact.set_owner(owner);
  artifact.set_sha256(sha256);
  artifact.set_size_bytes(5);
  return artifact;
}

// Each test runs on the embedded catalog and on PostgreSQL.
class StorageTest : public ::testing::TestWithParam<std::string> {
 protected:
  // A storage in a fresh directory, with a fresh catalog of the kind tested.
  absl::StatusOr<std::unique_ptr<Storage>> Open(const std::string& name) {
    const std::string dir = FreshDir(name);
    if (GetParam() == "sqlite") return Storage::Open(dir);
    return Storage::Open(dir, testing::PostgresDatabaseFor(dir));
  }

  void SetUp() override {
    if (GetParam() == "postgres" && testing::TestPostgresSocket().empty()) {
      if (testing::PostgresRequired()) {
        FAIL() << "AMALGAM_REQUIRE_POSTGRES=1 but AMALGAM_TEST_POSTGRES is "
                  "not set";
      }
      GTEST_SKIP() << "no test PostgreSQL (AMALGAM_TEST_POSTGRES)";
    }
  }
};

INSTANTIATE_TEST_SUITE_P(Catalogs, StorageTest,
                         ::testing::Values("sqlite", "postgres"));

TEST_P(StorageTest, AJobIdTakenAlreadyIsRefusedAndTheRowKept) {
  auto storage = Open("jobs");
  ASSERT_TRUE(storage.ok()) << storage.status();
  v1::Job job;
  job.set_id("job_1");
  job.set_owner("org-a");
  ASSERT_TRUE((*storage)->AddJob(job).ok());
  v1::Job other = job;
  other.set_owner("org-b");
  EXPECT_EQ((*storage)->AddJob(other).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ((*storage)->GetJob("job_1")->owner(), "org-a");
}

TEST_P(StorageTest, ModifyingADeletedArtifactIsNotFoundAndDoesNotRecreateIt) {
  auto storage = Open("modify");
  ASSERT_TRUE(storage.ok()) << storage.status();
  auto added = (*storage)->AddArtifact(
      WriteFile((*storage)->NewTempPath("t"), "bytes"), Weights("org-a", "ab"));
  ASSERT_TRUE(added.ok()) << added.status();
  ASSERT_TRUE((*storage)->DeleteArtifact(*added).ok());
  auto modified = (*storage)->ModifyArtifact(added->id(), [](v1::Artifact& a) {
    a.add_shared_with("org-b");
    return absl::OkStatus();
  });
  EXPECT_EQ(modified.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*storage)->GetArtifact(added->id()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE((*storage)->ListArtifacts()->empty());
}

TEST_P(StorageTest, ListsByOrganisationFollowGrantsAndQuotasCountContentOnce) {
  auto storage = Open("lists");
  ASSERT_TRUE(storage.ok()) << storage.status();
  Storage& s = **storage;
  auto a1 = s.AddArtifact(WriteFile(s.NewTempPath("t"), "bytes"),
                          Weights("org-a", "same"));
  auto a2 = s.AddArtifact(WriteFile(s.NewTempPath("t"), "bytes"),
                          Weights("org-a", "same"));
  auto b1 = s.AddArtifact(WriteFile(s.NewTempPath("t"), "other"),
                          Weights("org-b", "other"));
  ASSERT_TRUE(a1.ok() && a2.ok() && b1.ok());
  EXPECT_EQ(*s.OrgBytes("org-a"), 5) << "one content, stored once";
  EXPECT_EQ(s.ListArtifacts("org-b")->size(), 1u);
  ASSERT_TRUE(s.ModifyArtifact(a1->id(), [](v1::Artifact& a) {
                 a.add_shared_with("org-b");
                 return absl::OkStatus();
               }).ok());
  EXPECT_EQ(s.ListArtifacts("org-b")->size(), 2u);
  EXPECT_EQ(s.ListArtifacts("org-c")->size(), 0u);
  // The blob stays while another row names the same content.
  ASSERT_TRUE(s.DeleteArtifact(*a1).ok());
  EXPECT_TRUE(std::filesystem::exists(s.BlobPath(*a2)));
  EXPECT_EQ(s.ListArtifacts("org-b")->size(), 1u) << "the grant went too";
  ASSERT_TRUE(s.DeleteArtifact(*a2).ok());
  EXPECT_FALSE(std::filesystem::exists(s.BlobPath(*a2)));
  EXPECT_EQ(*s.Stats(), std::make_pair(int64_t{1}, int64_t{5}));
}

TEST_P(StorageTest, PublishedResultsAppearWithTheirJobOrNotAtAll) {
  auto storage = Open("publish");
  ASSERT_TRUE(storage.ok()) << storage.status();
  Storage& s = **storage;
  v1::Job job;
  job.set_id("job_p");
  job.set_owner("org-a");
  job.set_state(v1::JOB_STATE_RUNNING);
  ASSERT_TRUE(s.AddJob(job).ok());
  job.set_state(v1::JOB_STATE_SUCCEEDED);
  // The second output's file is missing: nothing is published.
  auto failed = s.PublishResults(
      job, {{WriteFile(s.NewTempPath("r"), "one"), Weights("org-a", "r1")},
            {s.NewTempPath("missing"), Weights("org-a", "r2")}});
  EXPECT_FALSE(failed.ok());
  EXPECT_TRUE(s.ListArtifacts()->empty());
  EXPECT_EQ(s.GetJob("job_p")->state(), v1::JOB_STATE_RUNNING);
  auto published = s.PublishResults(
      job, {{WriteFile(s.NewTempPath("r"), "one"), Weights("org-a", "r1")},
            {WriteFile(s.NewTempPath("r"), "two"), Weights("org-a", "r2")}});
  ASSERT_TRUE(published.ok()) << published.status();
  EXPECT_EQ(published->result_ids_size(), 2);
  EXPECT_EQ(s.GetJob("job_p")->state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(s.ListArtifacts()->size(), 2u);
}

// One amalgamd per PostgreSQL catalog until cluster mode's job queue exists:
// a second is refused; an unreachable server is UNAVAILABLE; an unknown
// catalog kind INVALID_ARGUMENT.
TEST_P(StorageTest, APostgresCatalogServesOneProcessAndNamesWhatFails) {
  if (GetParam() != "postgres") GTEST_SKIP() << "PostgreSQL only";
  const std::string dir = FreshDir("single");
  const std::string uri = testing::PostgresDatabaseFor(dir);
  auto first = Storage::Open(dir, uri);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = Storage::Open(dir + "-2", uri);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(second.status().message(), HasSubstr("another amalgamd"));
  first->reset();
  EXPECT_TRUE(Storage::Open(dir + "-3", uri).ok()) << "the lock went with it";

  auto unreachable = Storage::Open(
      dir + "-4", "postgresql://amalgam@/amalgam?host=/nonexistent-socket");
  EXPECT_EQ(unreachable.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(unreachable.status().message(), HasSubstr("cannot connect"));
  auto unknown = Storage::Open(dir + "-5", "mysql://x");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unknown.status().message(), HasSubstr("mysql://x"));
}

}  // namespace
}  // namespace amalgam::server
