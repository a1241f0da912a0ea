// Upload and download throughput of amalgamd against a bare gRPC stream on
// the same machine, in one run.
//
//   transfer [--mib 1024] [--dir build/transfer] [--runs 3]
//            [--amalgamd build/bin/amalgamd]
//
// Baseline: an in-process callback server whose Upload reads UploadRequest
// chunks (1 MiB, the client library's size) and drops them, over loopback.
// Measured: the real amalgamd (child process) with the C++ client's Upload
// (the file's sha256 is computed first, then streamed; the server writes,
// hashes on a thread of its own, fsyncs, validates and catalogs) and
// Download (written, hashed on a thread of its own, fsynced). Ceilings: the
// same bytes written and fsynced to the same directory, and SHA-256 of
// them (both sides must hash every byte). --dir on a tmpfs takes the disk
// out of the measurement.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "amalgam/v1/amalgam.grpc.pb.h"
#include "client/cpp/client.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "grpcpp/grpcpp.h"
#include "tests/integration/server_process.h"

ABSL_FLAG(int, mib, 1024, "size of the artifact");
ABSL_FLAG(std::string, dir, "build/transfer", "scratch directory");
ABSL_FLAG(std::string, amalgamd, "build/bin/amalgamd", "server binary");
ABSL_FLAG(int, runs, 3, "measurements per row; the median is reported");

namespace {

// Writes back and drops the page cache; false where the kernel refuses.
bool DropPageCache() {
  ::sync();
  std::ofstream drop("/proc/sys/vm/drop_caches");
  drop << "1\n";
  drop.flush();
  return static_cast<bool>(drop);
}

// The bytes this process has read from the disk (read_bytes of
// /proc/self/io), -1 if unknown.
int64_t DiskReadBytes() {
  std::ifstream io("/proc/self/io");
  std::string key;
  int64_t value = -1;
  while (io >> key >> value) {
    if (key == "read_bytes:") return value;
  }
  return -1;
}

namespace v1 = amalgam::v1;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Receives upload streams and drops the bytes: what gRPC alone costs.
class NullUpload final : public v1::ArtifactService::CallbackService {
  grpc::ServerReadReactor<v1::UploadRequest>* Upload(
      grpc::CallbackServerContext*, v1::UploadResponse*) override {
    class Reactor : public grpc::ServerReadReactor<v1::UploadRequest> {
     public:
      Reactor() { StartRead(&request_); }
      void OnReadDone(bool ok) override {
        if (!ok) {
          Finish(grpc::Status::OK);
          return;
        }
        StartRead(&request_);
      }
      void OnDone() override { delete this; }

     private:
      v1::UploadRequest request_;
    };
    return new Reactor();
  }
};

// Streams `bytes` in 1 MiB chunks to `stub`'s Upload; seconds taken.
double BareUpload(v1::ArtifactService::Stub* stub, int64_t bytes) {
  std::string data(1 << 20, 'x');
  const auto start = Clock::now();
  grpc::ClientContext context;
  v1::UploadResponse response;
  auto writer = stub->Upload(&context, &response);
  v1::UploadRequest request;
  request.mutable_header()->set_size_bytes(bytes);
  writer->Write(request);
  for (int64_t offset = 0; offset < bytes; offset += data.size()) {
    request.Clear();
    request.mutable_chunk()->set_offset(offset);
    request.mutable_chunk()->set_data(data);
    if (!writer->Write(request)) break;
  }
  writer->WritesDone();
  writer->Finish().IgnoreError();
  return Seconds(start);
}

// The median of `runs` calls of `measure` (seconds each).
template <typename F>
double Median(int runs, F measure) {
  std::vector<double> seconds;
  for (int i = 0; i < runs; ++i) seconds.push_back(measure(i));
  std::sort(seconds.begin(), seconds.end());
  return seconds[seconds.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t bytes = int64_t{absl::GetFlag(FLAGS_mib)} << 20;
  const std::string dir = absl::GetFlag(FLAGS_dir);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);

  // A safetensors file of one F32 tensor of random values.
  const std::string path = dir + "/model.safetensors";
  {
    auto writer = amalgam::core::SafetensorsWriter::Create(
        path, {{"w", amalgam::core::DType::kF32, {bytes / 4}}}, {});
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> uniform(-1, 1);
    std::vector<float> block(1 << 18);
    for (int64_t done = 0; done < bytes; done += block.size() * 4) {
      for (float& v : block) v = uniform(rng);
      (*writer)
          ->Append(absl::Span<const uint8_t>(
              reinterpret_cast<const uint8_t*>(block.data()), block.size() * 4))
          .IgnoreError();
    }
    (*writer)->Finish().IgnoreError();
  }
  const double mib = static_cast<double>(bytes) / (1 << 20);

  // Baseline: the bare stream.
  NullUpload null_service;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                           &port);
  builder.SetMaxReceiveMessageSize(8 << 20);
  builder.RegisterService(&null_service);
  auto bare = builder.BuildAndStart();
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(16 << 20);
  auto stub = v1::ArtifactService::NewStub(
      grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                grpc::InsecureChannelCredentials(), args));
  const int runs = std::max(1, absl::GetFlag(FLAGS_runs));
  BareUpload(stub.get(), int64_t{64} << 20);  // warm-up
  const double bare_seconds =
      Median(runs, [&](int) { return BareUpload(stub.get(), bytes); });
  bare->Shutdown();

  // amalgamd.
  amalgam::testing::ServerProcess server(absl::GetFlag(FLAGS_amalgamd),
                                         dir + "/data");
  if (!server.Start()) {
    std::fprintf(stderr, "amalgamd did not start; see %s\n",
                 server.log_path().c_str());
    return 2;
  }
  amalgam::client::ClientOptions options;
  options.address = server.address();
  auto client = *amalgam::client::Client::Create(options);
  const double hash_seconds = Median(runs, [&](int) {
    const auto start = Clock::now();
    amalgam::core::Sha256File(path).IgnoreError();
    return Seconds(start);
  });
  // Each upload under a name of its own (a new upload id); the server
  // stores the content once, but receives, hashes and verifies it each time.
  std::string artifact_id;
  bool failed = false;
  const double upload_seconds = Median(runs, [&](int i) {
    const auto start = Clock::now();
    auto artifact = client->Upload(v1::ARTIFACT_KIND_WEIGHTS, path,
                                   absl::StrCat("transfer-", i), "");
    const double seconds = Seconds(start);
    if (!artifact.ok()) {
      std::fprintf(stderr, "upload: %s\n",
                   artifact.status().ToString().c_str());
      failed = true;
    } else {
      artifact_id = artifact->id();
    }
    return seconds;
  });
  const double download_seconds = Median(runs, [&](int) {
    const auto start = Clock::now();
    auto downloaded = client->Download(artifact_id, dir + "/download");
    const double seconds = Seconds(start);
    if (!downloaded.ok()) {
      std::fprintf(stderr, "download: %s\n",
                   downloaded.status().ToString().c_str());
      failed = true;
    }
    std::filesystem::remove(dir + "/download");
    return seconds;
  });
  // Once more from a cold page cache (where the kernel lets us drop it):
  // the bytes this process reads from the disk for one upload.
  double cold_seconds = 0, cold_read_mib = -1;
  if (DropPageCache()) {
    const int64_t before = DiskReadBytes();
    const auto start = Clock::now();
    auto artifact =
        client->Upload(v1::ARTIFACT_KIND_WEIGHTS, path, "transfer-cold", "");
    cold_seconds = Seconds(start);
    failed = failed || !artifact.ok();
    cold_read_mib = (DiskReadBytes() - before) / 1048576.0;
  }
  if (failed) return 1;
  std::printf("| transfer | MiB | seconds | MiB/s | share of bare stream |\n");
  std::printf("|---|---|---|---|---|\n");
  std::printf(
      "| bare gRPC stream (1 MiB chunks, dropped) | %.0f | %.2f | %.0f "
      "| 100%% |\n",
      mib, bare_seconds, mib / bare_seconds);
  std::printf(
      "| amalgam upload (hash, stream, verify, fsync, catalog) | %.0f "
      "| %.2f | %.0f | %.0f%% |\n",
      mib, upload_seconds, mib / upload_seconds,
      100 * bare_seconds / upload_seconds);
  if (cold_read_mib >= 0) {
    std::printf(
        "| amalgam upload, page cache dropped first (%.0f MiB read from the "
        "disk: %.2f per byte) | %.0f | %.2f | %.0f | %.0f%% |\n",
        cold_read_mib, cold_read_mib / mib, mib, cold_seconds,
        mib / cold_seconds, 100 * bare_seconds / cold_seconds);
  }
  std::printf(
      "| amalgam download (stream, fsync, verify) | %.0f | %.2f | %.0f "
      "| %.0f%% |\n",
      mib, download_seconds, mib / download_seconds,
      100 * bare_seconds / download_seconds);
  // The durability floor: the same bytes written and fsynced to the same disk.
  const double floor_seconds = Median(runs, [&](int) {
    const auto start = Clock::now();
    {
      std::ofstream out(dir + "/floor", std::ios::binary);
      std::string block(1 << 20, 'y');
      for (int64_t done = 0; done < bytes; done += block.size()) {
        out.write(block.data(), block.size());
      }
    }
    const int fd = ::open((dir + "/floor").c_str(), O_RDONLY);
    ::fsync(fd);
    ::close(fd);
    const double seconds = Seconds(start);
    std::filesystem::remove(dir + "/floor");
    return seconds;
  });
  std::printf(
      "| baseline: write + fsync to the same disk | %.0f | %.2f | %.0f | "
      "%.0f%% |\n",
      mib, floor_seconds, mib / floor_seconds,
      100 * bare_seconds / floor_seconds);
  // Content addressing: the client hashes the file before it sends the
  // header, and the server hashes every byte it receives, so no upload
  // can take less than one pass of SHA-256 over the bytes.
  std::printf(
      "| ceiling: sha256 of the bytes alone (OpenSSL, one core) | %.0f | %.2f "
      "| %.0f | %.0f%% |\n",
      mib, hash_seconds, mib / hash_seconds, 100 * bare_seconds / hash_seconds);
  return 0;
}
