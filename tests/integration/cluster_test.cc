// Several amalgamd replicas on one PostgreSQL catalog and one data directory,
// as a cluster runs them: real processes, real gRPC, a real PostgreSQL (the
// throwaway one of scripts/test.sh, AMALGAM_TEST_POSTGRES).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/cpp/client.h"
#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/server_process.h"
#include "tests/postgres_database.h"

namespace amalgam::testing {
namespace {

using ::testing::HasSubstr;
namespace v1 = amalgam::v1;

constexpr int64_t kIn = 48, kOut = 6;

// F32 tensors, by name: shape and values.
using Tensors =
    std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>;

void Write(const std::string& path, const Tensors& tensors) {
  std::vector<core::TensorSpec> specs;
  for (const auto& [name, t] : tensors) {
    specs.push_back({name, core::DType::kF32, t.first});
  }
  auto writer =
      core::SafetensorsWriter::Create(path, specs, {{"num_examples", "64"}});
  ASSERT_TRUE(writer.ok()) << writer.status();
  for (const auto& [name, t] : tensors) {
    ASSERT_TRUE((*writer)
                    ->Append(absl::Span<const uint8_t>(
                        reinterpret_cast<const uint8_t*>(t.second.data()),
                        t.second.size() * sizeof(float)))
                    .ok());
  }
  ASSERT_TRUE((*writer)->Finish().ok());
}

class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    AMALGAM_SKIP_WITHOUT_POSTGRES();
    dir_ = MakeTempDir("cluster");
    data_ = dir_ + "/data";
    catalog_ = PostgresDatabaseFor(data_);
    ASSERT_FALSE(catalog_.empty());
  }

  // Replica `i` of the cluster: the shared data directory and catalog.
  ServerProcess* Replica(int i, std::vector<std::string> args = {}) {
    args.insert(args.end(), {"--catalog", catalog_});
    replicas_[i] = std::make_unique<ServerProcess>(AMALGAMD_PATH, data_, args,
                                                   absl::StrCat("replica-", i));
    EXPECT_TRUE(replicas_[i]->Start()) << replicas_[i]->log_path();
    clients_[i] = Connect(*replicas_[i]);
    return replicas_[i].get();
  }

  static std::unique_ptr<client::Client> Connect(const ServerProcess& server) {
    client::ClientOptions options;
    options.address = server.address();
    auto client = client::Client::Create(options);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? *std::move(client) : nullptr;
  }

  // Three models of `layers` layers (weights and Grams) written to files,
  // uploaded through `client`; the RegMean merge of them.
  v1::SubmitJobRequest UploadRegMean(client::Client* client, int layers = 8) {
    std::mt19937 rng(7);
    std::normal_distribution<float> normal;
    v1::SubmitJobRequest request;
    request.mutable_merge()->set_method(v1::MERGE_METHOD_REGMEAN);
    for (int m = 0; m < 3; ++m) {
      Tensors weights;
      for (int l = 0; l < layers; ++l) {
        std::vector<float> w(kOut * kIn), b(kOut);
        for (float& x : w) x = normal(rng);
        for (float& x : b) x = normal(rng);
        weights[absl::StrCat("l", l, ".weight")] = {{kOut, kIn}, w};
        weights[absl::StrCat("l", l, ".bias")] = {{kOut}, b};
      }
      Tensors grams;
      for (int l = 0; l < layers; ++l) {
        std::vector<double> x(64 * kIn);
        for (double& v : x) v = std::round(normal(rng) * 4);
        std::vector<float> g(kIn * kIn);
        for (int i = 0; i < kIn; ++i) {
          for (int j = 0; j < kIn; ++j) {
            double sum = 0;
            for (int r = 0; r < 64; ++r) sum += x[r * kIn + i] * x[r * kIn + j];
            g[i * kIn + j] = static_cast<float>(sum);
          }
        }
        grams[absl::StrCat("l", l, ".weight")] = {{kIn, kIn}, g};
      }
      const std::string w_path = absl::StrCat(dir_, "/w", m);
      const std::string g_path = absl::StrCat(dir_, "/g", m);
      Write(w_path, weights);
      Write(g_path, grams);
      auto w = client->Upload(v1::ARTIFACT_KIND_WEIGHTS, w_path,
                              absl::StrCat("w", m), "");
      EXPECT_TRUE(w.ok()) << w.status();
      if (!w.ok()) return request;
      auto g = client->Upload(v1::ARTIFACT_KIND_GRAM, g_path,
                              absl::StrCat("g", m), w->id());
      EXPECT_TRUE(g.ok()) << g.status();
      if (!g.ok()) return request;
      v1::MergeModel* model = request.mutable_merge()->add_models();
      model->set_weights_id(w->id());
      model->set_gram_id(g->id());
    }
    return request;
  }

  // Waits until `id` runs with at least `tensors` done; returns it.
  static v1::Job AwaitProgress(client::Client* client, const std::string& id,
                               int64_t tensors) {
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    v1::Job job;
    while (absl::Now() < deadline) {
      auto got = client->GetJob(id);
      if (got.ok()) job = *got;
      if (job.state() == v1::JOB_STATE_RUNNING &&
          job.progress().tensors_done() >= tensors) {
        break;
      }
      absl::SleepFor(absl::Milliseconds(50));
    }
    return job;
  }

  // Waits until job `id` runs with `tensors` done, kills (kill -9) the
  // replica running it and follows the job through another (`*watcher`)
  // until it ends; it must be taken over (attempt 2, another runner).
  v1::Job KillRunnerAndAwait(const std::string& id, int64_t tensors,
                             int* watcher) {
    const v1::Job running = AwaitProgress(clients_[1].get(), id, tensors);
    EXPECT_EQ(running.state(), v1::JOB_STATE_RUNNING);
    const int runner = RunnerIndex(running);
    EXPECT_GE(runner, 0) << running.runner();
    if (runner < 0) return running;
    replicas_[runner]->Kill();
    *watcher = (runner + 1) % 3;
    auto done = clients_[*watcher]->WatchJob(id);
    EXPECT_TRUE(done.ok()) << done.status();
    if (!done.ok()) return running;
    EXPECT_EQ(done->attempt(), 2);
    EXPECT_NE(RunnerIndex(*done), runner);
    return *done;
  }

  // The replica index named by a job's runner.
  static int RunnerIndex(const v1::Job& job) {
    return job.runner().empty() ? -1 : job.runner().back() - '0';
  }

  std::string dir_, data_, catalog_;
  std::unique_ptr<ServerProcess> replicas_[3];
  std::unique_ptr<client::Client> clients_[3];
};

TEST_F(ClusterTest, AnyReplicaServesWhatAnotherStoredAndRan) {
  for (int i = 0; i < 3; ++i) Replica(i);
  v1::SubmitJobRequest request = UploadRegMean(clients_[0].get());
  ASSERT_EQ(request.merge().models_size(), 3);
  auto listed = clients_[1]->ListArtifacts();
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->artifacts_size(), 6) << "uploads through replica 0";

  auto job = clients_[1]->SubmitJob(request);
  ASSERT_TRUE(job.ok()) << job.status();
  std::vector<v1::JobEvent> events;
  auto done = clients_[2]->WatchJob(
      job->id(), [&](const v1::JobEvent& e) { events.push_back(e); });
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_EQ(done->state(), v1::JOB_STATE_SUCCEEDED) << done->error_message();
  EXPECT_EQ(done->attempt(), 1);
  EXPECT_THAT(done->runner(), HasSubstr("replica-"));
  ASSERT_EQ(done->result_ids_size(), 1);
  for (int i = 0; i < 3; ++i) {
    const std::string out = absl::StrCat(dir_, "/result", i);
    auto downloaded = clients_[i]->Download(done->result_ids(0), out);
    EXPECT_TRUE(downloaded.ok())
        << "replica " << i << ": " << downloaded.status();
  }
}

// The replica running a RegMean merge is killed (kill -9) half-way: another
// takes the job over once the lease expires, and the result is bit for bit
// the one a single node computes.
TEST_F(ClusterTest, AKilledRunnerIsReplacedAndTheResultIsTheSameBits) {
  const std::vector<std::string> args = {"--testing-step-delay", "150ms",
                                         "--job-lease", "1s"};
  for (int i = 0; i < 3; ++i) Replica(i, args);
  v1::SubmitJobRequest request = UploadRegMean(clients_[0].get());
  ASSERT_EQ(request.merge().models_size(), 3);
  auto job = clients_[1]->SubmitJob(request);
  ASSERT_TRUE(job.ok()) << job.status();
  int watcher = -1;
  const v1::Job done = KillRunnerAndAwait(job->id(), 4, &watcher);
  ASSERT_EQ(done.state(), v1::JOB_STATE_SUCCEEDED) << done.error_message();
  auto cluster_result = clients_[watcher]->GetArtifact(done.result_ids(0));
  ASSERT_TRUE(cluster_result.ok()) << cluster_result.status();

  // The same job on one node with the embedded catalog.
  ServerProcess single(AMALGAMD_PATH, dir_ + "/single");
  ASSERT_TRUE(single.Start());
  auto client = Connect(single);
  v1::SubmitJobRequest again = UploadRegMean(client.get());
  auto single_job = client->SubmitJob(again);
  ASSERT_TRUE(single_job.ok()) << single_job.status();
  auto single_done = client->WatchJob(single_job->id());
  ASSERT_TRUE(single_done.ok() &&
              single_done->state() == v1::JOB_STATE_SUCCEEDED);
  auto single_result = client->GetArtifact(single_done->result_ids(0));
  ASSERT_TRUE(single_result.ok());
  EXPECT_EQ(cluster_result->sha256(), single_result->sha256());
  EXPECT_EQ(cluster_result->metadata().at("amalgam.blas_core"),
            single_result->metadata().at("amalgam.blas_core"));
}

// Every file of a directory, by name, as bytes.
std::map<std::string, std::string> Files(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    std::ifstream in(entry.path(), std::ios::binary);
    files[entry.path().filename().string()] =
        std::string(std::istreambuf_iterator<char>(in), {});
  }
  return files;
}

// The replicas (by index) whose log says they wrote a shard of job `id`.
std::vector<int> ShardWriters(
    const std::unique_ptr<ServerProcess> (&replicas)[3],
    const std::string& id) {
  std::vector<int> writers;
  for (int i = 0; i < 3; ++i) {
    std::ifstream in(replicas[i]->log_path());
    const std::string log((std::istreambuf_iterator<char>(in)), {});
    if (log.find(absl::StrCat("event=task_done job=", id)) !=
        std::string::npos) {
      writers.push_back(i);
    }
  }
  return writers;
}

// One merge's 12 shards are written by the workers of three replicas
// (--workers 1 each); the replica that runs the job is killed (kill -9)
// half-way. The job is taken over with the shards written so far, and the
// model directory is bit for bit that of one replica with one worker.
TEST_F(ClusterTest, ThreeReplicasWriteOneMergesShardsAndAKillLosesNothing) {
  const std::vector<std::string> args = {
      "--workers", "1", "--testing-step-delay", "150ms", "--job-lease", "1s"};
  for (int i = 0; i < 3; ++i) Replica(i, args);
  v1::SubmitJobRequest request = UploadRegMean(clients_[0].get(), 12);
  ASSERT_EQ(request.merge().models_size(), 3);
  // A layer's bias and weight (4 * (6 + 6 * 48) bytes) make one shard.
  request.mutable_merge()->mutable_output()->set_shard_size_bytes(
      4 * (kOut + kOut * kIn));
  auto job = clients_[1]->SubmitJob(request);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->progress().tensors_total(), 24);
  int watcher = -1;
  const v1::Job done = KillRunnerAndAwait(job->id(), 6, &watcher);
  ASSERT_EQ(done.state(), v1::JOB_STATE_SUCCEEDED) << done.error_message();
  EXPECT_EQ(done.progress().tensors_done(), 24);
  // The replica that neither ran the job nor took it over wrote shards.
  const int killed = (watcher + 2) % 3;
  const int helper = 3 - killed - RunnerIndex(done);
  EXPECT_THAT(ShardWriters(replicas_, job->id()), ::testing::Contains(helper));
  const std::string cluster_dir = dir_ + "/cluster-model";
  auto cluster_result =
      clients_[watcher]->DownloadModel(done.result_ids(0), cluster_dir);
  ASSERT_TRUE(cluster_result.ok()) << cluster_result.status();

  // The same job on one node, one worker, with the embedded catalog.
  ServerProcess single(AMALGAMD_PATH, dir_ + "/single");
  ASSERT_TRUE(single.Start());
  auto client = Connect(single);
  v1::SubmitJobRequest again = UploadRegMean(client.get(), 12);
  *again.mutable_merge()->mutable_output() = request.merge().output();
  auto single_job = client->SubmitJob(again);
  ASSERT_TRUE(single_job.ok()) << single_job.status();
  auto single_done = client->WatchJob(single_job->id());
  ASSERT_TRUE(single_done.ok() &&
              single_done->state() == v1::JOB_STATE_SUCCEEDED);
  const std::string single_dir = dir_ + "/single-model";
  ASSERT_TRUE(
      client->DownloadModel(single_done->result_ids(0), single_dir).ok());
  const std::map<std::string, std::string> want = Files(single_dir);
  EXPECT_EQ(want.size(), 13u) << "12 shards and the index";
  EXPECT_TRUE(want.count("model-00012-of-00012.safetensors"));
  EXPECT_TRUE(Files(cluster_dir) == want);
}

TEST_F(ClusterTest, ACancelOnAReplicaThatDoesNotRunTheJobStopsIt) {
  const std::vector<std::string> args = {"--testing-step-delay", "300ms",
                                         "--job-lease", "1500ms"};
  for (int i = 0; i < 3; ++i) Replica(i, args);
  v1::SubmitJobRequest request = UploadRegMean(clients_[0].get());
  auto job = clients_[0]->SubmitJob(request);
  ASSERT_TRUE(job.ok()) << job.status();
  const v1::Job running = AwaitProgress(clients_[0].get(), job->id(), 1);
  const int runner = RunnerIndex(running);
  ASSERT_GE(runner, 0);
  const int other = (runner + 1) % 3;
  const absl::Time cancelled_at = absl::Now();
  ASSERT_TRUE(clients_[other]->CancelJob(job->id()).ok());
  auto done = clients_[(runner + 2) % 3]->WatchJob(job->id());
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->state(), v1::JOB_STATE_CANCELLED);
  EXPECT_LT(absl::Now() - cancelled_at, absl::Seconds(4))
      << "stopped within about one heartbeat (0.5 s) and a step";
  EXPECT_EQ(done->result_ids_size(), 0);
}

TEST_F(ClusterTest, AnOrganisationAtItsJobLimitIsRefusedOnEveryReplica) {
  const std::vector<std::string> args = {"--testing-step-delay", "300ms",
                                         "--max-jobs-per-org", "1"};
  for (int i = 0; i < 2; ++i) Replica(i, args);
  v1::SubmitJobRequest request = UploadRegMean(clients_[0].get());
  auto first = clients_[0]->SubmitJob(request);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = clients_[1]->SubmitJob(request);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(second.status().message(), HasSubstr("the limit"));
  ASSERT_TRUE(clients_[1]->CancelJob(first->id()).ok());
}

// A replica that starts on the shared data directory leaves the files that
// another replica is writing alone (found by the chaos test: a start used to
// clear all of tmp/, failing the other replica's job at its last rename).
TEST_F(ClusterTest, AReplicaStartingLeavesAnotherReplicasFilesAlone) {
  const std::vector<std::string> args = {"--testing-step-delay", "200ms"};
  Replica(0, args);
  Replica(1, args);
  v1::SubmitJobRequest request = UploadRegMean(clients_[0].get());
  auto job = clients_[0]->SubmitJob(request);
  ASSERT_TRUE(job.ok()) << job.status();
  const v1::Job running = AwaitProgress(clients_[0].get(), job->id(), 2);
  const int runner = RunnerIndex(running);
  ASSERT_GE(runner, 0) << running.runner();
  const int other = 1 - runner;
  replicas_[other]->Kill();
  ASSERT_TRUE(replicas_[other]->Start());
  auto done = clients_[runner]->WatchJob(job->id());
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->state(), v1::JOB_STATE_SUCCEEDED) << done->error_message();
  EXPECT_EQ(done->attempt(), 1);
}

// An upload cut off by the death of its replica resumes through another:
// the offset is in the catalog, the bytes on the shared volume.
TEST_F(ClusterTest, AnUploadCutOffWithItsReplicaResumesThroughAnother) {
  // The dead replica's hold on the upload's stream ends with its lease: the
  // client's retries (6.2 s in all) outlast a lease of 3 s.
  Replica(0, {"--job-lease", "3s"});
  Replica(1, {"--job-lease", "3s"});
  const std::string path = dir_ + "/large";
  std::vector<float> values(1 << 20);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.5f * (i % 977);
  Write(path, {{"a", {{1 << 20}, values}}, {"b", {{1 << 20}, values}}});
  constexpr int64_t kMiB = 1 << 20;
  {
    client::ClientOptions options;
    options.address = replicas_[0]->address();
    options.upload_retries = 0;
    auto cut_client = *client::Client::Create(options);
    bool killed = false;
    auto cut = cut_client->Upload(
        v1::ARTIFACT_KIND_WEIGHTS, path, "large", "",
        [&](int64_t done, int64_t) {
          if (done < 4 * kMiB || killed) return;
          const absl::Time deadline = absl::Now() + absl::Seconds(30);
          while (absl::Now() < deadline) {
            auto held = clients_[1]->GetUpload("moved-1");
            if (held.ok() && held->committed_bytes() >= kMiB) break;
            absl::SleepFor(absl::Milliseconds(5));
          }
          replicas_[0]->Kill();
          killed = true;
        },
        "moved-1");
    ASSERT_TRUE(killed);
    EXPECT_FALSE(cut.ok());
  }
  auto held = clients_[1]->GetUpload("moved-1");
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_GE(held->committed_bytes(), kMiB);
  EXPECT_LT(held->committed_bytes(), held->size_bytes());
  EXPECT_EQ(clients_[1]->ListArtifacts()->artifacts_size(), 0)
      << "a partial upload is not an artifact";
  int64_t first = -1;
  auto artifact = clients_[1]->Upload(
      v1::ARTIFACT_KIND_WEIGHTS, path, "large", "",
      [&](int64_t done, int64_t) {
        if (first < 0) first = done;
      },
      "moved-1");
  ASSERT_TRUE(artifact.ok()) << artifact.status();
  EXPECT_GE(first, held->committed_bytes()) << "only the rest was sent";
  auto downloaded = clients_[1]->Download(artifact->id(), dir_ + "/back");
  ASSERT_TRUE(downloaded.ok()) << downloaded.status();
  EXPECT_EQ(downloaded->sha256(), artifact->sha256());
  std::ifstream a(path, std::ios::binary), b(dir_ + "/back", std::ios::binary);
  EXPECT_TRUE(std::equal(std::istreambuf_iterator<char>(a), {},
                         std::istreambuf_iterator<char>(b)));
}

// For 60 s a random replica is killed (kill -9) and restarted every 2 to 4 s
// while two clients upload and merge through all of them and a third lists:
// every acknowledged upload and job is intact at the end, and no listed
// artifact ever lacks its complete blob.
TEST_F(ClusterTest, ChaosLosesNothingAcknowledgedAndListsNothingPartial) {
  const std::vector<std::string> args = {"--job-lease",          "1s",
                                         "--max-attempts",       "20",
                                         "--testing-step-delay", "20ms"};
  for (int i = 0; i < 3; ++i) Replica(i, args);
  absl::Mutex mu;
  std::string addresses[3];
  for (int i = 0; i < 3; ++i) addresses[i] = replicas_[i]->address();
  auto connect = [&](std::mt19937& rng) {
    client::ClientOptions options;
    {
      absl::MutexLock lock(&mu);
      options.address = addresses[rng() % 3];
    }
    options.upload_retries = 1;
    options.unary_deadline = absl::Seconds(10);
    auto client = client::Client::Create(options);
    return client.ok() ? *std::move(client) : nullptr;
  };

  std::atomic<bool> stop{false};
  std::map<std::string, std::string> uploaded;  // id -> sha256, acknowledged
  std::vector<std::string> jobs;                // acknowledged
  std::atomic<int> partial_listed{0}, listings{0};
  auto worker = [&](int seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    for (int n = 0; !stop; ++n) {
      const std::string path = absl::StrCat(dir_, "/chaos-", seed, "-", n);
      Tensors model;
      std::vector<float> values(4096);
      for (float& v : values) v = normal(rng);
      model["w"] = {{64, 64}, values};
      model["b"] = {{64},
                    std::vector<float>(values.begin(), values.begin() + 64)};
      Write(path, model);
      auto client = connect(rng);
      if (client == nullptr) continue;
      auto artifact = client->Upload(v1::ARTIFACT_KIND_WEIGHTS, path,
                                     absl::StrCat("c", seed, "-", n), "");
      if (!artifact.ok()) continue;
      std::string other;
      {
        absl::MutexLock lock(&mu);
        uploaded[artifact->id()] = artifact->sha256();
        other = std::next(uploaded.begin(), rng() % uploaded.size())->first;
      }
      v1::SubmitJobRequest request;
      request.mutable_merge()->set_method(v1::MERGE_METHOD_AVERAGE);
      request.mutable_merge()->add_models()->set_weights_id(artifact->id());
      request.mutable_merge()->add_models()->set_weights_id(other);
      auto submitter = connect(rng);
      if (submitter == nullptr) continue;
      auto job = submitter->SubmitJob(request);
      if (job.ok()) {
        absl::MutexLock lock(&mu);
        jobs.push_back(job->id());
      }
    }
  };
  auto lister = [&] {
    std::mt19937 rng(99);
    while (!stop) {
      auto client = connect(rng);
      auto listed = client == nullptr ? absl::UnavailableError("no client")
                                      : client->ListArtifacts();
      if (!listed.ok()) continue;
      ++listings;
      for (const v1::Artifact& a : listed->artifacts()) {
        std::error_code error;
        const auto size = std::filesystem::file_size(
            absl::StrCat(data_, "/blobs/", a.sha256()), error);
        if (error || static_cast<int64_t>(size) != a.size_bytes()) {
          ++partial_listed;
        }
      }
      absl::SleepFor(absl::Milliseconds(100));
    }
  };
  std::thread threads[] = {std::thread(worker, 1), std::thread(worker, 2),
                           std::thread(lister)};
  std::mt19937 chaos(5);
  int kills = 0;
  const absl::Time end = absl::Now() + absl::Seconds(60);
  while (absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(2000 + chaos() % 2000));
    const int victim = chaos() % 3;
    replicas_[victim]->Kill();
    ++kills;
    ASSERT_TRUE(replicas_[victim]->Start()) << replicas_[victim]->log_path();
    absl::MutexLock lock(&mu);
    addresses[victim] = replicas_[victim]->address();
  }
  stop = true;
  for (std::thread& t : threads) t.join();

  std::map<std::string, std::string> stored;
  std::vector<std::string> submitted;
  {
    absl::MutexLock lock(&mu);
    stored = uploaded;
    submitted = jobs;
  }
  std::printf("%d kills, %zu uploads and %zu jobs acknowledged, %d listings\n",
              kills, stored.size(), submitted.size(), listings.load());
  ASSERT_GT(stored.size(), 10u);
  ASSERT_GT(submitted.size(), 5u);
  EXPECT_EQ(partial_listed.load(), 0) << "a listed artifact lacked its blob";
  auto client = Connect(*replicas_[0]);
  for (const auto& [id, sha256] : stored) {
    auto artifact = client->GetArtifact(id);
    ASSERT_TRUE(artifact.ok()) << id << ": " << artifact.status();
    EXPECT_EQ(artifact->sha256(), sha256);
    auto downloaded = client->Download(id, dir_ + "/check");
    ASSERT_TRUE(downloaded.ok()) << id << ": " << downloaded.status();
    EXPECT_EQ(downloaded->sha256(), sha256);
  }
  for (const std::string& id : submitted) {
    auto done = client->WatchJob(id);
    ASSERT_TRUE(done.ok()) << id << ": " << done.status();
    EXPECT_EQ(done->state(), v1::JOB_STATE_SUCCEEDED)
        << id << ": " << done->error_message();
    ASSERT_EQ(done->result_ids_size(), 1) << id;
    EXPECT_TRUE(client->GetArtifact(done->result_ids(0)).ok()) << id;
  }
}

}  // namespace
}  // namespace amalgam::testing
