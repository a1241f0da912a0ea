// The job manager on a real storage and catalog (SQLite in a temporary
// directory), without a server process or gRPC: jobs run to their results,
// watchers see states in order, cancels and deletes act as promised.
#include "server/job_manager.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace amalgam::server {
namespace {

using ::testing::HasSubstr;

class JobManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TMPDIR");
    dir_ = std::string(tmp != nullptr ? tmp : "/tmp") +
           "/amalgam-job-manager-test-" + std::to_string(::getpid());
    std::filesystem::remove_all(dir_);
    auto storage = Storage::Open(dir_);
    ASSERT_TRUE(storage.ok()) << storage.status();
    storage_ = *std::move(storage);
  }

  void TearDown() override {
    jobs_.reset();
    storage_.reset();
    std::filesystem::remove_all(dir_);
  }

  void StartJobs(absl::Duration step_delay = absl::ZeroDuration(),
                 int workers = 1) {
    JobManagerOptions options;
    options.testing_step_delay = step_delay;
    options.workers = workers;
    options.poll_interval = absl::Milliseconds(20);
    jobs_ = std::make_unique<JobManager>(storage_.get(), options);
    ASSERT_TRUE(jobs_->Recover().ok());
  }

  // A weights artifact of org-a: tensors "t0".."t3" of 8 elements, all
  // `value` (plus the tensor's index, with `ramp`).
  v1::Artifact Weights(float value, bool ramp = false) {
    const std::string path = storage_->NewTempPath("w");
    std::vector<core::TensorSpec> specs;
    for (int t = 0; t < 4; ++t) {
      specs.push_back({"t" + std::to_string(t), core::DType::kF32, {8}});
    }
    auto writer = core::SafetensorsWriter::Create(path, specs, {});
    EXPECT_TRUE(writer.ok()) << writer.status();
    for (int t = 0; t < 4; ++t) {
      const std::vector<float> values(8, ramp ? value + t : value);
      EXPECT_TRUE((*writer)
                      ->Append(absl::Span<const uint8_t>(
                          reinterpret_cast<const uint8_t*>(values.data()),
                          values.size() * sizeof(float)))
                      .ok());
    }
    EXPECT_TRUE((*writer)->Finish().ok());
    v1::Artifact artifact;
    artifact.set_kind(v1::ARTIFACT_KIND_WEIGHTS);
    artifact.set_owner("org-a");
    artifact.set_name("w");
    artifact.set_sha256(*core::Sha256File(path));
    artifact.set_size_bytes(
        static_cast<int64_t>(std::filesystem::file_size(path)));
    auto added = storage_->AddArtifact({path}, artifact);
    EXPECT_TRUE(added.ok()) << added.status();
    return added.ok() ? *added : artifact;
  }

  static v1::SubmitJobRequest Average(const v1::Artifact& a,
                                      const v1::Artifact& b) {
    v1::SubmitJobRequest request;
    request.mutable_merge()->set_method(v1::MERGE_METHOD_AVERAGE);
    request.mutable_merge()->add_models()->set_weights_id(a.id());
    request.mutable_merge()->add_models()->set_weights_id(b.id());
    return request;
  }

  // The job's state once it is final (or after 30 s).
  v1::Job AwaitFinal(const std::string& id) {
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    absl::StatusOr<v1::Job> job;
    do {
      job = jobs_->Get(id, "org-a");
      if (job.ok() && IsFinal(job->state())) return *job;
      absl::SleepFor(absl::Milliseconds(10));
    } while (absl::Now() < deadline);
    return job.ok() ? *job : v1::Job();
  }

  std::string dir_;
  std::unique_ptr<Storage> storage_;
  std::unique_ptr<JobManager> jobs_;
};

TEST_F(JobManagerTest, AJobRunsToItsResultAndWatchersSeeEveryStateInOrder) {
  StartJobs(absl::Milliseconds(20));
  const v1::Artifact a = Weights(1.0f), b = Weights(4.0f);
  auto job = jobs_->Submit(Average(a, b), "org-a");
  ASSERT_TRUE(job.ok()) << job.status();
  absl::Mutex mu;
  std::vector<v1::Job> seen;
  auto token = jobs_->Watch(job->id(), "org-a", [&](const v1::Job& j) {
    absl::MutexLock lock(&mu);
    seen.push_back(j);
  });
  ASSERT_TRUE(token.ok()) << token.status();
  const v1::Job done = AwaitFinal(job->id());
  ASSERT_EQ(done.state(), v1::JOB_STATE_SUCCEEDED) << done.error_message();
  EXPECT_EQ(done.attempt(), 1);
  // The catalog says SUCCEEDED first; the watcher hears of it right after.
  auto heard_final = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return !seen.empty() && IsFinal(seen.back().state());
  };
  {
    absl::MutexLock lock(&mu);
    mu.AwaitWithTimeout(absl::Condition(&heard_final), absl::Seconds(10));
  }
  jobs_->Unwatch(job->id(), *token);
  absl::MutexLock lock(&mu);
  ASSERT_FALSE(seen.empty());
  for (size_t i = 1; i < seen.size(); ++i) {
    EXPECT_LE(seen[i - 1].state(), seen[i].state());
    EXPECT_LE(seen[i - 1].progress().tensors_done(),
              seen[i].progress().tensors_done());
  }
  EXPECT_EQ(seen.back().state(), v1::JOB_STATE_SUCCEEDED);
  ASSERT_EQ(done.result_ids_size(), 1);
  auto result = storage_->GetArtifact(done.result_ids(0));
  ASSERT_TRUE(result.ok()) << result.status();
  auto reader = storage_->OpenBlob(*result);
  ASSERT_TRUE(reader.ok()) << reader.status();
  for (const core::TensorInfo& t : (*reader)->tensors()) {
    auto bytes = (*reader)->Data(t);
    const float* values = reinterpret_cast<const float*>(bytes.data());
    for (size_t k = 0; k < bytes.size() / sizeof(float); ++k) {
      EXPECT_EQ(values[k], 2.5f) << t.name;  // (1 + 4) / 2, exact
    }
  }
}

TEST_F(JobManagerTest, ACancelledRunningJobEndsCancelledWithNoResult) {
  StartJobs(absl::Milliseconds(200));
  auto job = jobs_->Submit(Average(Weights(1), Weights(2)), "org-a");
  ASSERT_TRUE(job.ok()) << job.status();
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (jobs_->Get(job->id(), "org-a")->state() != v1::JOB_STATE_RUNNING &&
         absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_TRUE(jobs_->Cancel(job->id(), "org-a").ok());
  const v1::Job done = AwaitFinal(job->id());
  EXPECT_EQ(done.state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(done.result_ids_size(), 0);
  EXPECT_EQ(jobs_->Get(job->id(), "org-b").status().code(),
            absl::StatusCode::kNotFound)
      << "another organisation's job";
}

TEST_F(JobManagerTest, AnInputOfAQueuedJobCannotBeDeletedUntilItEnds) {
  StartJobs(absl::Milliseconds(100));
  const v1::Artifact a = Weights(1), b = Weights(2);
  auto job = jobs_->Submit(Average(a, b), "org-a");
  ASSERT_TRUE(job.ok()) << job.status();
  absl::Status refused = jobs_->DeleteIfUnused(b);
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.message(), HasSubstr(job->id()));
  EXPECT_EQ(AwaitFinal(job->id()).state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_TRUE(jobs_->DeleteIfUnused(b).ok());
  EXPECT_EQ(storage_->GetArtifact(b.id()).status().code(),
            absl::StatusCode::kNotFound);
}

// A job left running by a process that stopped (here: its row, as a killed
// process leaves it) is run again by the next one, as attempt 2.
TEST_F(JobManagerTest, AJobLeftRunningIsRunAgainAfterARestart) {
  const v1::Artifact a = Weights(1), b = Weights(3);
  v1::Job job;
  job.set_id("job_left");
  job.set_owner("org-a");
  job.set_state(v1::JOB_STATE_QUEUED);
  *job.mutable_merge() = Average(a, b).merge();
  ASSERT_TRUE(
      storage_->catalog()->SubmitJob(job, {a.id(), b.id()}, JobLimits()).ok());
  auto claimed =
      storage_->catalog()->ClaimJob("gone", "", absl::Seconds(30), 3);
  ASSERT_TRUE(claimed.ok() && claimed->has_value());
  StartJobs();
  const v1::Job done = AwaitFinal("job_left");
  EXPECT_EQ(done.state(), v1::JOB_STATE_SUCCEEDED) << done.error_message();
  EXPECT_EQ(done.attempt(), 2);
}

// A job's shards (two tensors each here) run on every idle worker of the
// process at once, and make the files one worker makes, bit for bit.
TEST_F(JobManagerTest, AJobsShardsRunOnIdleWorkersAtOnceAndMakeTheSameModel) {
  const absl::Duration delay = absl::Seconds(2);  // after each tensor
  StartJobs(delay, /*workers=*/2);
  const v1::Artifact a = Weights(1, true), b = Weights(2, true);
  v1::SubmitJobRequest request = Average(a, b);
  request.mutable_merge()->mutable_output()->set_shard_size_bytes(64);
  auto job = jobs_->Submit(request, "org-a");
  ASSERT_TRUE(job.ok()) << job.status();
  ASSERT_EQ(job->progress().tensors_total(), 4);
  // One worker would report a tensor, then wait `delay` before the next.
  absl::Time running = absl::InfinitePast();
  int64_t done = 0;
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (done < 2 && absl::Now() < deadline) {
    const absl::StatusOr<v1::Job> now = jobs_->Get(job->id(), "org-a");
    ASSERT_TRUE(now.ok()) << now.status();
    if (now->state() == v1::JOB_STATE_RUNNING &&
        running == absl::InfinitePast()) {
      running = absl::Now();
    }
    done = now->progress().tensors_done();
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(done, 2);
  EXPECT_LT(absl::Now() - running, delay / 2)
      << "the second shard began only after the first";
  const v1::Job parallel = AwaitFinal(job->id());
  ASSERT_EQ(parallel.state(), v1::JOB_STATE_SUCCEEDED)
      << parallel.error_message();
  EXPECT_EQ(parallel.progress().tensors_done(), 4);
  EXPECT_EQ(parallel.progress().bytes_done(), 4 * 32);

  jobs_.reset();
  StartJobs();
  auto again = jobs_->Submit(request, "org-a");
  ASSERT_TRUE(again.ok()) << again.status();
  const v1::Job serial = AwaitFinal(again->id());
  ASSERT_EQ(serial.state(), v1::JOB_STATE_SUCCEEDED) << serial.error_message();
  auto files = [&](const v1::Job& j) {
    std::vector<std::pair<std::string, std::string>> out;
    auto result = storage_->GetArtifact(j.result_ids(0));
    EXPECT_TRUE(result.ok()) << result.status();
    if (result.ok()) {
      for (const v1::ModelFile& f : result->files()) {
        out.emplace_back(f.name(), f.sha256());
      }
    }
    return out;
  };
  const auto want = files(serial);
  // 2 shards of 2 tensors, the index, config.json (torch_dtype).
  EXPECT_GE(want.size(), 3u);
  EXPECT_EQ(files(parallel), want);
}

}  // namespace
}  // namespace amalgam::server
