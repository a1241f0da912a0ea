// The catalogs (embedded and PostgreSQL) with the blob store: inserts never
// overwrite, changes never resurrect, results appear with their job in one
// transaction, and no referenced blob is ever collected.
#include "server/storage.h"

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/sql.h"
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

v1::Job Queued(const std::string& id, const std::string& owner) {
  v1::Job job;
  job.set_id(id);
  job.set_owner(owner);
  job.set_state(v1::JOB_STATE_QUEUED);
  return job;
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
    dir_ = FreshDir(name);
    return Storage::Open(dir_, CatalogUri());
  }

  // The catalog of the storage Open made.
  std::string CatalogUri() const {
    return GetParam() == "sqlite" ? "sqlite"
                                  : testing::PostgresDatabaseFor(dir_);
  }

  std::string dir_;

  void SetUp() override {
    if (GetParam() == "postgres") AMALGAM_SKIP_WITHOUT_POSTGRES();
  }
};

INSTANTIATE_TEST_SUITE_P(Catalogs, StorageTest,
                         ::testing::Values("sqlite", "postgres"));

TEST_P(StorageTest, AJobIdTakenAlreadyIsRefusedAndTheRowKept) {
  auto storage = Open("jobs");
  ASSERT_TRUE(storage.ok()) << storage.status();
  Catalog& catalog = *(*storage)->catalog();
  const v1::Job job = Queued("job_1", "org-a");
  ASSERT_TRUE(catalog.SubmitJob(job, {}, JobLimits()).ok());
  v1::Job other = job;
  other.set_owner("org-b");
  EXPECT_EQ(catalog.SubmitJob(other, {}, JobLimits()).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(catalog.GetJob("job_1")->owner(), "org-a");
}

TEST_P(StorageTest, ModifyingADeletedArtifactIsNotFoundAndDoesNotRecreateIt) {
  auto storage = Open("modify");
  ASSERT_TRUE(storage.ok()) << storage.status();
  auto added = (*storage)->AddArtifact(
      {WriteFile((*storage)->NewTempPath("t"), "bytes")},
      Weights("org-a", "ab"));
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
  auto a1 = s.AddArtifact({WriteFile(s.NewTempPath("t"), "bytes")},
                          Weights("org-a", "same"));
  auto a2 = s.AddArtifact({WriteFile(s.NewTempPath("t"), "bytes")},
                          Weights("org-a", "same"));
  auto b1 = s.AddArtifact({WriteFile(s.NewTempPath("t"), "other")},
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
  EXPECT_TRUE(std::filesystem::exists(s.BlobPath(a2->sha256())));
  EXPECT_EQ(s.ListArtifacts("org-b")->size(), 1u) << "the grant went too";
  ASSERT_TRUE(s.DeleteArtifact(*a2).ok());
  EXPECT_FALSE(std::filesystem::exists(s.BlobPath(a2->sha256())));
  EXPECT_EQ(*s.Stats(), std::make_pair(int64_t{1}, int64_t{5}));
}

TEST_P(StorageTest, PublishedResultsAppearWithTheirJobOrNotAtAll) {
  auto storage = Open("publish");
  ASSERT_TRUE(storage.ok()) << storage.status();
  Storage& s = **storage;
  ASSERT_TRUE(
      s.catalog()->SubmitJob(Queued("job_p", "org-a"), {}, JobLimits()).ok());
  auto claimed = s.catalog()->ClaimJob("r1", "c", absl::Seconds(30), 3);
  ASSERT_TRUE(claimed.ok() && claimed->has_value()) << claimed.status();
  v1::Job job = **claimed;
  job.set_state(v1::JOB_STATE_SUCCEEDED);
  // The second output's file is missing: nothing is published.
  auto failed = s.PublishResults(
      job, {{{WriteFile(s.NewTempPath("r"), "one")}, Weights("org-a", "r1")},
            {{s.NewTempPath("missing")}, Weights("org-a", "r2")}});
  EXPECT_FALSE(failed.ok());
  EXPECT_TRUE(s.ListArtifacts()->empty());
  EXPECT_EQ(s.catalog()->GetJob("job_p")->state(), v1::JOB_STATE_RUNNING);
  auto published = s.PublishResults(
      job, {{{WriteFile(s.NewTempPath("r"), "one")}, Weights("org-a", "r1")},
            {{WriteFile(s.NewTempPath("r"), "two")}, Weights("org-a", "r2")}});
  ASSERT_TRUE(published.ok()) << published.status();
  EXPECT_EQ(published->result_ids_size(), 2);
  EXPECT_EQ(s.catalog()->GetJob("job_p")->state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(s.ListArtifacts()->size(), 2u);
}

// The queue: one claim per job, a lease that another runner takes over
// once it expires (attempt 2), and every write of the first run fenced.
TEST_P(StorageTest, AnExpiredRunIsTakenOverAndTheOldRunCanChangeNothing) {
  auto storage = Open("lease");
  ASSERT_TRUE(storage.ok()) << storage.status();
  Storage& s = **storage;
  Catalog& catalog = *s.catalog();
  ASSERT_TRUE(
      catalog.SubmitJob(Queued("job_l", "org-a"), {}, JobLimits()).ok());
  auto first = catalog.ClaimJob("r1", "c", absl::Milliseconds(300), 3);
  ASSERT_TRUE(first.ok() && first->has_value()) << first.status();
  EXPECT_EQ((*first)->attempt(), 1);
  EXPECT_EQ((*first)->runner(), "r1");
  EXPECT_EQ((*first)->state(), v1::JOB_STATE_RUNNING);
  auto none = catalog.ClaimJob("r2", "c", absl::Milliseconds(300), 3);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value()) << "claimed twice";
  EXPECT_TRUE(catalog.RenewLease(**first, absl::Milliseconds(300)).ok());
  // Past the lease and its backoff (1 s after attempt 1).
  absl::SleepFor(absl::Milliseconds(1400));
  auto wrong_config = catalog.ClaimJob("r3", "other", absl::Seconds(30), 3);
  ASSERT_TRUE(wrong_config.ok());
  EXPECT_FALSE(wrong_config->has_value())
      << "a job runs under the numeric configuration of its first run";
  auto second = catalog.ClaimJob("r2", "c", absl::Seconds(30), 3);
  ASSERT_TRUE(second.ok() && second->has_value()) << second.status();
  EXPECT_EQ((*second)->attempt(), 2);
  EXPECT_EQ((*second)->runner(), "r2");

  v1::Job stale = **first;
  EXPECT_EQ(catalog.RenewLease(stale, absl::Seconds(30)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  stale.set_state(v1::JOB_STATE_FAILED);
  EXPECT_EQ(catalog.UpdateRun(stale).code(),
            absl::StatusCode::kFailedPrecondition);
  stale.set_state(v1::JOB_STATE_SUCCEEDED);
  auto published = s.PublishResults(
      stale, {{{WriteFile(s.NewTempPath("r"), "old")}, Weights("org-a", "o")}});
  EXPECT_EQ(published.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(s.ListArtifacts()->empty()) << "a fenced run published";
  EXPECT_EQ(catalog.GetJob("job_l")->attempt(), 2);
  EXPECT_EQ(catalog.GetJob("job_l")->state(), v1::JOB_STATE_RUNNING);
}

TEST_P(StorageTest, AJobWhoseRunnersKeepStoppingFailsAfterMaxAttempts) {
  auto storage = Open("attempts");
  ASSERT_TRUE(storage.ok()) << storage.status();
  Catalog& catalog = *(*storage)->catalog();
  ASSERT_TRUE(
      catalog.SubmitJob(Queued("job_a", "org-a"), {}, JobLimits()).ok());
  auto first = catalog.ClaimJob("r1", "c", absl::Milliseconds(300), 1);
  ASSERT_TRUE(first.ok() && first->has_value());
  absl::SleepFor(absl::Milliseconds(1400));
  auto again = catalog.ClaimJob("r2", "c", absl::Milliseconds(300), 1);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->has_value());
  auto job = catalog.GetJob("job_a");
  EXPECT_EQ(job->state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(job->error_code(), static_cast<int>(absl::StatusCode::kAborted));
  EXPECT_THAT(job->error_message(), HasSubstr("--max-attempts"));
}

// A job's tasks: claimed once at a time, their writes fenced by the claim,
// a run that stops counted (a release not), the blob of a done task spared by
// the collection of unreferenced blobs, and the rows gone with the job.
TEST_P(StorageTest, TasksAreClaimedFencedCountedAndDroppedWithTheirJob) {
  auto storage = Open("tasks");
  ASSERT_TRUE(storage.ok()) << storage.status();
  Storage& s = **storage;
  Catalog& catalog = *s.catalog();
  ASSERT_TRUE(
      catalog.SubmitJob(Queued("job_t", "org-a"), {}, JobLimits()).ok());
  v1::Job stale_run;
  stale_run.set_id("job_t");
  stale_run.set_attempt(7);
  EXPECT_EQ(catalog.AddTasks(stale_run, 2, "2").code(),
            absl::StatusCode::kFailedPrecondition)
      << "tasks are added by the job's run";
  auto run = catalog.ClaimJob("coordinator", "c", absl::Seconds(30), 3);
  ASSERT_TRUE(run.ok() && run->has_value()) << run.status();
  ASSERT_TRUE(catalog.AddTasks(**run, 2, "2").ok());
  ASSERT_TRUE(catalog.AddTasks(**run, 2, "2").ok()) << "added once";
  v1::Job job;
  auto none = catalog.ClaimTask("w1", "other", "", absl::Seconds(30), 2, &job);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value()) << "another numeric configuration";
  auto t0 = catalog.ClaimTask("w1", "c", "", absl::Milliseconds(200), 2, &job);
  ASSERT_TRUE(t0.ok() && t0->has_value()) << t0.status();
  EXPECT_EQ(job.id(), "job_t");
  EXPECT_EQ((*t0)->task, 0);
  EXPECT_EQ((*t0)->attempt, 1);
  auto t1 = catalog.ClaimTask("w2", "c", "job_t", absl::Seconds(30), 2, &job);
  ASSERT_TRUE(t1.ok() && t1->has_value()) << t1.status();
  EXPECT_EQ((*t1)->task, 1);
  auto busy = catalog.ClaimTask("w3", "c", "", absl::Seconds(30), 2, &job);
  ASSERT_TRUE(busy.ok());
  EXPECT_FALSE(busy->has_value()) << "both held";

  // Task 1 is given back (not a stop) and claimed again.
  ASSERT_TRUE(catalog.ReleaseTask(**t1).ok());
  auto t1b = catalog.ClaimTask("w3", "c", "", absl::Seconds(30), 2, &job);
  ASSERT_TRUE(t1b.ok() && t1b->has_value()) << t1b.status();
  EXPECT_EQ((*t1b)->task, 1);
  EXPECT_EQ((*t1b)->attempt, 2);
  EXPECT_EQ(catalog.UpdateTask(**t1).code(),
            absl::StatusCode::kFailedPrecondition)
      << "the released run changes nothing";

  // Task 0's runner stops renewing: its lease runs out, the next claim is a
  // second stop... of at most 2.
  absl::SleepFor(absl::Milliseconds(400));
  auto t0b = catalog.ClaimTask("w4", "c", "", absl::Milliseconds(200), 2, &job);
  ASSERT_TRUE(t0b.ok() && t0b->has_value()) << t0b.status();
  EXPECT_EQ((*t0b)->task, 0);
  JobTask late = **t0;
  late.sha256 = std::string(64, 'a');
  late.size_bytes = 3;
  EXPECT_EQ(s.CompleteTask(late, WriteFile(s.NewTempPath("s"), "old")).code(),
            absl::StatusCode::kFailedPrecondition)
      << "a run past its lease completes nothing";
  EXPECT_EQ(catalog.RenewTask(**t0, absl::Seconds(30)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  absl::SleepFor(absl::Milliseconds(400));
  auto exhausted = catalog.ClaimTask("w5", "c", "", absl::Seconds(30), 2, &job);
  ASSERT_TRUE(exhausted.ok());
  EXPECT_FALSE(exhausted->has_value()) << "task 0's runners stopped twice";
  auto listed = catalog.ListTasks("job_t");
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), 2u);
  EXPECT_EQ((*listed)[0].stops, 1);
  EXPECT_EQ((*listed)[0].runner, "w4");
  EXPECT_EQ((*listed)[1].stops, 0) << "a release is not a stop";

  // Task 1 is done: its blob is spared by the collection, and by the delete
  // of an artifact with the same content.
  JobTask done = **t1b;
  done.tensors_done = 2;
  done.bytes_done = 8;
  const std::string shard = WriteFile(s.NewTempPath("s"), "shard");
  ASSERT_TRUE(s.CompleteTask(done, shard).ok());
  EXPECT_FALSE(std::filesystem::exists(shard)) << "moved into the blob store";
  listed = catalog.ListTasks("job_t");
  ASSERT_TRUE(listed.ok() && listed->size() == 2u);
  const JobTask& written = (*listed)[1];
  EXPECT_TRUE(written.done);
  EXPECT_EQ(written.size_bytes, 5);
  EXPECT_EQ(written.bytes_done, 8);
  auto same = s.AddArtifact({WriteFile(s.NewTempPath("t"), "shard")},
                            Weights("org-a", written.sha256));
  ASSERT_TRUE(same.ok()) << same.status();
  ASSERT_TRUE(s.DeleteArtifact(*same).ok());
  auto collected = s.CollectGarbage(std::chrono::seconds(-1));
  ASSERT_TRUE(collected.ok()) << collected.status();
  EXPECT_EQ(*collected, 0);
  EXPECT_TRUE(s.LinkBlob(written.sha256, dir_ + "/linked").ok())
      << "the done task's blob is kept";

  // Another plan of the job's shards replaces the tasks; the job's end
  // drops them, and their blobs are collected.
  ASSERT_TRUE(catalog.AddTasks(**run, 3, "3").ok());
  listed = catalog.ListTasks("job_t");
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->size(), 3u);
  EXPECT_FALSE((*listed)[1].done);
  v1::Job failed = **run;
  failed.set_state(v1::JOB_STATE_FAILED);
  ASSERT_TRUE(catalog.UpdateRun(failed).ok());
  EXPECT_TRUE(catalog.ListTasks("job_t")->empty());
  collected = s.CollectGarbage(std::chrono::seconds(-1));
  ASSERT_TRUE(collected.ok()) << collected.status();
  EXPECT_EQ(*collected, 1);
}

// A failed task stops its job's other tasks: none is claimed, and a renewal
// says stop.
TEST_P(StorageTest, AFailedTaskStopsItsSiblings) {
  auto storage = Open("failed-task");
  ASSERT_TRUE(storage.ok()) << storage.status();
  Catalog& catalog = *(*storage)->catalog();
  ASSERT_TRUE(
      catalog.SubmitJob(Queued("job_f", "org-a"), {}, JobLimits()).ok());
  auto run = catalog.ClaimJob("coordinator", "c", absl::Seconds(30), 3);
  ASSERT_TRUE(run.ok() && run->has_value()) << run.status();
  ASSERT_TRUE(catalog.AddTasks(**run, 3, "3").ok());
  v1::Job job;
  auto t0 = catalog.ClaimTask("w1", "c", "", absl::Seconds(30), 3, &job);
  auto t1 = catalog.ClaimTask("w2", "c", "", absl::Seconds(30), 3, &job);
  ASSERT_TRUE(t0.ok() && t0->has_value() && t1.ok() && t1->has_value());
  auto renewed = catalog.RenewTask(**t1, absl::Seconds(30));
  ASSERT_TRUE(renewed.ok()) << renewed.status();
  EXPECT_FALSE(*renewed);
  JobTask failure = **t0;
  failure.error_code = static_cast<int>(absl::StatusCode::kFailedPrecondition);
  failure.error_message = "singular";
  ASSERT_TRUE(catalog.UpdateTask(failure).ok());
  auto stop = catalog.RenewTask(**t1, absl::Seconds(30));
  ASSERT_TRUE(stop.ok()) << stop.status();
  EXPECT_TRUE(*stop);
  auto none = catalog.ClaimTask("w3", "c", "", absl::Seconds(30), 3, &job);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value()) << "task 2 of a failed job";
  auto listed = catalog.ListTasks("job_f");
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ((*listed)[0].error_message, "singular");
}

TEST_P(StorageTest, LimitsCancelsAndDeletesAreDecidedInTheCatalog) {
  auto storage = Open("limits");
  ASSERT_TRUE(storage.ok()) << storage.status();
  Storage& s = **storage;
  Catalog& catalog = *s.catalog();
  auto input = s.AddArtifact({WriteFile(s.NewTempPath("t"), "bytes")},
                             Weights("org-a", "in"));
  ASSERT_TRUE(input.ok()) << input.status();
  JobLimits limits;
  limits.max_queued = 3;
  limits.max_active_per_org = 2;
  ASSERT_TRUE(
      catalog.SubmitJob(Queued("j1", "org-a"), {input->id()}, limits).ok());
  ASSERT_TRUE(catalog.SubmitJob(Queued("j2", "org-a"), {}, limits).ok());
  absl::Status third = catalog.SubmitJob(Queued("j3", "org-a"), {}, limits);
  EXPECT_EQ(third.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(third.message(), HasSubstr("org-a has 2"));
  ASSERT_TRUE(catalog.SubmitJob(Queued("j4", "org-b"), {}, limits).ok());
  absl::Status full = catalog.SubmitJob(Queued("j5", "org-c"), {}, limits);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.message(), HasSubstr("queue is full"));
  EXPECT_EQ(*catalog.JobCounts(), std::make_pair(int64_t{3}, int64_t{0}));
  EXPECT_EQ(catalog.SubmitJob(Queued("j6", "org-a"), {"art_gone"}, JobLimits())
                .code(),
            absl::StatusCode::kNotFound);

  // j1 reads the input: it cannot be deleted until j1 ends.
  absl::Status refused = s.DeleteArtifact(*input);
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.message(), HasSubstr("j1"));
  EXPECT_TRUE(std::filesystem::exists(s.BlobPath(input->sha256())));
  auto cancelled = catalog.CancelJob("j1", "org-a");
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  EXPECT_EQ(cancelled->state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(catalog.CancelJob("j2", "org-b").status().code(),
            absl::StatusCode::kNotFound)
      << "another organisation's job";
  EXPECT_TRUE(s.DeleteArtifact(*input).ok());
  EXPECT_FALSE(std::filesystem::exists(s.BlobPath(input->sha256())));

  // A running job's cancel reaches its runner at its next renewal.
  auto run = catalog.ClaimJob("r1", "c", absl::Seconds(30), 3);
  ASSERT_TRUE(run.ok() && run->has_value());
  EXPECT_EQ((*run)->id(), "j2");
  EXPECT_FALSE(*catalog.RenewLease(**run, absl::Seconds(30)));
  ASSERT_TRUE(catalog.CancelJob("j2", "org-a").ok());
  EXPECT_TRUE(*catalog.RenewLease(**run, absl::Seconds(30)));
}

// Several processes may open one PostgreSQL catalog; an unreachable server
// is UNAVAILABLE; an unknown catalog kind INVALID_ARGUMENT.
TEST_P(StorageTest, UnreferencedBlobsAreCollectedAndReferencedOnesKept) {
  auto storage = Open("collect");
  ASSERT_TRUE(storage.ok()) << storage.status();
  Storage& s = **storage;
  auto kept = s.AddArtifact({WriteFile(s.NewTempPath("t"), "bytes")},
                            Weights("org-a", "aaaa"));
  ASSERT_TRUE(kept.ok()) << kept.status();
  // What a crash between a blob's placement and its row's commit leaves.
  const std::string stray = dir_ + "/blobs/bbbb";
  WriteFile(stray, "stray");
  // Young blobs are left for a later pass.
  auto none = s.CollectGarbage(std::chrono::hours(1));
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(*none, 0);
  EXPECT_TRUE(std::filesystem::exists(stray));
  auto removed = s.CollectGarbage(std::chrono::seconds(-1));
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(*removed, 1);
  EXPECT_FALSE(std::filesystem::exists(stray));
  std::ifstream blob(s.BlobPath(kept->sha256()), std::ios::binary);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(blob), {}), "bytes")
      << "the referenced blob is intact";
}

TEST_P(StorageTest, ABlobIsNotCollectedWhileTheRowReferencingItCommits) {
  auto storage = Open("content-lock");
  ASSERT_TRUE(storage.ok()) << storage.status();
  // Another process on the same catalog (a replica).
  auto other = OpenCatalog(CatalogUri(), dir_);
  ASSERT_TRUE(other.ok()) << other.status();
  Catalog& catalog = *(*storage)->catalog();
  const std::string blob = dir_ + "/blobs/cccc";
  absl::Notification placed;
  v1::Artifact artifact = Weights("org-a", "cccc");
  std::thread insert([&] {
    EXPECT_TRUE(catalog
                    .InsertArtifact(&artifact,
                                    [&](const v1::Artifact&) {
                                      WriteFile(blob, "bytes");
                                      placed.Notify();
                                      // The row commits well after.
                                      absl::SleepFor(absl::Milliseconds(300));
                                      return absl::OkStatus();
                                    })
                    .ok());
  });
  placed.WaitForNotification();
  // The blob is on disk and no committed row names it yet: without the
  // content lock the collector would remove it.
  bool ran = false;
  auto removed = (*other)->RemoveUnreferencedContent("cccc", [&] {
    ran = true;
    std::filesystem::remove(blob);
    return absl::OkStatus();
  });
  insert.join();
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_FALSE(*removed);
  EXPECT_FALSE(ran);
  EXPECT_TRUE(std::filesystem::exists(blob));
  EXPECT_TRUE(catalog.GetArtifact(artifact.id()).ok());
}

TEST_P(StorageTest, OneProcessAtATimeHoldsTheHousekeepingLease) {
  auto storage = Open("housekeeping");
  ASSERT_TRUE(storage.ok()) << storage.status();
  auto other = OpenCatalog(CatalogUri(), dir_);
  ASSERT_TRUE(other.ok()) << other.status();
  Catalog& mine = *(*storage)->catalog();
  const absl::Duration lease = absl::Milliseconds(400);
  EXPECT_TRUE(*mine.TryHousekeeping("replica-1", lease));
  EXPECT_FALSE(*(*other)->TryHousekeeping("replica-2", lease));
  EXPECT_TRUE(*mine.TryHousekeeping("replica-1", lease)) << "renewed";
  absl::SleepFor(lease + absl::Milliseconds(100));
  EXPECT_TRUE(*(*other)->TryHousekeeping("replica-2", lease))
      << "an expired lease is taken over";
  EXPECT_FALSE(*mine.TryHousekeeping("replica-1", lease));
}

TEST_P(StorageTest, OtherProcessesHearOfEveryJobChange) {
  if (GetParam() != "postgres") GTEST_SKIP() << "PostgreSQL only";
  auto storage = Open("notify");
  ASSERT_TRUE(storage.ok()) << storage.status();
  auto changes = ListenForJobChanges(CatalogUri());
  ASSERT_TRUE(changes.ok()) << changes.status();
  // Collects what is heard within `wait`.
  auto heard = [&](absl::Duration wait) {
    std::vector<std::string> ids;
    const absl::Time until = absl::Now() + wait;
    while (absl::Now() < until) {
      auto some = (*changes)->Wait(until - absl::Now());
      EXPECT_TRUE(some.ok()) << some.status();
      if (some.ok()) ids.insert(ids.end(), some->begin(), some->end());
    }
    return ids;
  };
  EXPECT_TRUE(heard(absl::Milliseconds(200)).empty()) << "nothing changed";
  Catalog& catalog = *(*storage)->catalog();
  ASSERT_TRUE(
      catalog.SubmitJob(Queued("job_heard", "org-a"), {}, JobLimits()).ok());
  EXPECT_THAT(heard(absl::Milliseconds(500)), ::testing::Contains("job_heard"));
  auto claimed = catalog.ClaimJob("replica-1", "", absl::Seconds(30), 3);
  ASSERT_TRUE(claimed.ok() && claimed->has_value());
  v1::Job progress = **claimed;
  progress.mutable_progress()->set_tensors_done(1);
  ASSERT_TRUE(catalog.UpdateRun(progress).ok());
  EXPECT_THAT(heard(absl::Milliseconds(500)), ::testing::Contains("job_heard"))
      << "the claim and the progress";
  // A write that the fence refuses changes nothing and tells nothing.
  v1::Job stale = progress;
  stale.set_attempt(progress.attempt() + 5);
  EXPECT_FALSE(catalog.UpdateRun(stale).ok());
  EXPECT_TRUE(heard(absl::Milliseconds(300)).empty());
}

TEST_P(StorageTest, APostgresCatalogServesManyProcessesAndNamesWhatFails) {
  if (GetParam() != "postgres") GTEST_SKIP() << "PostgreSQL only";
  const std::string dir = FreshDir("single");
  const std::string uri = testing::PostgresDatabaseFor(dir);
  auto first = Storage::Open(dir, uri);
  ASSERT_TRUE(first.ok()) << first.status();
  // A second process on the same catalog: a replica.
  auto second = Storage::Open(dir + "-2", uri);
  EXPECT_TRUE(second.ok()) << second.status();

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
