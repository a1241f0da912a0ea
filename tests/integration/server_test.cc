// The real amalgamd binary over real gRPC on loopback: uploads, merges with
// every method checked against a float64 reference computed here, downloads,
// and the bad inputs the service must refuse while it keeps serving.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "client/cpp/client.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/server_process.h"

namespace amalgam {
namespace {

using ::testing::HasSubstr;

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<double> values;  // float32-representable
};
using Model = std::map<std::string, Tensor>;

constexpr int kIn = 5, kHidden = 7, kOut = 3;

// Writes `model` as F32 safetensors.
void WriteModel(const std::string& path, const Model& model,
                const std::map<std::string, std::string>& metadata = {}) {
  std::vector<core::TensorSpec> specs;
  for (const auto& [name, t] : model) {
    specs.push_back({name, core::DType::kF32, t.shape});
  }
  auto writer = core::SafetensorsWriter::Create(path, specs, metadata);
  ASSERT_TRUE(writer.ok()) << writer.status();
  for (const auto& [name, t] : model) {
    std::vector<float> data(t.values.begin(), t.values.end());
    ASSERT_TRUE((*writer)
                    ->Append(absl::Span<const uint8_t>(
                        reinterpret_cast<const uint8_t*>(data.data()),
                        data.size() * sizeof(float)))
                    .ok());
  }
  ASSERT_TRUE((*writer)->Finish().ok());
}

Model ReadModel(const std::string& path) {
  auto reader = core::SafetensorsReader::Open(path);
  EXPECT_TRUE(reader.ok()) << reader.status();
  Model model;
  if (!reader.ok()) return model;
  for (const core::TensorInfo& info : (*reader)->tensors()) {
    EXPECT_EQ(info.dtype, core::DType::kF32) << info.name;
    Tensor t{info.shape, std::vector<double>(info.numel)};
    const uint8_t* data = (*reader)->Data(info).data();
    for (int64_t i = 0; i < info.numel; ++i) {
      float v;
      std::memcpy(&v, data + 4 * i, 4);
      t.values[i] = v;
    }
    model[info.name] = std::move(t);
  }
  return model;
}

Tensor Random(std::vector<int64_t> shape, std::mt19937& rng, double lo,
              double hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  Tensor t{std::move(shape), std::vector<double>(n)};
  for (double& v : t.values) v = dist(rng);
  return t;
}

// G = X^T X for `rows` random input rows of width `in`, rounded to float32.
Tensor RandomGram(int64_t in, int rows, std::mt19937& rng) {
  Tensor x = Random({rows, in}, rng, -1, 1);
  Tensor g{{in, in}, std::vector<double>(in * in, 0.0)};
  for (int64_t a = 0; a < in; ++a) {
    for (int64_t b = 0; b < in; ++b) {
      double sum = 0;
      for (int r = 0; r < rows; ++r)
        sum += x.values[r * in + a] * x.values[r * in + b];
      g.values[a * in + b] = static_cast<float>(sum);
    }
  }
  return g;
}

// Solves A X = B (A n x n symmetric positive definite, B n x m) by Cholesky.
std::vector<double> SolveSpd(std::vector<double> a, std::vector<double> b,
                             int64_t n, int64_t m) {
  for (int64_t j = 0; j < n; ++j) {
    double d = a[j * n + j];
    for (int64_t k = 0; k < j; ++k) d -= a[j * n + k] * a[j * n + k];
    a[j * n + j] = std::sqrt(d);
    for (int64_t i = j + 1; i < n; ++i) {
      double s = a[i * n + j];
      for (int64_t k = 0; k < j; ++k) s -= a[i * n + k] * a[j * n + k];
      a[i * n + j] = s / a[j * n + j];
    }
  }
  for (int64_t c = 0; c < m; ++c) {
    for (int64_t i = 0; i < n; ++i) {  // L y = b
      double s = b[i * m + c];
      for (int64_t k = 0; k < i; ++k) s -= a[i * n + k] * b[k * m + c];
      b[i * m + c] = s / a[i * n + i];
    }
    for (int64_t i = n - 1; i >= 0; --i) {  // L^T x = y
      double s = b[i * m + c];
      for (int64_t k = i + 1; k < n; ++k) s -= a[k * n + i] * b[k * m + c];
      b[i * m + c] = s / a[i * n + i];
    }
  }
  return b;
}

// max |got - want| / max |want| over every tensor.
double MaxRelativeError(const Model& got, const Model& want) {
  double worst = 0;
  for (const auto& [name, w] : want) {
    auto it = got.find(name);
    if (it == got.end() || it->second.values.size() != w.values.size()) {
      ADD_FAILURE() << "result lacks tensor " << name;
      return 1e9;
    }
    double scale = 0, diff = 0;
    for (size_t i = 0; i < w.values.size(); ++i) {
      scale = std::max(scale, std::abs(w.values[i]));
      diff = std::max(diff, std::abs(it->second.values[i] - w.values[i]));
    }
    worst = std::max(worst, diff / std::max(scale, 1e-30));
  }
  return worst;
}

class ServerTest : public ::testing::Test {
 protected:
  // Each suite gets its own server, data directory and models.
  static void SetUpTestSuite() {
    for (auto* v : {&models_, &grams_, &fishers_}) v->clear();
    for (auto* v : {&weight_ids_, &gram_ids_, &fisher_ids_}) v->clear();
    dir_ = new std::string(testing::MakeTempDir("server-test"));
    server_ = new testing::ServerProcess(AMALGAMD_PATH, *dir_ + "/data");
    ASSERT_TRUE(server_->Start())
        << "amalgamd did not start; log " << server_->log_path();
    client::ClientOptions options;
    options.address = server_->address();
    auto client = client::Client::Create(options);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = client->release();

    std::mt19937 rng(20261123);
    for (int i = 0; i < 3; ++i) {
      Model m;
      m["fc1.weight"] = Random({kHidden, kIn}, rng, -1, 1);
      m["fc1.bias"] = Random({kHidden}, rng, -1, 1);
      m["fc2.weight"] = Random({kOut, kHidden}, rng, -1, 1);
      m["fc2.bias"] = Random({kOut}, rng, -1, 1);
      Model gram;
      gram["fc1.weight"] = RandomGram(kIn, 20 + 5 * i, rng);
      gram["fc2.weight"] = RandomGram(kHidden, 20 + 5 * i, rng);
      Model fisher;
      for (const auto& [name, t] : m)
        fisher[name] = Random(t.shape, rng, 0.01, 2);
      models_.push_back(m);
      grams_.push_back(gram);
      fishers_.push_back(fisher);
      const std::string base = *dir_ + "/m" + std::to_string(i);
      WriteModel(base + ".safetensors", m);
      WriteModel(
          base + ".gram.safetensors", gram,
          {{"num_examples", std::to_string(20 + 5 * i)}, {"reduction", "sum"}});
      WriteModel(base + ".fisher.safetensors", fisher, {{"num_examples", "9"}});
      weight_ids_.push_back(
          Upload(v1::ARTIFACT_KIND_WEIGHTS, base + ".safetensors"));
      gram_ids_.push_back(Upload(v1::ARTIFACT_KIND_GRAM,
                                 base + ".gram.safetensors", weight_ids_[i]));
      fisher_ids_.push_back(Upload(v1::ARTIFACT_KIND_FISHER,
                                   base + ".fisher.safetensors",
                                   weight_ids_[i]));
    }
  }

  static void TearDownTestSuite() {
    delete client_;
    delete server_;
    delete dir_;
  }

  static std::string Upload(v1::ArtifactKind kind, const std::string& path,
                            const std::string& describes = "") {
    auto artifact = client_->Upload(kind, path, "test", describes);
    EXPECT_TRUE(artifact.ok()) << artifact.status();
    return artifact.ok() ? artifact->id() : "";
  }

  static absl::StatusOr<v1::Artifact> UploadBytes(
      v1::ArtifactKind kind, const std::string& bytes,
      const std::string& describes = "") {
    static int counter = 0;
    const std::string path = *dir_ + "/raw" + std::to_string(counter++);
    std::ofstream(path, std::ios::binary) << bytes;
    return client_->Upload(kind, path, "raw", describes);
  }

  // Runs a merge to completion and downloads its result.
  static absl::StatusOr<Model> Merge(const v1::MergeSpec& spec) {
    v1::SubmitJobRequest request;
    *request.mutable_merge() = spec;
    absl::StatusOr<v1::Job> job = client_->SubmitJob(request);
    if (!job.ok()) return job.status();
    job = client_->WatchJob(job->id());
    if (!job.ok()) return job.status();
    if (job->state() != v1::JOB_STATE_SUCCEEDED) {
      return absl::Status(static_cast<absl::StatusCode>(job->error_code()),
                          job->error_message());
    }
    const std::string out = *dir_ + "/" + job->id() + ".safetensors";
    auto downloaded = client_->Download(job->result_ids(0), out);
    if (!downloaded.ok()) return downloaded.status();
    return ReadModel(out);
  }

  static v1::MergeSpec Spec(v1::MergeMethod method,
                            std::vector<double> coefficients = {}) {
    v1::MergeSpec spec;
    spec.set_method(method);
    for (size_t i = 0; i < weight_ids_.size(); ++i) {
      v1::MergeModel* m = spec.add_models();
      m->set_weights_id(weight_ids_[i]);
      if (method == v1::MERGE_METHOD_REGMEAN) m->set_gram_id(gram_ids_[i]);
      if (method == v1::MERGE_METHOD_FISHER) m->set_fisher_id(fisher_ids_[i]);
      if (!coefficients.empty()) m->set_coefficient(coefficients[i]);
    }
    return spec;
  }

  static std::vector<double> Normalized(std::vector<double> c) {
    if (c.empty()) c.assign(models_.size(), 1.0);
    double sum = 0;
    for (double v : c) sum += v;
    for (double& v : c) v /= sum;
    return c;
  }

  static Model ReferenceAverage(const std::vector<double>& c) {
    Model out;
    for (const auto& [name, t] : models_[0]) {
      Tensor r{t.shape, std::vector<double>(t.values.size(), 0.0)};
      for (size_t i = 0; i < models_.size(); ++i) {
        for (size_t k = 0; k < r.values.size(); ++k) {
          r.values[k] += c[i] * models_[i].at(name).values[k];
        }
      }
      out[name] = r;
    }
    return out;
  }

  static Model ReferenceRegMean(double alpha) {
    const std::vector<double> c = Normalized({});
    Model out = ReferenceAverage(c);
    for (const auto& [name, g0] : grams_[0]) {
      const int64_t n = g0.shape[0];
      const int64_t m = models_[0].at(name).shape[0];
      std::vector<double> a(n * n, 0.0), b(n * m, 0.0);
      for (size_t i = 0; i < models_.size(); ++i) {
        const auto& g = grams_[i].at(name).values;
        const auto& w = models_[i].at(name).values;  // m x n
        for (int64_t p = 0; p < n; ++p) {
          for (int64_t q = 0; q < n; ++q) {
            const double gt = p == q ? g[p * n + q] : alpha * g[p * n + q];
            a[p * n + q] += c[i] * gt;
            for (int64_t o = 0; o < m; ++o)
              b[p * m + o] += c[i] * gt * w[o * n + q];
          }
        }
      }
      std::vector<double> x = SolveSpd(a, b, n, m);  // n x m = W^T
      Tensor& r = out[name];
      for (int64_t o = 0; o < m; ++o) {
        for (int64_t p = 0; p < n; ++p) r.values[o * n + p] = x[p * m + o];
      }
    }
    return out;
  }

  static std::string* dir_;
  static testing::ServerProcess* server_;
  static client::Client* client_;
  static std::vector<Model> models_, grams_, fishers_;
  static std::vector<std::string> weight_ids_, gram_ids_, fisher_ids_;
};

std::string* ServerTest::dir_ = nullptr;
testing::ServerProcess* ServerTest::server_ = nullptr;
client::Client* ServerTest::client_ = nullptr;
std::vector<Model> ServerTest::models_, ServerTest::grams_,
    ServerTest::fishers_;
std::vector<std::string> ServerTest::weight_ids_, ServerTest::gram_ids_,
    ServerTest::fisher_ids_;

TEST_F(ServerTest, AverageMatchesFloat64Reference) {
  auto merged = Merge(Spec(v1::MERGE_METHOD_AVERAGE));
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_LE(MaxRelativeError(*merged, ReferenceAverage(Normalized({}))), 1e-5);
}

// Runs a sweep of models 0 and 1 to completion.
absl::StatusOr<v1::Job> Sweep(client::Client* client, const std::string& a,
                              const std::string& b, int steps) {
  v1::SubmitJobRequest request;
  request.mutable_sweep()->set_a_id(a);
  request.mutable_sweep()->set_b_id(b);
  request.mutable_sweep()->set_steps(steps);
  request.mutable_sweep()->set_result_name("curve");
  absl::StatusOr<v1::Job> job = client->SubmitJob(request);
  if (!job.ok()) return job;
  return client->WatchJob(job->id());
}

TEST_F(ServerTest, SweepEndpointsAreTheInputsAndItsPointsInterpolate) {
  auto job = Sweep(client_, weight_ids_[0], weight_ids_[1], 5);
  ASSERT_TRUE(job.ok()) << job.status();
  ASSERT_EQ(job->state(), v1::JOB_STATE_SUCCEEDED) << job->error_message();
  ASSERT_EQ(job->result_ids_size(), 5);
  EXPECT_EQ(job->progress().tensors_done(), 5 * 4);
  std::vector<std::string> paths;
  for (int k = 0; k < 5; ++k) {
    auto artifact = client_->GetArtifact(job->result_ids(k));
    ASSERT_TRUE(artifact.ok()) << artifact.status();
    EXPECT_EQ(artifact->name(),
              absl::StrCat("curve-t", std::vector<std::string>{
                                          "0.0000", "0.2500", "0.5000",
                                          "0.7500", "1.0000"}[k]));
    paths.push_back(*dir_ + "/" + artifact->id() + ".safetensors");
    ASSERT_TRUE(client_->Download(artifact->id(), paths.back()).ok());
  }
  // Endpoints: the inputs' tensors, bit for bit.
  for (const auto& [result, input] :
       {std::pair{paths[0], *dir_ + "/m0.safetensors"},
        std::pair{paths[4], *dir_ + "/m1.safetensors"}}) {
    auto got = core::SafetensorsReader::Open(result);
    auto want = core::SafetensorsReader::Open(input);
    ASSERT_TRUE(got.ok() && want.ok());
    ASSERT_EQ((*got)->tensors().size(), (*want)->tensors().size());
    for (const core::TensorInfo& tensor : (*want)->tensors()) {
      const core::TensorInfo* found = (*got)->Find(tensor.name);
      ASSERT_NE(found, nullptr) << tensor.name;
      const auto a = (*got)->Data(*found);
      const auto b = (*want)->Data(tensor);
      EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end()))
          << result << ": " << tensor.name;
    }
  }
  // Midpoint: the average merge, bit for bit.
  v1::MergeSpec average = Spec(v1::MERGE_METHOD_AVERAGE);
  average.mutable_models()->RemoveLast();
  auto merged = Merge(average);
  ASSERT_TRUE(merged.ok()) << merged.status();
  const Model midpoint = ReadModel(paths[2]);
  for (const auto& [name, t] : *merged) {
    EXPECT_EQ(midpoint.at(name).values, t.values) << name;
  }
  // Inner points against float64.
  for (int k : {1, 3}) {
    const double t = k / 4.0;
    Model want;
    for (const auto& [name, a] : models_[0]) {
      Tensor r = a;
      for (size_t i = 0; i < r.values.size(); ++i) {
        r.values[i] = (1 - t) * a.values[i] + t * models_[1].at(name).values[i];
      }
      want[name] = r;
    }
    EXPECT_LE(MaxRelativeError(ReadModel(paths[k]), want), 1e-6) << "t=" << t;
  }
}

TEST_F(ServerTest, BadSweepsAreRefusedAtSubmission) {
  auto one = Sweep(client_, weight_ids_[0], weight_ids_[1], 1);
  EXPECT_EQ(one.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(one.status().message(), HasSubstr("sweep.steps"));
  auto gram = Sweep(client_, weight_ids_[0], gram_ids_[1], 3);
  EXPECT_EQ(gram.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(gram.status().message(), HasSubstr("sweep.b_id"));
  auto missing = Sweep(client_, weight_ids_[0], "art_0000000000000000", 3);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ServerTest, WeightedMatchesFloat64Reference) {
  auto merged = Merge(Spec(v1::MERGE_METHOD_WEIGHTED, {1, 2, 5}));
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_LE(MaxRelativeError(*merged, ReferenceAverage(Normalized({1, 2, 5}))),
            1e-5);
}

TEST_F(ServerTest, FisherMatchesFloat64Reference) {
  auto merged = Merge(Spec(v1::MERGE_METHOD_FISHER));
  ASSERT_TRUE(merged.ok()) << merged.status();
  Model want;
  for (const auto& [name, t] : models_[0]) {
    Tensor r{t.shape, std::vector<double>(t.values.size())};
    for (size_t k = 0; k < r.values.size(); ++k) {
      double num = 0, den = 0;
      for (size_t i = 0; i < models_.size(); ++i) {
        num += fishers_[i].at(name).values[k] * models_[i].at(name).values[k];
        den += fishers_[i].at(name).values[k];
      }
      r.values[k] = num / den;
    }
    want[name] = r;
  }
  EXPECT_LE(MaxRelativeError(*merged, want), 1e-5);
}

TEST_F(ServerTest, RegMeanMatchesNormalEquations) {
  for (double alpha : {0.9, 1.0, 0.0}) {
    v1::MergeSpec spec = Spec(v1::MERGE_METHOD_REGMEAN);
    spec.set_alpha(alpha);
    auto merged = Merge(spec);
    ASSERT_TRUE(merged.ok()) << merged.status();
    EXPECT_LE(MaxRelativeError(*merged, ReferenceRegMean(alpha)), 1e-5)
        << "alpha " << alpha;
  }
}

TEST_F(ServerTest, WatchReportsProgressUntilSucceeded) {
  v1::SubmitJobRequest request;
  *request.mutable_merge() = Spec(v1::MERGE_METHOD_AVERAGE);
  auto job = client_->SubmitJob(request);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->progress().tensors_total(), 4);
  std::vector<v1::JobEvent> events;
  auto final_job = client_->WatchJob(
      job->id(), [&](const v1::JobEvent& e) { events.push_back(e); });
  ASSERT_TRUE(final_job.ok()) << final_job.status();
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().job().state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(events.back().job().progress().tensors_done(), 4);
  // States in order, counters that never decrease (test_operations.py also
  // sees the RUNNING events in between, with a step delay).
  for (size_t i = 1; i < events.size(); ++i) {
    const v1::Job& before = events[i - 1].job();
    const v1::Job& now = events[i].job();
    EXPECT_LE(before.state(), now.state()) << "event " << i;
    EXPECT_LE(before.progress().tensors_done(), now.progress().tensors_done());
    EXPECT_LE(before.progress().bytes_done(), now.progress().bytes_done());
  }
  EXPECT_EQ(final_job->result_ids_size(), 1);
  auto listed = client_->ListJobs();
  ASSERT_TRUE(listed.ok());
  EXPECT_GE(listed->jobs_size(), 1);
}

TEST_F(ServerTest, UploadedArtifactIsListedWithItsTensors) {
  auto artifact = client_->GetArtifact(gram_ids_[0]);
  ASSERT_TRUE(artifact.ok()) << artifact.status();
  EXPECT_EQ(artifact->kind(), v1::ARTIFACT_KIND_GRAM);
  EXPECT_EQ(artifact->describes(), weight_ids_[0]);
  EXPECT_EQ(artifact->metadata().at("num_examples"), "20");
  ASSERT_EQ(artifact->tensors_size(), 2);
  EXPECT_EQ(artifact->tensors(0).name(), "fc1.weight");
  auto sha = core::Sha256File(*dir_ + "/m0.gram.safetensors");
  EXPECT_EQ(artifact->sha256(), *sha);
  auto list = client_->ListArtifacts();
  ASSERT_TRUE(list.ok());
  EXPECT_GE(list->artifacts_size(), 9);
}

// --- Bad input: each refused with the fitting code and a message that says
// what is wrong; the server keeps serving afterwards (checked in TearDown).

class ServerBadInputTest : public ServerTest {
 protected:
  void TearDown() override {
    auto list = client_->ListArtifacts();
    EXPECT_TRUE(list.ok()) << "server stopped serving: " << list.status();
  }
};

TEST_F(ServerBadInputTest, TruncatedHeaderIsInvalidArgument) {
  auto r =
      UploadBytes(v1::ARTIFACT_KIND_WEIGHTS, std::string("\x10\x00\x00", 3));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("not a valid safetensors file"));
}

TEST_F(ServerBadInputTest, CorruptJsonHeaderIsInvalidArgument) {
  std::string bytes(8, '\0');
  bytes[0] = 8;
  bytes += "{\"a\":[1,";
  auto r = UploadBytes(v1::ARTIFACT_KIND_WEIGHTS, bytes);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

std::string SafetensorsBytes(const std::string& header_json,
                             const std::string& data) {
  std::string bytes(8, '\0');
  const uint64_t n = header_json.size();
  std::memcpy(bytes.data(), &n, 8);
  return bytes + header_json + data;
}

TEST_F(ServerBadInputTest, OffsetsPastEndOfFileAreInvalidArgument) {
  auto r = UploadBytes(
      v1::ARTIFACT_KIND_WEIGHTS,
      SafetensorsBytes(
          R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
          std::string(8, '\0')));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("\"w\""));
}

TEST_F(ServerBadInputTest, UnknownDtypeIsInvalidArgument) {
  auto r = UploadBytes(
      v1::ARTIFACT_KIND_WEIGHTS,
      SafetensorsBytes(
          R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})",
          std::string(8, '\0')));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("Q4"));
}

TEST_F(ServerBadInputTest, NanInWeightsIsInvalidArgumentNamingTensor) {
  Model m = models_[0];
  m["fc2.bias"].values[1] = std::nan("");
  WriteModel(*dir_ + "/nan.safetensors", m);
  auto r = client_->Upload(v1::ARTIFACT_KIND_WEIGHTS,
                           *dir_ + "/nan.safetensors", "nan", "");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("fc2.bias"));
}

TEST_F(ServerBadInputTest, Sha256MismatchIsDataLoss) {
  // A raw stream whose header declares another file's digest.
  auto channel = grpc::CreateChannel(server_->address(),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::ArtifactService::NewStub(channel);
  grpc::ClientContext context;
  v1::UploadResponse response;
  auto writer = stub->Upload(&context, &response);
  const std::string data = SafetensorsBytes("{}      ", "");
  v1::UploadRequest header;
  header.mutable_header()->set_kind(v1::ARTIFACT_KIND_WEIGHTS);
  header.mutable_header()->set_name("liar");
  header.mutable_header()->set_size_bytes(static_cast<int64_t>(data.size()));
  header.mutable_header()->set_sha256(std::string(64, 'a'));
  ASSERT_TRUE(writer->Write(header));
  v1::UploadRequest chunk;
  chunk.mutable_chunk()->set_offset(0);
  chunk.mutable_chunk()->set_data(data);
  ASSERT_TRUE(writer->Write(chunk));
  writer->WritesDone();
  grpc::Status status = writer->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_THAT(status.error_message(), HasSubstr("sha256"));
}

TEST_F(ServerBadInputTest, NonSquareGramIsInvalidArgument) {
  Model gram;
  gram["fc1.weight"] =
      Tensor{{kIn, kIn + 1}, std::vector<double>(kIn * (kIn + 1), 1.0)};
  WriteModel(*dir_ + "/nonsquare.safetensors", gram);
  auto r = client_->Upload(v1::ARTIFACT_KIND_GRAM,
                           *dir_ + "/nonsquare.safetensors", "g", "");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("fc1.weight"));
}

TEST_F(ServerBadInputTest, GramOfWrongSizeForItsWeightIsFailedPrecondition) {
  Model gram;
  gram["fc1.weight"] =
      Tensor{{kHidden, kHidden}, std::vector<double>(kHidden * kHidden, 0.5)};
  WriteModel(*dir_ + "/wrongsize.safetensors", gram);
  // Refused at upload when it names its weights ...
  auto r =
      client_->Upload(v1::ARTIFACT_KIND_GRAM, *dir_ + "/wrongsize.safetensors",
                      "g", weight_ids_[0]);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("fc1.weight"));
  // ... and at submission when it does not.
  auto unbound = client_->Upload(v1::ARTIFACT_KIND_GRAM,
                                 *dir_ + "/wrongsize.safetensors", "g", "");
  ASSERT_TRUE(unbound.ok()) << unbound.status();
  v1::MergeSpec spec = Spec(v1::MERGE_METHOD_REGMEAN);
  spec.mutable_models(1)->set_gram_id(unbound->id());
  auto merged = Merge(spec);
  EXPECT_EQ(merged.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(merged.status().message(), HasSubstr("fc1.weight"));
}

TEST_F(ServerBadInputTest, RegMeanWithoutGramForAModelIsFailedPrecondition) {
  // Weights (model 2's, one value changed: another content, another id)
  // that no Gram was uploaded for. (A model whose gram_id is empty uses the
  // Gram uploaded for it, if there is one.)
  Model other = models_[2];
  other["fc1.bias"].values[0] += 1;
  WriteModel(*dir_ + "/no-gram.safetensors", other);
  const std::string unlinked =
      Upload(v1::ARTIFACT_KIND_WEIGHTS, *dir_ + "/no-gram.safetensors");
  v1::MergeSpec spec = Spec(v1::MERGE_METHOD_REGMEAN);
  spec.mutable_models(2)->set_weights_id(unlinked);
  spec.mutable_models(2)->clear_gram_id();
  auto merged = Merge(spec);
  EXPECT_EQ(merged.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(merged.status().message(), HasSubstr(unlinked));
}

TEST_F(ServerBadInputTest, ShapeMismatchNamesTensorAndBothShapes) {
  Model other = models_[0];
  other["fc2.bias"] = Tensor{{kOut + 1}, std::vector<double>(kOut + 1, 0.25)};
  WriteModel(*dir_ + "/other.safetensors", other);
  const std::string id =
      Upload(v1::ARTIFACT_KIND_WEIGHTS, *dir_ + "/other.safetensors");
  v1::MergeSpec spec = Spec(v1::MERGE_METHOD_AVERAGE);
  spec.mutable_models(1)->set_weights_id(id);
  auto merged = Merge(spec);
  EXPECT_EQ(merged.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(merged.status().message(), HasSubstr("fc2.bias"));
  EXPECT_THAT(merged.status().message(), HasSubstr("[3]"));
  EXPECT_THAT(merged.status().message(), HasSubstr("[4]"));
  // Excluding the differing tensor lets the merge through.
  spec.add_exclude("fc2\\.bias");
  auto excluded = Merge(spec);
  ASSERT_TRUE(excluded.ok()) << excluded.status();
  EXPECT_EQ(excluded->count("fc2.bias"), 0u);
  EXPECT_EQ(excluded->count("fc2.weight"), 1u);
}

TEST_F(ServerBadInputTest, FewerThanTwoModelsIsInvalidArgument) {
  v1::MergeSpec spec = Spec(v1::MERGE_METHOD_AVERAGE);
  spec.mutable_models()->DeleteSubrange(1, 2);
  auto merged = Merge(spec);
  EXPECT_EQ(merged.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(merged.status().message(), HasSubstr("two models"));
}

TEST_F(ServerBadInputTest, UnknownArtifactIsNotFound) {
  v1::MergeSpec spec = Spec(v1::MERGE_METHOD_AVERAGE);
  spec.mutable_models(0)->set_weights_id("art_doesnotexist");
  auto merged = Merge(spec);
  EXPECT_EQ(merged.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(merged.status().message(), HasSubstr("art_doesnotexist"));
  auto got = client_->GetArtifact("art_nope");
  EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound);
  auto download = client_->Download("art_nope", *dir_ + "/nope");
  EXPECT_EQ(download.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ServerBadInputTest, StatisticsAsWeightsAreInvalidArgument) {
  v1::MergeSpec spec = Spec(v1::MERGE_METHOD_AVERAGE);
  spec.mutable_models(0)->set_weights_id(gram_ids_[0]);
  auto merged = Merge(spec);
  EXPECT_EQ(merged.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(merged.status().message(), HasSubstr("ARTIFACT_KIND_GRAM"));
}

// Restarting on the same data directory keeps artifacts and finished jobs.
TEST(ServerRestartTest, ArtifactsAndJobsSurviveRestart) {
  const std::string dir = testing::MakeTempDir("restart-test");
  std::mt19937 rng(7);
  Model m;
  m["w"] = Random({4, 4}, rng, -1, 1);
  WriteModel(dir + "/a.safetensors", m);
  m["w"] = Random({4, 4}, rng, -1, 1);
  WriteModel(dir + "/b.safetensors", m);
  std::string a_id, job_id;
  {
    testing::ServerProcess server(AMALGAMD_PATH, dir + "/data");
    ASSERT_TRUE(server.Start());
    client::ClientOptions options;
    options.address = server.address();
    auto client = *client::Client::Create(options);
    auto a = client->Upload(v1::ARTIFACT_KIND_WEIGHTS, dir + "/a.safetensors",
                            "a", "");
    auto b = client->Upload(v1::ARTIFACT_KIND_WEIGHTS, dir + "/b.safetensors",
                            "b", "");
    ASSERT_TRUE(a.ok() && b.ok());
    a_id = a->id();
    v1::SubmitJobRequest request;
    request.mutable_merge()->set_method(v1::MERGE_METHOD_AVERAGE);
    request.mutable_merge()->add_models()->set_weights_id(a->id());
    request.mutable_merge()->add_models()->set_weights_id(b->id());
    auto job = client->SubmitJob(request);
    ASSERT_TRUE(job.ok()) << job.status();
    job_id = job->id();
    ASSERT_EQ(client->WatchJob(job_id)->state(), v1::JOB_STATE_SUCCEEDED);
    EXPECT_EQ(server.Stop(), 0);
  }
  testing::ServerProcess server(AMALGAMD_PATH, dir + "/data");
  ASSERT_TRUE(server.Start());
  client::ClientOptions options;
  options.address = server.address();
  auto client = *client::Client::Create(options);
  auto a = client->GetArtifact(a_id);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->sha256(), *core::Sha256File(dir + "/a.safetensors"));
  auto job = client->GetJob(job_id);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), v1::JOB_STATE_SUCCEEDED);
  auto result =
      client->Download(job->result_ids(0), dir + "/result.safetensors");
  EXPECT_TRUE(result.ok()) << result.status();
}

}  // namespace
}  // namespace amalgam
