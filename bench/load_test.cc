// Load test: C clients of 2 organisations upload, merge, download and probe
// each other's ids against a real amalgamd on loopback for a fixed time, then
// every artifact is checked. Prints a markdown table of latencies and
// throughput; exits 1 if any artifact was lost or corrupted, a merge was
// wrong, or an organisation could read the other's artifact.
//
//   load_test [--seconds 60] [--clients 32] [--dir DIR] [--amalgamd PATH]
//             [--replicas 1] [--catalog sqlite|postgresql://...]
//
// With --replicas N the clients spread over N replicas on one data directory
// and the --catalog (PostgreSQL for N > 1); client i talks to replica i % N.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cpp/client.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "tests/integration/server_process.h"

ABSL_FLAG(int, seconds, 60, "how long the clients run");
ABSL_FLAG(int, clients, 32, "concurrent clients (alternating organisations)");
ABSL_FLAG(std::string, dir, "build/load-test", "scratch directory");
ABSL_FLAG(std::string, amalgamd, "build/bin/amalgamd", "server binary");
ABSL_FLAG(int, replicas, 1, "replicas sharing the data directory and catalog");
ABSL_FLAG(std::string, catalog, "sqlite",
          "the replicas' --catalog (postgresql://... for more than one)");

namespace {

namespace fs = std::filesystem;
namespace v1 = amalgam::v1;
namespace core = amalgam::core;
using Clock = std::chrono::steady_clock;

constexpr int kTensors = 4;
constexpr int64_t kElements = 4096;  // 16 KiB per tensor, 64 KiB per model
constexpr int kOrgs = 2;

// Element j of tensor t of the model with `seed`: a hash of the three (so
// every model has distinct content) as a multiple of 1/8, so the average of
// two is exact in float.
float Value(uint64_t seed, int t, int64_t j) {
  uint64_t x = seed * 0x9e3779b97f4a7c15u + (static_cast<uint64_t>(t) << 32) +
               static_cast<uint64_t>(j);
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9u;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebu;
  return static_cast<float>((x ^ (x >> 31)) % 4096) / 8;
}

void WriteModel(const std::string& path, uint64_t seed) {
  std::vector<core::TensorSpec> specs;
  for (int t = 0; t < kTensors; ++t) {
    specs.push_back({absl::StrCat("t", t), core::DType::kF32, {kElements}});
  }
  auto writer = core::SafetensorsWriter::Create(path, specs, {});
  std::vector<float> data(kElements);
  for (int t = 0; t < kTensors; ++t) {
    for (int64_t j = 0; j < kElements; ++j) data[j] = Value(seed, t, j);
    (*writer)
        ->Append(absl::Span<const uint8_t>(
            reinterpret_cast<const uint8_t*>(data.data()),
            data.size() * sizeof(float)))
        .IgnoreError();
  }
  (*writer)->Finish().IgnoreError();
}

// True if the file holds the exact average of the models `a` and `b`.
bool IsAverage(const std::string& path, uint64_t a, uint64_t b) {
  auto reader = core::SafetensorsReader::Open(path);
  if (!reader.ok() || (*reader)->tensors().size() != kTensors) return false;
  for (int t = 0; t < kTensors; ++t) {
    const core::TensorInfo* info = (*reader)->Find(absl::StrCat("t", t));
    if (info == nullptr) return false;
    const auto* values =
        reinterpret_cast<const float*>((*reader)->Data(*info).data());
    for (int64_t j = 0; j < kElements; ++j) {
      if (values[j] != (Value(a, t, j) + Value(b, t, j)) / 2) return false;
    }
  }
  return true;
}

struct Stored {
  std::string id;
  std::string sha256;
};

// What the clients stored, per organisation, and what went wrong.
struct Ledger {
  std::mutex mu;
  std::vector<Stored> artifacts[kOrgs];
  std::atomic<int> lost{0}, corrupted{0}, wrong_merges{0}, cross_reads{0},
      limited{0}, errors{0};
  std::string first_error;

  void Error(const std::string& what) {
    ++errors;
    std::lock_guard<std::mutex> lock(mu);
    if (first_error.empty()) first_error = what;
  }
};

struct Latencies {
  std::map<std::string, std::vector<double>> ms;  // by operation
  int64_t bytes = 0;                              // uploaded + downloaded
};

double Ms(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start)
      .count();
}

void RunClient(int index, const std::string& address, const std::string& dir,
               Clock::time_point deadline, Ledger* ledger, Latencies* out) {
  const int org = index % kOrgs;
  amalgam::client::ClientOptions options;
  options.address = address;
  options.token = absl::StrCat("token-", org);
  auto client = *amalgam::client::Client::Create(options);
  std::mt19937_64 rng(index);
  std::vector<std::pair<Stored, uint64_t>> mine;  // artifact, model seed
  const std::string scratch = absl::StrCat(dir, "/client-", index);
  fs::create_directories(scratch);
  for (int iteration = 0; Clock::now() < deadline; ++iteration) {
    // Upload a fresh model.
    const uint64_t seed = (static_cast<uint64_t>(index) << 32) | iteration;
    const std::string path = scratch + "/model.safetensors";
    WriteModel(path, seed);
    auto start = Clock::now();
    auto artifact = client->Upload(v1::ARTIFACT_KIND_WEIGHTS, path,
                                   absl::StrCat("m", seed), "");
    if (!artifact.ok()) {
      if (absl::IsResourceExhausted(artifact.status())) {
        ++ledger->limited;
      } else {
        ledger->Error(artifact.status().ToString());
      }
      continue;
    }
    out->ms["upload"].push_back(Ms(start));
    out->bytes += artifact->size_bytes();
    Stored stored{artifact->id(), artifact->sha256()};
    if (stored.sha256 != *core::Sha256File(path)) ++ledger->corrupted;
    mine.emplace_back(stored, seed);
    {
      std::lock_guard<std::mutex> lock(ledger->mu);
      ledger->artifacts[org].push_back(stored);
    }

    // Probe an artifact of the other organisation: it must look unknown.
    std::string theirs;
    {
      std::lock_guard<std::mutex> lock(ledger->mu);
      auto& other = ledger->artifacts[(org + 1) % kOrgs];
      if (!other.empty()) theirs = other[rng() % other.size()].id;
    }
    if (!theirs.empty()) {
      start = Clock::now();
      auto probe = client->GetArtifact(theirs);
      out->ms["get (other org)"].push_back(Ms(start));
      if (probe.ok()) {
        ++ledger->cross_reads;
      } else if (!absl::IsNotFound(probe.status())) {
        ledger->Error(probe.status().ToString());
      }
    }

    // Download one of ours and check its bytes.
    const auto& [pick, pick_seed] = mine[rng() % mine.size()];
    const std::string downloaded = scratch + "/download.safetensors";
    start = Clock::now();
    auto chunk = client->Download(pick.id, downloaded);
    if (chunk.ok()) {
      out->ms["download"].push_back(Ms(start));
      out->bytes += chunk->size_bytes();
      if (*core::Sha256File(downloaded) != pick.sha256) ++ledger->corrupted;
    } else if (absl::IsResourceExhausted(chunk.status())) {
      ++ledger->limited;  // --max-downloads-per-org
    } else {
      ledger->Error(chunk.status().ToString());
    }

    // Every fourth round, merge two of ours and check the result.
    if (iteration % 4 == 3 && mine.size() >= 2) {
      const auto& [a, a_seed] = mine[mine.size() - 1];
      const auto& [b, b_seed] = mine[rng() % (mine.size() - 1)];
      v1::SubmitJobRequest request;
      request.mutable_merge()->set_method(v1::MERGE_METHOD_AVERAGE);
      request.mutable_merge()->add_models()->set_weights_id(a.id);
      request.mutable_merge()->add_models()->set_weights_id(b.id);
      start = Clock::now();
      auto job = client->SubmitJob(request);
      if (!job.ok()) {
        if (absl::IsResourceExhausted(job.status())) {
          ++ledger->limited;
        } else {
          ledger->Error(job.status().ToString());
        }
        continue;
      }
      auto done = client->WatchJob(job->id());
      if (!done.ok() || done->state() != v1::JOB_STATE_SUCCEEDED) {
        ledger->Error(done.ok() ? done->error_message()
                                : done.status().ToString());
        continue;
      }
      out->ms["merge (submit to done)"].push_back(Ms(start));
      const std::string merged = scratch + "/merged.safetensors";
      auto result = client->Download(done->result_ids(0), merged);
      if (!result.ok()) {
        if (absl::IsResourceExhausted(result.status())) {
          ++ledger->limited;
        } else {
          ledger->Error(result.status().ToString());
        }
        continue;
      }
      out->bytes += result->size_bytes();
      if (!IsAverage(merged, a_seed, b_seed)) ++ledger->wrong_merges;
      std::lock_guard<std::mutex> lock(ledger->mu);
      ledger->artifacts[org].push_back({done->result_ids(0), result->sha256()});
    }
  }
}

// After the run: every artifact is listed by its owner only, and its bytes
// still hash to what was stored.
void Audit(const std::string& address, const std::string& dir, Ledger* ledger) {
  for (int org = 0; org < kOrgs; ++org) {
    amalgam::client::ClientOptions options;
    options.address = address;
    options.token = absl::StrCat("token-", org);
    auto client = *amalgam::client::Client::Create(options);
    auto listed = client->ListArtifacts();
    if (!listed.ok()) {
      ledger->Error(listed.status().ToString());
      continue;
    }
    std::map<std::string, std::string> sha_by_id;
    for (const v1::Artifact& artifact : listed->artifacts()) {
      if (artifact.owner() != absl::StrCat("org-", org)) ++ledger->cross_reads;
      sha_by_id[artifact.id()] = artifact.sha256();
    }
    const std::string path = dir + "/audit.safetensors";
    for (const Stored& stored : ledger->artifacts[org]) {
      auto it = sha_by_id.find(stored.id);
      if (it == sha_by_id.end()) {
        ++ledger->lost;
        continue;
      }
      auto chunk = client->Download(stored.id, path);
      if (!chunk.ok() || it->second != stored.sha256 ||
          *core::Sha256File(path) != stored.sha256) {
        ++ledger->corrupted;
      }
    }
  }
}

double Percentile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  const size_t index = static_cast<size_t>(
      std::min<double>(values.size() - 1, std::ceil(q * values.size()) - 1));
  return values[index];
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int seconds = absl::GetFlag(FLAGS_seconds);
  const int clients = absl::GetFlag(FLAGS_clients);
  const std::string dir = absl::GetFlag(FLAGS_dir);
  fs::remove_all(dir);
  fs::create_directories(dir);
  {
    std::ofstream tokens(dir + "/tokens");
    for (int org = 0; org < kOrgs; ++org) {
      tokens << "token-" << org << " org-" << org << "\n";
    }
  }
  const int replicas = absl::GetFlag(FLAGS_replicas);
  const std::string catalog = absl::GetFlag(FLAGS_catalog);
  if (replicas < 1 || (replicas > 1 && catalog == "sqlite")) {
    std::fprintf(stderr, "--replicas > 1 needs a postgresql:// --catalog\n");
    return 2;
  }
  std::vector<std::unique_ptr<amalgam::testing::ServerProcess>> servers;
  std::vector<std::string> addresses;
  for (int r = 0; r < replicas; ++r) {
    servers.push_back(std::make_unique<amalgam::testing::ServerProcess>(
        absl::GetFlag(FLAGS_amalgamd), dir + "/data",
        std::vector<std::string>{"--tokens", dir + "/tokens", "--workers", "2",
                                 "--log-level", "warning", "--catalog",
                                 catalog},
        absl::StrCat("replica-", r)));
    if (!servers.back()->Start()) {
      std::fprintf(stderr, "amalgamd did not start; see %s\n",
                   servers.back()->log_path().c_str());
      return 2;
    }
    addresses.push_back(servers.back()->address());
  }

  Ledger ledger;
  std::vector<Latencies> latencies(clients);
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::seconds(seconds);
  std::vector<std::thread> threads;
  for (int i = 0; i < clients; ++i) {
    threads.emplace_back(RunClient, i, addresses[i % replicas], dir, deadline,
                         &ledger, &latencies[i]);
  }
  for (std::thread& thread : threads) thread.join();
  const double elapsed =
      std::chrono::duration<double>(Clock::now() - start).count();
  Audit(addresses[0], dir, &ledger);

  std::map<std::string, std::vector<double>> all;
  int64_t bytes = 0;
  for (const Latencies& l : latencies) {
    for (const auto& [op, ms] : l.ms) {
      all[op].insert(all[op].end(), ms.begin(), ms.end());
    }
    bytes += l.bytes;
  }
  std::printf(
      "%d clients, %d organisations, %d replica(s) on %s, %.0f s; %zu "
      "artifacts stored\n\n",
      clients, kOrgs, replicas, catalog == "sqlite" ? "SQLite" : "PostgreSQL",
      elapsed, ledger.artifacts[0].size() + ledger.artifacts[1].size());
  std::printf("| operation | count | per second | p50 ms | p99 ms |\n");
  std::printf("|---|---|---|---|---|\n");
  for (const auto& [op, ms] : all) {
    if (ms.empty()) continue;
    std::printf("| %s | %zu | %.1f | %.1f | %.1f |\n", op.c_str(), ms.size(),
                ms.size() / elapsed, Percentile(ms, 0.5), Percentile(ms, 0.99));
  }
  std::printf(
      "\ntransferred %.1f MiB (%.1f MiB/s); lost %d, corrupted %d, wrong "
      "merges %d, cross-tenant reads %d, limited (RESOURCE_EXHAUSTED) %d, "
      "other errors %d\n",
      bytes / 1048576.0, bytes / 1048576.0 / elapsed, ledger.lost.load(),
      ledger.corrupted.load(), ledger.wrong_merges.load(),
      ledger.cross_reads.load(), ledger.limited.load(), ledger.errors.load());
  if (!ledger.first_error.empty()) {
    std::printf("first error: %s\n", ledger.first_error.c_str());
  }
  const bool clean = ledger.lost == 0 && ledger.corrupted == 0 &&
                     ledger.wrong_merges == 0 && ledger.cross_reads == 0 &&
                     ledger.errors == 0;
  return clean ? 0 : 1;
}
