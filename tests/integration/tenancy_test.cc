// Tokens, owners and sharing with the real amalgamd: organisations see only
// what they own or what was shared with them, and ids of others do not leak.
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "client/cpp/client.h"
#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/server_process.h"

namespace amalgam {
namespace {

using ::testing::HasSubstr;

void WriteWeights(const std::string& path, float value) {
  auto writer = core::SafetensorsWriter::Create(
      path, {{"w", core::DType::kF32, {2, 2}}}, {});
  ASSERT_TRUE(writer.ok()) << writer.status();
  const float data[4] = {value, value + 1, value + 2, value + 3};
  ASSERT_TRUE((*writer)
                  ->Append(absl::Span<const uint8_t>(
                      reinterpret_cast<const uint8_t*>(data), sizeof(data)))
                  .ok());
  ASSERT_TRUE((*writer)->Finish().ok());
}

class TenancyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("tenancy-test");
    tokens_ = dir_ + "/tokens";
    std::ofstream(tokens_) << "# test organisations\n"
                           << "alice-token org-a\n"
                           << "bob-token   org-b  # trailing comment\n";
    server_ = std::make_unique<testing::ServerProcess>(
        AMALGAMD_PATH, dir_ + "/data",
        std::vector<std::string>{"--tokens", tokens_});
    ASSERT_TRUE(server_->Start()) << "log: " << server_->log_path();
    alice_ = Connect("alice-token");
    bob_ = Connect("bob-token");
    WriteWeights(dir_ + "/a1.safetensors", 1);
    WriteWeights(dir_ + "/a2.safetensors", 5);
    WriteWeights(dir_ + "/b1.safetensors", 9);
    auto a1 = alice_->Upload(v1::ARTIFACT_KIND_WEIGHTS,
                             dir_ + "/a1.safetensors", "a1", "");
    auto a2 = alice_->Upload(v1::ARTIFACT_KIND_WEIGHTS,
                             dir_ + "/a2.safetensors", "a2", "");
    auto b1 = bob_->Upload(v1::ARTIFACT_KIND_WEIGHTS, dir_ + "/b1.safetensors",
                           "b1", "");
    ASSERT_TRUE(a1.ok() && a2.ok() && b1.ok());
    a1_ = a1->id();
    a2_ = a2->id();
    b1_ = b1->id();
    EXPECT_EQ(a1->owner(), "org-a");
    EXPECT_EQ(b1->owner(), "org-b");
  }

  std::unique_ptr<client::Client> Connect(const std::string& token) {
    client::ClientOptions options;
    options.address = server_->address();
    options.token = token;
    return *client::Client::Create(options);
  }

  static v1::SubmitJobRequest Merge(const std::string& x,
                                    const std::string& y) {
    v1::SubmitJobRequest request;
    request.mutable_merge()->set_method(v1::MERGE_METHOD_AVERAGE);
    request.mutable_merge()->add_models()->set_weights_id(x);
    request.mutable_merge()->add_models()->set_weights_id(y);
    return request;
  }

  v1::ShareArtifactRequest Share(const std::string& id, const std::string& org,
                                 bool revoke = false) {
    v1::ShareArtifactRequest request;
    request.set_id(id);
    request.set_organization(org);
    request.set_revoke(revoke);
    return request;
  }

  std::string dir_, tokens_, a1_, a2_, b1_;
  std::unique_ptr<testing::ServerProcess> server_;
  std::unique_ptr<client::Client> alice_, bob_;
};

TEST_F(TenancyTest, MissingOrUnknownTokenIsUnauthenticated) {
  auto anonymous = Connect("");
  EXPECT_EQ(anonymous->ListArtifacts().status().code(),
            absl::StatusCode::kUnauthenticated);
  auto stranger = Connect("mallory-token");
  auto listed = stranger->ListArtifacts();
  EXPECT_EQ(listed.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(listed.status().message(), HasSubstr("unknown bearer token"));
  auto upload = stranger->Upload(v1::ARTIFACT_KIND_WEIGHTS,
                                 dir_ + "/a1.safetensors", "x", "");
  EXPECT_EQ(upload.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(stranger->WatchJob("job_x").status().code(),
            absl::StatusCode::kUnauthenticated);
}

TEST_F(TenancyTest, AnotherOrganisationsIdsLookUnknown) {
  auto theirs = bob_->GetArtifact(a1_);
  auto unknown = bob_->GetArtifact("art_0000000000000000");
  EXPECT_EQ(theirs.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(theirs.status().message(),
            absl::StrCat("artifact ", a1_, " not found"));
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(bob_->Download(a1_, dir_ + "/stolen").status().code(),
            absl::StatusCode::kNotFound);
  auto listed = bob_->ListArtifacts();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->artifacts_size(), 1);
  EXPECT_EQ(listed->artifacts(0).id(), b1_);
  auto job = bob_->SubmitJob(Merge(b1_, a1_));
  EXPECT_EQ(job.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(job.status().message(), HasSubstr(a1_));
}

TEST_F(TenancyTest, SharingGrantsReadAndResultsBelongToTheSubmitter) {
  ASSERT_TRUE(alice_->ShareArtifact(Share(a1_, "org-b")).ok());
  auto shared = bob_->GetArtifact(a1_);
  ASSERT_TRUE(shared.ok()) << shared.status();
  EXPECT_EQ(shared->shared_with_size(), 0) << "only the owner sees grants";
  EXPECT_EQ(alice_->GetArtifact(a1_)->shared_with(0), "org-b");

  auto job = bob_->SubmitJob(Merge(b1_, a1_));
  ASSERT_TRUE(job.ok()) << job.status();
  auto done = bob_->WatchJob(job->id());
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_EQ(done->state(), v1::JOB_STATE_SUCCEEDED) << done->error_message();
  const std::string result = done->result_ids(0);
  EXPECT_EQ(bob_->GetArtifact(result)->owner(), "org-b");
  // The other organisation sees neither the job nor its result.
  EXPECT_EQ(alice_->GetJob(job->id()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(alice_->GetArtifact(result).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(alice_->ListJobs()->jobs_size(), 0);

  // Read-only: the grantee may neither delete nor re-share.
  v1::DeleteArtifactRequest remove;
  remove.set_id(a1_);
  auto denied = bob_->DeleteArtifact(remove);
  EXPECT_EQ(denied.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(bob_->ShareArtifact(Share(a1_, "org-c")).status().code(),
            absl::StatusCode::kPermissionDenied);

  ASSERT_TRUE(alice_->ShareArtifact(Share(a1_, "org-b", true)).ok());
  EXPECT_EQ(bob_->GetArtifact(a1_).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(bob_->SubmitJob(Merge(b1_, a1_)).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(TenancyTest, OwnerDeletesAnArtifact) {
  v1::DeleteArtifactRequest remove;
  remove.set_id(a2_);
  ASSERT_TRUE(alice_->DeleteArtifact(remove).ok());
  EXPECT_EQ(alice_->GetArtifact(a2_).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(alice_->DeleteArtifact(remove).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(alice_->GetArtifact(a1_).ok());
}

TEST_F(TenancyTest, SighupReloadsTheTokenFile) {
  std::ofstream(tokens_, std::ios::app) << "carol-token org-c\n";
  auto carol = Connect("carol-token");
  EXPECT_EQ(carol->ListArtifacts().status().code(),
            absl::StatusCode::kUnauthenticated);
  server_->Signal(SIGHUP);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(30);
  absl::Status status;
  do {
    status = carol->ListArtifacts().status();
    if (status.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  } while (std::chrono::steady_clock::now() < deadline);
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_EQ(carol->ListArtifacts()->artifacts_size(), 0);
}

TEST(ListenTest, NonLoopbackWithoutTokensIsRefused) {
  const std::string dir = testing::MakeTempDir("listen-test");
  testing::ServerProcess server(AMALGAMD_PATH, dir + "/data");
  EXPECT_EQ(
      server.RunToExit({"--listen", "0.0.0.0:0", "--data-dir", dir + "/data"}),
      1);
  std::ifstream log(server.log_path());
  std::string text((std::istreambuf_iterator<char>(log)),
                   std::istreambuf_iterator<char>());
  EXPECT_THAT(text, HasSubstr("not a loopback address"));
}

TEST(ListenTest, PlaintextTokensBeyondLoopbackNeedTheirFlagAndAreLogged) {
  const std::string dir = testing::MakeTempDir("plaintext-test");
  const std::string tokens = dir + "/tokens";
  std::ofstream(tokens) << "secret-token org-a\n";
  testing::ServerProcess refused(AMALGAMD_PATH, dir + "/data");
  EXPECT_EQ(
      refused.RunToExit({"--listen", "0.0.0.0:0", "--data-dir", dir + "/data",
                         "--tokens", tokens, "--metrics-listen", ""}),
      1);
  std::ifstream log(refused.log_path());
  EXPECT_THAT(std::string(std::istreambuf_iterator<char>(log), {}),
              HasSubstr("bearer tokens would cross the network in plaintext"));

  testing::ServerProcess allowed(AMALGAMD_PATH, dir + "/data",
                                 {"--listen", "0.0.0.0:0", "--tokens", tokens,
                                  "--allow-plaintext-tokens"});
  ASSERT_TRUE(allowed.Start());
  std::ifstream allowed_log(allowed.log_path());
  EXPECT_THAT(std::string(std::istreambuf_iterator<char>(allowed_log), {}),
              HasSubstr("event=plaintext_tokens listen=0.0.0.0:0"));
  EXPECT_EQ(allowed.Stop(), 0);
}

TEST(ListenTest, ExampleTokensAreRefused) {
  const std::string dir = testing::MakeTempDir("example-tokens-test");
  std::ofstream(dir + "/tokens") << "# example\nchange-me-alice org-a\n";
  testing::ServerProcess server(AMALGAMD_PATH, dir + "/data");
  EXPECT_EQ(
      server.RunToExit({"--listen", "127.0.0.1:0", "--data-dir", dir + "/data",
                        "--tokens", dir + "/tokens", "--metrics-listen", ""}),
      1);
  std::ifstream log(server.log_path());
  EXPECT_THAT(std::string(std::istreambuf_iterator<char>(log), {}),
              HasSubstr("/tokens:2: an example token (change-me...) is not a "
                        "secret"));
}

}  // namespace
}  // namespace amalgam
