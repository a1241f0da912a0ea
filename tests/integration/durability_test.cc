// Resumable uploads, crash recovery (kill -9 mid-upload and mid-merge) and
// the per-organisation limits, with the real amalgamd.
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/cpp/client.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/integration/server_process.h"

namespace amalgam {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr int64_t kMiB = int64_t{1} << 20;

// `count` tensors "t<i>" of `elements` float32 each, from `generate(i, j)`.
void WriteModel(const std::string& path, int count, int64_t elements,
                const std::function<float(int, int64_t)>& generate) {
  std::vector<core::TensorSpec> infos;
  for (int i = 0; i < count; ++i) {
    infos.push_back({absl::StrCat("t", i), core::DType::kF32, {elements}});
  }
  auto writer = core::SafetensorsWriter::Create(path, infos, {});
  ASSERT_TRUE(writer.ok()) << writer.status();
  std::vector<float> data(static_cast<size_t>(elements));
  for (int i = 0; i < count; ++i) {
    for (int64_t j = 0; j < elements; ++j) data[j] = generate(i, j);
    ASSERT_TRUE((*writer)
                    ->Append(absl::Span<const uint8_t>(
                        reinterpret_cast<const uint8_t*>(data.data()),
                        data.size() * sizeof(float)))
                    .ok());
  }
  ASSERT_TRUE((*writer)->Finish().ok());
}

// One 8 MiB tensor of pseudo-random floats.
std::string WriteLargeModel(const std::string& dir) {
  const std::string path = dir + "/large.safetensors";
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> uniform(-1, 1);
  WriteModel(path, 1, 2 * kMiB, [&](int, int64_t) { return uniform(rng); });
  return path;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A raw upload stream (what the client library would not send).
struct OpenUpload {
  std::unique_ptr<v1::ArtifactService::Stub> stub;
  grpc::ClientContext context;
  v1::UploadResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::UploadRequest>> writer;
};

class DurabilityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("durability-test");
    tokens_ = dir_ + "/tokens";
    std::ofstream(tokens_) << "alice-token org-a\nbob-token org-b\n";
  }

  void StartServer(std::vector<std::string> args = {}) {
    args.push_back("--tokens");
    args.push_back(tokens_);
    server_ = std::make_unique<testing::ServerProcess>(AMALGAMD_PATH,
                                                       data_dir(), args);
    ASSERT_TRUE(server_->Start()) << "log: " << server_->log_path();
  }

  // Same data directory, fresh process (and port).
  void RestartServer() {
    server_->Kill();
    ASSERT_TRUE(server_->Start()) << "log: " << server_->log_path();
  }

  std::string data_dir() const { return dir_ + "/data"; }

  std::unique_ptr<client::Client> Connect(const std::string& token,
                                          int upload_retries = 5) {
    client::ClientOptions options;
    options.address = server_->address();
    options.token = token;
    options.upload_retries = upload_retries;
    options.retry_backoff = absl::Milliseconds(50);
    // Every upload in one pass, its digest in the trailer.
    options.dedup_below_bytes = 0;
    return *client::Client::Create(options);
  }

  // A bare stub, for what the client library would not send.
  std::unique_ptr<v1::ArtifactService::Stub> RawStub() {
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(64 << 20);
    return v1::ArtifactService::NewStub(grpc::CreateCustomChannel(
        server_->address(), grpc::InsecureChannelCredentials(), args));
  }

  // Alice's upload stream with the header of `path` (upload `id`) sent;
  // `deadline` (if not zero) bounds the call.
  std::unique_ptr<OpenUpload> OpenStream(
      const std::string& path, const std::string& id,
      std::chrono::milliseconds deadline = std::chrono::milliseconds(0)) {
    auto upload = std::make_unique<OpenUpload>();
    upload->stub = RawStub();
    upload->context.AddMetadata("authorization", "Bearer alice-token");
    if (deadline.count() > 0) {
      upload->context.set_deadline(std::chrono::system_clock::now() + deadline);
    }
    upload->writer = upload->stub->Upload(&upload->context, &upload->response);
    upload->writer->Write(Header(path, id));
    return upload;
  }

  static v1::UploadRequest Header(const std::string& path,
                                  const std::string& upload_id) {
    v1::UploadRequest request;
    v1::UploadHeader* header = request.mutable_header();
    header->set_kind(v1::ARTIFACT_KIND_WEIGHTS);
    header->set_name("large");
    header->set_size_bytes(static_cast<int64_t>(fs::file_size(path)));
    header->set_upload_id(upload_id);
    return request;
  }

  static v1::UploadRequest Trailer(const std::string& sha256) {
    v1::UploadRequest request;
    request.mutable_trailer()->set_sha256(sha256);
    return request;
  }

  static v1::UploadRequest Chunk(const std::string& content, int64_t offset,
                                 int64_t size) {
    v1::UploadRequest request;
    request.mutable_chunk()->set_offset(offset);
    request.mutable_chunk()->set_data(content.substr(offset, size));
    return request;
  }

  // Sends the header and the first `bytes` of `path` (with the trailer when
  // that is all of it), then half-closes.
  grpc::Status SendPrefix(const std::string& path, const std::string& id,
                          int64_t bytes) {
    const std::string content = ReadFile(path);
    auto upload = OpenStream(path, id);
    for (int64_t offset = 0; offset < bytes; offset += kMiB) {
      upload->writer->Write(
          Chunk(content, offset, std::min(kMiB, bytes - offset)));
    }
    if (bytes == static_cast<int64_t>(content.size())) {
      upload->writer->Write(Trailer(*core::Sha256File(path)));
    }
    upload->writer->WritesDone();
    return upload->writer->Finish();
  }

  // Waits until GetUpload(id) reports at least `bytes`.
  void AwaitCommitted(client::Client* client, const std::string& id,
                      int64_t bytes) {
    std::string last;
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < deadline) {
      auto held = client->GetUpload(id);
      if (held.ok() && held->committed_bytes() >= bytes) return;
      last = held.ok() ? absl::StrCat(held->committed_bytes())
                       : held.status().ToString();
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    FAIL() << "upload " << id << " never held " << bytes << " bytes: " << last;
  }

  static v1::SubmitJobRequest Average(const std::string& a,
                                      const std::string& b) {
    v1::SubmitJobRequest request;
    request.mutable_merge()->set_method(v1::MERGE_METHOD_AVERAGE);
    request.mutable_merge()->add_models()->set_weights_id(a);
    request.mutable_merge()->add_models()->set_weights_id(b);
    return request;
  }

  // Watches the job and kills the server (-9) once `tensors` are merged;
  // false if the job ended first.
  bool KillAtProgress(client::Client* client, const std::string& job_id,
                      int64_t tensors) {
    bool killed = false;
    client
        ->WatchJob(
            job_id,
            [&](const v1::JobEvent& event) {
              if (!killed && event.job().progress().tensors_done() >= tensors) {
                killed = true;
                server_->Kill();
              }
            })
        .IgnoreError();
    return killed;
  }

  // Uploads dir_/a.safetensors and dir_/b.safetensors and submits their
  // average.
  void UploadAndAverage(client::Client* client, v1::Artifact* a,
                        v1::Artifact* b, v1::SubmitJobRequest* request,
                        v1::Job* job) {
    for (auto [artifact, name] : {std::pair{a, "a"}, std::pair{b, "b"}}) {
      auto uploaded = client->Upload(
          v1::ARTIFACT_KIND_WEIGHTS,
          absl::StrCat(dir_, "/", name, ".safetensors"), name, "");
      ASSERT_TRUE(uploaded.ok()) << uploaded.status();
      *artifact = *uploaded;
    }
    *request = Average(a->id(), b->id());
    auto submitted = client->SubmitJob(*request);
    ASSERT_TRUE(submitted.ok()) << submitted.status();
    *job = *submitted;
  }

  // Uploads `path` as upload `id`; `first_offset` gets where it began.
  static absl::StatusOr<v1::Artifact> Resume(client::Client* client,
                                             const std::string& path,
                                             const std::string& id,
                                             int64_t* first_offset) {
    *first_offset = -1;
    return client->Upload(
        v1::ARTIFACT_KIND_WEIGHTS, path, "large", "",
        [&](int64_t done, int64_t) {
          if (*first_offset < 0) *first_offset = done;
        },
        id);
  }

  void ExpectDownloadMatches(client::Client* client, const std::string& id,
                             const std::string& original) {
    const std::string out = dir_ + "/download-" + id;
    auto downloaded = client->Download(id, out);
    ASSERT_TRUE(downloaded.ok()) << downloaded.status();
    EXPECT_EQ(*core::Sha256File(out), *core::Sha256File(original));
  }

  std::string dir_, tokens_;
  std::unique_ptr<testing::ServerProcess> server_;
};

TEST_F(DurabilityTest, InterruptedUploadResumesFromTheCommittedOffset) {
  StartServer();
  const std::string path = WriteLargeModel(dir_);
  grpc::Status cut = SendPrefix(path, "resume-1", 3 * kMiB);
  EXPECT_EQ(cut.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(cut.error_message(),
              HasSubstr("resume upload resume-1 from offset 3145728"));

  auto alice = Connect("alice-token");
  auto held = alice->GetUpload("resume-1");
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_EQ(held->committed_bytes(), 3 * kMiB);
  EXPECT_EQ(held->size_bytes(), static_cast<int64_t>(fs::file_size(path)));
  EXPECT_EQ(alice->ListArtifacts()->artifacts_size(), 0)
      << "a partial upload is not an artifact";
  // Upload ids are per organisation.
  EXPECT_EQ(Connect("bob-token")->GetUpload("resume-1").status().code(),
            absl::StatusCode::kNotFound);
  // The same id with another header is refused, and the bytes stay.
  auto other = alice->Upload(v1::ARTIFACT_KIND_WEIGHTS, path, "renamed", "",
                             nullptr, "resume-1");
  EXPECT_EQ(other.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(alice->GetUpload("resume-1")->committed_bytes(), 3 * kMiB);

  int64_t first_offset = -1;
  auto artifact = Resume(alice.get(), path, "resume-1", &first_offset);
  ASSERT_TRUE(artifact.ok()) << artifact.status();
  EXPECT_EQ(first_offset, 3 * kMiB) << "the client sent only the rest";
  EXPECT_EQ(artifact->sha256(), *core::Sha256File(path));
  ExpectDownloadMatches(alice.get(), artifact->id(), path);
  // The finished upload keeps only the id of the artifact it made.
  EXPECT_EQ(alice->GetUpload("resume-1")->artifact_id(), artifact->id());
  EXPECT_TRUE(fs::is_empty(data_dir() + "/uploads"));
}

TEST_F(DurabilityTest, KillDuringUploadThenResumeAfterRestart) {
  StartServer();
  const std::string path = WriteLargeModel(dir_);
  {
    auto alice = Connect("alice-token", /*upload_retries=*/0);
    auto watcher = Connect("alice-token");
    bool killed = false;
    auto cut = alice->Upload(
        v1::ARTIFACT_KIND_WEIGHTS, path, "large", "",
        [&](int64_t done, int64_t) {
          if (done < 4 * kMiB || killed) return;
          AwaitCommitted(watcher.get(), "killed-1", kMiB);
          server_->Kill();
          killed = true;
        },
        "killed-1");
    ASSERT_TRUE(killed);
    EXPECT_FALSE(cut.ok());
  }
  ASSERT_TRUE(server_->Start()) << "log: " << server_->log_path();
  auto alice = Connect("alice-token");
  EXPECT_EQ(alice->ListArtifacts()->artifacts_size(), 0)
      << "no partial artifact is visible after the crash";
  auto held = alice->GetUpload("killed-1");
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_GE(held->committed_bytes(), kMiB);
  EXPECT_LT(held->committed_bytes(), held->size_bytes());

  int64_t first_offset = -1;
  auto artifact = Resume(alice.get(), path, "killed-1", &first_offset);
  ASSERT_TRUE(artifact.ok()) << artifact.status();
  EXPECT_EQ(first_offset, held->committed_bytes());
  ExpectDownloadMatches(alice.get(), artifact->id(), path);
}

TEST_F(DurabilityTest,
       AWrongOrMissingDigestInTheTrailerIsRefusedAndNothingIsKept) {
  StartServer();
  const std::string path = WriteLargeModel(dir_);
  const std::string content = ReadFile(path);
  const int64_t size = static_cast<int64_t>(content.size());
  auto alice = Connect("alice-token");
  auto send = [&](const std::string& id, const std::string& sha256,
                  bool trailer_first) {
    auto upload = OpenStream(path, id);
    if (trailer_first) upload->writer->Write(Trailer(sha256));
    for (int64_t offset = 0; offset < size; offset += kMiB) {
      upload->writer->Write(
          Chunk(content, offset, std::min(kMiB, size - offset)));
    }
    if (!trailer_first && !sha256.empty())
      upload->writer->Write(Trailer(sha256));
    upload->writer->WritesDone();
    return upload->writer->Finish();
  };
  const std::string wrong(64, 'a');
  grpc::Status status = send("wrong-digest", wrong, false);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_THAT(status.error_message(), HasSubstr("but the trailer declared"));
  EXPECT_EQ(alice->GetUpload("wrong-digest").status().code(),
            absl::StatusCode::kNotFound)
      << "bytes that fail verification are discarded";
  status = send("no-digest", "", false);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("without its sha256"));
  status = send("early-digest", *core::Sha256File(path), true);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("trailer after 0 of"));
  EXPECT_EQ(alice->ListArtifacts()->artifacts_size(), 0);
  // The right digest after the last byte makes the artifact.
  status = send("right-digest", *core::Sha256File(path), false);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(alice->ListArtifacts()->artifacts_size(), 1);
}

TEST_F(DurabilityTest, ResumingAFileThatChangedIsRefusedNamingIt) {
  StartServer();
  const std::string path = WriteLargeModel(dir_);
  ASSERT_FALSE(SendPrefix(path, "changed", 2 * kMiB).ok());
  // Same size, other first bytes.
  std::string content = ReadFile(path);
  content[100] ^= 1;
  std::ofstream(path, std::ios::binary | std::ios::trunc) << content;
  auto alice = Connect("alice-token");
  auto artifact = alice->Upload(v1::ARTIFACT_KIND_WEIGHTS, path, "large", "",
                                nullptr, "changed");
  EXPECT_EQ(artifact.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(artifact.status().message(), HasSubstr(path));
  EXPECT_THAT(artifact.status().message(), HasSubstr("changed since upload"));
  EXPECT_EQ(alice->GetUpload("changed")->committed_bytes(), 2 * kMiB)
      << "the bytes held stay for a resume of the original file";
  // Under the derived id, a changed file is another upload: never mixed.
  auto fresh = alice->Upload(v1::ARTIFACT_KIND_WEIGHTS, path, "large", "");
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  ExpectDownloadMatches(alice.get(), fresh->id(), path);
}

TEST_F(DurabilityTest, KillDuringMergeReRunsTheJobAfterRestart) {
  StartServer({"--testing-step-delay", "50ms"});
  constexpr int kTensors = 40;
  constexpr int64_t kElements = 1000;
  auto a_value = [](int i, int64_t j) { return 0.25f * i + 0.001f * j; };
  auto b_value = [](int i, int64_t j) { return -0.5f * i + 0.003f * j + 1; };
  WriteModel(dir_ + "/a.safetensors", kTensors, kElements, a_value);
  WriteModel(dir_ + "/b.safetensors", kTensors, kElements, b_value);
  auto alice = Connect("alice-token");
  v1::Artifact a, b;
  v1::SubmitJobRequest request;
  v1::Job job;
  ASSERT_NO_FATAL_FAILURE(
      UploadAndAverage(alice.get(), &a, &b, &request, &job));
  // With one worker, this one is still queued when the server dies.
  request.mutable_merge()->set_result_name("queued");
  auto queued = alice->SubmitJob(request);
  ASSERT_TRUE(queued.ok()) << queued.status();
  ASSERT_TRUE(KillAtProgress(alice.get(), job.id(), 3))
      << "the merge finished before the kill";

  ASSERT_TRUE(server_->Start()) << "log: " << server_->log_path();
  alice = Connect("alice-token");
  auto done = alice->WatchJob(job.id());
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_EQ(done->state(), v1::JOB_STATE_SUCCEEDED) << done->error_message();
  auto queued_done = alice->WatchJob(queued->id());
  ASSERT_TRUE(queued_done.ok()) << queued_done.status();
  ASSERT_EQ(queued_done->state(), v1::JOB_STATE_SUCCEEDED);
  // Same inputs, same bytes.
  EXPECT_EQ(alice->GetArtifact(queued_done->result_ids(0))->sha256(),
            alice->GetArtifact(done->result_ids(0))->sha256());
  EXPECT_EQ(alice->ListArtifacts()->artifacts_size(), 4)
      << "two inputs and two results, nothing partial";
  ExpectDownloadMatches(alice.get(), a.id(), dir_ + "/a.safetensors");
  ExpectDownloadMatches(alice.get(), b.id(), dir_ + "/b.safetensors");

  const std::string out = dir_ + "/merged.safetensors";
  ASSERT_TRUE(alice->Download(done->result_ids(0), out).ok());
  auto reader = core::SafetensorsReader::Open(out);
  ASSERT_TRUE(reader.ok()) << reader.status();
  ASSERT_EQ((*reader)->tensors().size(), static_cast<size_t>(kTensors));
  for (int i = 0; i < kTensors; ++i) {
    const core::TensorInfo* tensor = (*reader)->Find(absl::StrCat("t", i));
    ASSERT_NE(tensor, nullptr);
    const auto* values =
        reinterpret_cast<const float*>((*reader)->Data(*tensor).data());
    for (int64_t j = 0; j < kElements; ++j) {
      const double expected =
          (double{a_value(i, j)} + double{b_value(i, j)}) / 2;
      ASSERT_EQ(values[j], static_cast<float>(expected))
          << "tensor t" << i << " element " << j;
    }
  }
  // No file left behind (a replica on a shared directory has an empty
  // tmp/<replica>/ of its own).
  int leftovers = 0;
  for (const auto& entry :
       fs::recursive_directory_iterator(data_dir() + "/tmp")) {
    if (!entry.is_directory()) ++leftovers;
  }
  EXPECT_EQ(leftovers, 0);
}

TEST_F(DurabilityTest, AbandonedUploadsExpire) {
  StartServer({"--upload-expiry", "1s"});
  const std::string path = WriteLargeModel(dir_);
  SendPrefix(path, "abandoned", 2 * kMiB);
  auto alice = Connect("alice-token");
  ASSERT_TRUE(alice->GetUpload("abandoned").ok());
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (alice->GetUpload("abandoned").ok() &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(alice->GetUpload("abandoned").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(fs::is_empty(data_dir() + "/uploads"));
}

TEST_F(DurabilityTest, UploadsPerOrganisationAreLimited) {
  StartServer({"--max-uploads-per-org", "2"});
  const std::string path = WriteLargeModel(dir_);
  const std::string content = ReadFile(path);
  auto alice = Connect("alice-token", /*upload_retries=*/0);
  std::vector<std::unique_ptr<OpenUpload>> open;
  for (const std::string id : {"held-1", "held-2"}) {
    auto upload = OpenStream(path, id);
    ASSERT_TRUE(upload->writer->Write(Chunk(content, 0, kMiB)));
    AwaitCommitted(alice.get(), id, kMiB);
    open.push_back(std::move(upload));
  }
  auto third = alice->Upload(v1::ARTIFACT_KIND_WEIGHTS, path, "large", "");
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(third.status().message(), HasSubstr("org-a"));
  // Another organisation is not held back.
  auto bob = Connect("bob-token");
  EXPECT_TRUE(bob->Upload(v1::ARTIFACT_KIND_WEIGHTS, path, "large", "").ok());

  // One upload id has one stream at a time.
  open[1]->writer->WritesDone();
  open[1]->writer->Finish().IgnoreError();
  std::unique_ptr<client::Client> patient = Connect("alice-token");
  auto twice = alice->Upload(v1::ARTIFACT_KIND_WEIGHTS, path, "large", "",
                             nullptr, "held-1");
  // Until the server has seen held-2 end, the limit may answer first.
  EXPECT_THAT(twice.status().code(),
              ::testing::AnyOf(absl::StatusCode::kAborted,
                               absl::StatusCode::kResourceExhausted));
  open[0]->writer->WritesDone();
  open[0]->writer->Finish().IgnoreError();
  // Once the streams are gone the slots are free; the client retries
  // ABORTED on its own.
  auto done = patient->Upload(v1::ARTIFACT_KIND_WEIGHTS, path, "large", "",
                              nullptr, "held-1");
  EXPECT_TRUE(done.ok()) << done.status();
}

TEST_F(DurabilityTest, JobsPerOrganisationAreLimited) {
  StartServer({"--max-jobs-per-org", "1", "--testing-step-delay", "1s"});
  WriteModel(dir_ + "/m.safetensors", 30, 4, [](int, int64_t) { return 1; });
  auto alice = Connect("alice-token");
  auto bob = Connect("bob-token");
  v1::SubmitJobRequest alice_job, bob_job;
  for (auto [client, request] :
       {std::pair{alice.get(), &alice_job}, std::pair{bob.get(), &bob_job}}) {
    auto m = client->Upload(v1::ARTIFACT_KIND_WEIGHTS, dir_ + "/m.safetensors",
                            "m", "");
    ASSERT_TRUE(m.ok()) << m.status();
    *request = Average(m->id(), m->id());
  }
  auto first = alice->SubmitJob(alice_job);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = alice->SubmitJob(alice_job);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(second.status().message(), HasSubstr("org-a"));
  auto other = bob->SubmitJob(bob_job);
  ASSERT_TRUE(other.ok()) << other.status();
  // A finished job frees the slot.
  ASSERT_TRUE(alice->CancelJob(first->id()).ok());
  ASSERT_EQ(alice->WatchJob(first->id())->state(), v1::JOB_STATE_CANCELLED);
  auto third = alice->SubmitJob(alice_job);
  ASSERT_TRUE(third.ok()) << third.status();
  alice->CancelJob(third->id()).IgnoreError();
  bob->CancelJob(other->id()).IgnoreError();
}

TEST_F(DurabilityTest, OversizedMessagesAreRefused) {
  StartServer();
  const std::string path = WriteLargeModel(dir_);
  const std::string content = ReadFile(path);
  auto upload = OpenStream(path, "");
  upload->writer->Write(Chunk(content, 0, 8 * kMiB + 16));
  upload->writer->WritesDone();
  EXPECT_EQ(upload->writer->Finish().error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
}

TEST_F(DurabilityTest, DeadlinesAreHonoured) {
  StartServer();
  const std::string path = WriteLargeModel(dir_);
  const std::string content = ReadFile(path);
  auto alice = Connect("alice-token");
  {
    // The stream stays open, silent, past its deadline: no fixed sleep,
    // Finish waits for the deadline. The chunk is held before it passes.
    auto upload = OpenStream(path, "slow", std::chrono::seconds(3));
    upload->writer->Write(Chunk(content, 0, kMiB));
    AwaitCommitted(alice.get(), "slow", kMiB);
    EXPECT_EQ(upload->writer->Finish().error_code(),
              grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  // The server dropped the call but kept what it had, for a resume.
  AwaitCommitted(alice.get(), "slow", kMiB);
  auto artifact = alice->Upload(v1::ARTIFACT_KIND_WEIGHTS, path, "large", "",
                                nullptr, "slow");
  ASSERT_TRUE(artifact.ok()) << artifact.status();
  ExpectDownloadMatches(alice.get(), artifact->id(), path);
}

TEST_F(DurabilityTest, DeleteIsRefusedWhileAJobReadsTheArtifact) {
  StartServer({"--testing-step-delay", "200ms"});
  WriteModel(dir_ + "/m.safetensors", 20, 4, [](int, int64_t) { return 1; });
  auto alice = Connect("alice-token");
  auto m = alice->Upload(v1::ARTIFACT_KIND_WEIGHTS, dir_ + "/m.safetensors",
                         "m", "");
  ASSERT_TRUE(m.ok()) << m.status();
  v1::SubmitJobRequest request = Average(m->id(), m->id());
  auto job = alice->SubmitJob(request);
  ASSERT_TRUE(job.ok()) << job.status();
  v1::DeleteArtifactRequest remove;
  remove.set_id(m->id());
  auto refused = alice->DeleteArtifact(remove);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(), HasSubstr(job->id()));
  ASSERT_TRUE(alice->CancelJob(job->id()).ok());
  ASSERT_EQ(alice->WatchJob(job->id())->state(), v1::JOB_STATE_CANCELLED);
  EXPECT_TRUE(alice->DeleteArtifact(remove).ok());
}

// A submission racing a delete of its input: either the job is queued and
// the delete refused (or done only once the job finished), or the delete
// wins and the submission is NOT_FOUND. An accepted job never loses its
// input. One side is given a head start that varies by round (-20 ms to
// +20 ms), so both orderings happen, and the rounds near 0 race.
TEST_F(DurabilityTest, SubmitAndDeleteOfTheSameInputAreAtomic) {
  // Jobs take a while, so the deletes race unfinished jobs.
  StartServer({"--testing-step-delay", "20ms"});
  WriteModel(dir_ + "/m.safetensors", 2, 4, [](int, int64_t) { return 1; });
  auto submitter = Connect("alice-token");
  auto deleter = Connect("alice-token");
  const int kHeadStartMs[] = {-20, -5, -1, 0, 0, 1, 5, 20};
  int jobs = 0, deletes = 0;
  for (int round = 0; round < 40; ++round) {
    auto m =
        submitter->Upload(v1::ARTIFACT_KIND_WEIGHTS, dir_ + "/m.safetensors",
                          absl::StrCat("m", round), "");
    ASSERT_TRUE(m.ok()) << m.status();
    v1::SubmitJobRequest request = Average(m->id(), m->id());
    v1::DeleteArtifactRequest remove;
    remove.set_id(m->id());
    // > 0: the submission starts first by that much; < 0: the delete does.
    const int head_start = kHeadStartMs[round % 8];
    absl::StatusOr<v1::DeleteArtifactResponse> deleted;
    std::thread racer([&] {
      if (head_start > 0) absl::SleepFor(absl::Milliseconds(head_start));
      deleted = deleter->DeleteArtifact(remove);
    });
    if (head_start < 0) absl::SleepFor(absl::Milliseconds(-head_start));
    auto job = submitter->SubmitJob(request);
    racer.join();
    if (job.ok()) {
      ++jobs;
      if (!deleted.ok()) {
        EXPECT_EQ(deleted.status().code(),
                  absl::StatusCode::kFailedPrecondition);
      }
      auto done = submitter->WatchJob(job->id());
      ASSERT_TRUE(done.ok()) << done.status();
      EXPECT_EQ(done->state(), v1::JOB_STATE_SUCCEEDED)
          << done->error_message();
    } else {
      ++deletes;
      EXPECT_EQ(job.status().code(), absl::StatusCode::kNotFound);
      ASSERT_TRUE(deleted.ok()) << deleted.status();
    }
  }
  std::printf("jobs first: %d, deletes first: %d\n", jobs, deletes);
  EXPECT_GT(jobs, 0) << "no submission won the race";
  EXPECT_GT(deletes, 0) << "no delete won the race";
}

TEST_F(DurabilityTest, UploadSizeAndQueueLengthAreLimited) {
  StartServer({"--max-upload-bytes", "1000000", "--max-queued-jobs", "1",
               "--testing-step-delay", "300ms"});
  const std::string large = WriteLargeModel(dir_);
  auto alice = Connect("alice-token");
  auto refused = alice->Upload(v1::ARTIFACT_KIND_WEIGHTS, large, "large", "");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(), HasSubstr("--max-upload-bytes"));

  WriteModel(dir_ + "/m.safetensors", 20, 4, [](int, int64_t) { return 1; });
  auto m = alice->Upload(v1::ARTIFACT_KIND_WEIGHTS, dir_ + "/m.safetensors",
                         "m", "");
  ASSERT_TRUE(m.ok()) << m.status();
  v1::SubmitJobRequest request = Average(m->id(), m->id());
  // One job runs, one waits, and the next finds the queue full.
  std::vector<std::string> accepted;
  absl::Status full;
  for (int i = 0; i < 3 && full.ok(); ++i) {
    auto job = alice->SubmitJob(request);
    if (job.ok()) {
      accepted.push_back(job->id());
      if (accepted.size() == 1) {
        // Wait (with a deadline) until the first job left the queue.
        const auto deadline =
            std::chrono::steady_clock::now() + std::chrono::seconds(30);
        absl::StatusOr<v1::Job> first;
        while ((first = alice->GetJob(job->id())).ok() &&
               first->state() == v1::JOB_STATE_QUEUED &&
               std::chrono::steady_clock::now() < deadline) {
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
        ASSERT_TRUE(first.ok()) << first.status();
        ASSERT_NE(first->state(), v1::JOB_STATE_QUEUED)
            << "the first job never started";
      }
    } else {
      full = job.status();
    }
  }
  EXPECT_EQ(accepted.size(), 2u);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.message(), HasSubstr("queue is full"));
  for (const std::string& id : accepted) {
    alice->CancelJob(id).IgnoreError();
  }
}

TEST_F(DurabilityTest, RunningJobWhoseInputVanishedFailsWithAReason) {
  StartServer({"--testing-step-delay", "50ms"});
  WriteModel(dir_ + "/a.safetensors", 40, 8, [](int, int64_t) { return 1; });
  WriteModel(dir_ + "/b.safetensors", 40, 8, [](int, int64_t) { return 3; });
  auto alice = Connect("alice-token");
  v1::Artifact a, b;
  v1::SubmitJobRequest request;
  v1::Job job;
  ASSERT_NO_FATAL_FAILURE(
      UploadAndAverage(alice.get(), &a, &b, &request, &job));
  ASSERT_TRUE(KillAtProgress(alice.get(), job.id(), 1));
  // The disk lost b's bytes while the server was down.
  ASSERT_TRUE(fs::remove(data_dir() + "/blobs/" + b.sha256()));
  ASSERT_TRUE(server_->Start()) << "log: " << server_->log_path();
  alice = Connect("alice-token");
  auto done = alice->WatchJob(job.id());
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(done->error_message(), HasSubstr(b.id()));
}

// A client that lost its connection without the server noticing leaves its
// stream open; resuming the same upload cancels that stream and goes on.
TEST_F(DurabilityTest, AStuckStreamIsTakenOverByTheResume) {
  StartServer();
  const std::string path = WriteLargeModel(dir_);
  const std::string content = ReadFile(path);
  auto stuck = OpenStream(path, "stuck");
  ASSERT_TRUE(stuck->writer->Write(Chunk(content, 0, kMiB)));
  auto alice = Connect("alice-token");
  AwaitCommitted(alice.get(), "stuck", kMiB);
  int64_t first_offset = -1;
  auto artifact = Resume(alice.get(), path, "stuck", &first_offset);
  ASSERT_TRUE(artifact.ok()) << artifact.status();
  EXPECT_EQ(first_offset, kMiB);
  ExpectDownloadMatches(alice.get(), artifact->id(), path);
  EXPECT_EQ(stuck->writer->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

// The server stored the artifact but the client never heard (the final
// response was lost): uploading again with the same id returns that
// artifact instead of storing a second one.
TEST_F(DurabilityTest, ALostFinalResponseDoesNotUploadTwice) {
  StartServer();
  const std::string path = WriteLargeModel(dir_);
  const std::string content = ReadFile(path);
  // The whole upload; the client "loses" the response.
  ASSERT_TRUE(SendPrefix(path, "once", content.size()).ok());
  auto alice = Connect("alice-token");
  auto held = alice->GetUpload("once");
  ASSERT_TRUE(held.ok()) << held.status();
  ASSERT_FALSE(held->artifact_id().empty());
  auto again = alice->Upload(v1::ARTIFACT_KIND_WEIGHTS, path, "large", "",
                             nullptr, "once");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->id(), held->artifact_id());
  EXPECT_EQ(alice->ListArtifacts()->artifacts_size(), 1);
  // A stream that sends the header again is answered at once, too.
  auto upload = OpenStream(path, "once");
  upload->writer->WritesDone();
  ASSERT_TRUE(upload->writer->Finish().ok());
  EXPECT_EQ(upload->response.artifact().id(), held->artifact_id());
}

}  // namespace
}  // namespace amalgam
