// Peak memory of a streaming merge: N models of M GiB each, merged by
// core::ExecuteMerge in a child process whose peak RSS (getrusage) is
// compared with the bound 1 GiB + W x N x largest tensor, the result's
// shards written by W threads as the server's workers write them (each
// taking the next shard, core::MergeOptions::shard; the index last).
//
//   merge_rss [--dir DIR] [--models 3] [--model-gib 1] [--tensor-mib 32]
//             [--method average|fisher] [--queue-depth 2] [--out-dir DIR]
//             [--runs 3] [--shard-size BYTES] [--workers 1]
//
// Input files are generated once into DIR (deterministic content) and reused.
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "core/merge.h"
#include "core/model_writer.h"
#include "core/runtime.h"
#include "core/safetensors.h"

namespace {

namespace core = amalgam::core;

struct Args {
  std::string dir = "build/bench-data";
  int models = 3;
  double model_gib = 1.0;
  int tensor_mib = 32;
  std::string method = "average";
  // Merged tensors queued for the writer thread (0: no overlap).
  int queue_depth = 2;
  // Where the result goes (default: --dir). On tmpfs the fsync is free, which
  // separates the merge from the disk.
  std::string out_dir;
  // Merges timed; the median is reported (this VM's timings are noisy).
  int runs = 3;
  // LibTorch intra-op threads; 0 keeps LibTorch's default.
  int threads = 0;
  // The bound's allowance for the process itself (LibTorch, buffers), MiB.
  double base_mib = 1024;
  // Largest shard of the result, in bytes of tensor data.
  uint64_t shard_bytes = core::kDefaultShardBytes;
  // Threads writing shards at once.
  int workers = 1;
};

Args ParseArgs(int argc, char** argv) {
  Args args;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--dir") {
      args.dir = value;
    } else if (flag == "--models") {
      args.models = std::atoi(value.c_str());
    } else if (flag == "--model-gib") {
      args.model_gib = std::atof(value.c_str());
    } else if (flag == "--tensor-mib") {
      args.tensor_mib = std::atoi(value.c_str());
    } else if (flag == "--method") {
      args.method = value;
    } else if (flag == "--out-dir") {
      args.out_dir = value;
    } else if (flag == "--queue-depth") {
      args.queue_depth = std::atoi(value.c_str());
    } else if (flag == "--runs") {
      args.runs = std::max(1, std::atoi(value.c_str()));
    } else if (flag == "--base-mib") {
      args.base_mib = std::atof(value.c_str());
    } else if (flag == "--shard-size") {
      args.shard_bytes = std::stoull(value);
    } else if (flag == "--workers") {
      args.workers = std::max(1, std::atoi(value.c_str()));
    } else if (flag == "--threads") {
      args.threads = std::max(0, std::atoi(value.c_str()));
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      std::exit(2);
    }
  }
  return args;
}

// Writes one model of `tensors` F32 tensors of `elements` each, unless a file
// of the right size is there already.
std::vector<core::TensorSpec> Specs(int tensors, int64_t elements) {
  std::vector<core::TensorSpec> specs;
  for (int t = 0; t < tensors; ++t) {
    specs.push_back({"layer." + std::to_string(t) + ".weight",
                     core::DType::kF32,
                     {elements / 1024, 1024}});
  }
  return specs;
}

void Generate(const std::string& path, int model, int tensors, int64_t elements,
              bool positive) {
  const std::vector<core::TensorSpec> specs = Specs(tensors, elements);
  auto writer = core::SafetensorsWriter::Create(path, specs, {});
  if (!writer.ok()) {
    std::fprintf(stderr, "%s\n", writer.status().ToString().c_str());
    std::exit(1);
  }
  std::vector<float> buffer(elements);
  for (int t = 0; t < tensors; ++t) {
    for (int64_t i = 0; i < elements; ++i) {
      const float v = static_cast<float>(
                          (i * 7919 + t * 104729 + model * 15485863) % 2001) /
                          1000.0f -
                      1.0f;
      buffer[i] = positive ? v + 1.5f : v;
    }
    auto status = (*writer)->Append(absl::Span<const uint8_t>(
        reinterpret_cast<const uint8_t*>(buffer.data()),
        buffer.size() * sizeof(float)));
    if (!status.ok()) {
      std::fprintf(stderr, "%s\n", status.ToString().c_str());
      std::exit(1);
    }
  }
  auto status = (*writer)->Finish();
  if (!status.ok()) {
    std::fprintf(stderr, "%s\n", status.ToString().c_str());
    std::exit(1);
  }
}

std::string OutputPath(const Args& args) {
  return (args.out_dir.empty() ? args.dir : args.out_dir) + "/merged";
}

double Seconds(const timeval& t) { return t.tv_sec + t.tv_usec / 1e6; }

// The merge itself, run in the child.
int RunMerge(const Args& args, const std::vector<std::string>& weights,
             const std::vector<std::string>& fishers) {
  std::vector<std::unique_ptr<core::SafetensorsReader>> readers;
  std::vector<core::MergeInput> inputs;
  for (int m = 0; m < args.models; ++m) {
    core::MergeInput input;
    readers.push_back(*core::SafetensorsReader::Open(weights[m]));
    input.weights = readers.back().get();
    if (!fishers.empty()) {
      readers.push_back(*core::SafetensorsReader::Open(fishers[m]));
      input.fisher = readers.back().get();
    }
    input.label = weights[m];
    inputs.push_back(input);
  }
  core::MergeOptions options;
  options.method = fishers.empty() ? core::MergeMethod::kAverage
                                   : core::MergeMethod::kFisher;
  options.write_queue_depth = args.queue_depth;
  options.shard_bytes = args.shard_bytes;
  auto plan = core::PlanMerge(inputs, options);
  if (!plan.ok()) {
    std::fprintf(stderr, "%s\n", plan.status().ToString().c_str());
    return 1;
  }
  const std::vector<core::TensorSpec> specs = core::TensorSpecs(*plan);
  const int shards = core::CountShards(specs, options.shard_bytes);
  std::atomic<int> next{0};
  std::atomic<bool> failed{false};
  auto work = [&] {
    core::MergeOptions mine = options;
    for (int shard; (shard = next++) < shards && !failed;) {
      mine.shard = shard;
      const absl::Status status = core::ExecuteMerge(
          *plan, inputs, mine, OutputPath(args), nullptr, &failed);
      if (!status.ok()) {
        std::fprintf(stderr, "shard %d: %s\n", shard,
                     status.ToString().c_str());
        failed = true;
      }
    }
  };
  std::vector<std::thread> threads;
  for (int w = 1; w < args.workers; ++w) threads.emplace_back(work);
  work();
  for (std::thread& thread : threads) thread.join();
  if (failed) return 1;
  const absl::Status status =
      core::WriteModelIndex(OutputPath(args), specs, options.shard_bytes);
  if (!status.ok()) {
    std::fprintf(stderr, "%s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}

// The merge's result file written alone: same writer, directory and sizes,
// from one buffer faulted in beforehand, no merging. Best of 3, in seconds.
// A merge writes the same bytes, so it cannot take less.
double WriteAloneSeconds(const std::string& path, int tensors,
                         int64_t elements) {
  const std::vector<uint8_t> buffer(elements * sizeof(float), 1);
  double best = 1e9;
  for (int i = 0; i < 3; ++i) {
    const auto start = std::chrono::steady_clock::now();
    auto writer =
        core::SafetensorsWriter::Create(path, Specs(tensors, elements), {});
    absl::Status status = writer.status();
    for (int t = 0; t < tensors && status.ok(); ++t) {
      status = (*writer)->Append(buffer);
    }
    if (status.ok()) status = (*writer)->Finish();
    if (!status.ok()) {
      std::fprintf(stderr, "%s\n", status.ToString().c_str());
      std::exit(1);
    }
    best = std::min(best, std::chrono::duration<double>(
                              std::chrono::steady_clock::now() - start)
                              .count());
    std::filesystem::remove(path);
  }
  return best;
}

// The machine's plain copy bandwidth: GiB/s of memcpy over 1 GiB buffers,
// best of 3 after a warm-up (in this process, after the merge's child).
double MemcpyGibPerSecond() {
  const size_t bytes = size_t{1} << 30;
  std::vector<char> from(bytes, 1), to(bytes, 0);
  std::memcpy(to.data(), from.data(), bytes);
  double best = 0;
  for (int i = 0; i < 3; ++i) {
    const auto start = std::chrono::steady_clock::now();
    std::memcpy(to.data(), from.data(), bytes);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
    best = std::max(best, 1.0 / seconds);
  }
  // Keep the copy from being optimised away.
  if (to[bytes / 2] != 1) std::abort();
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = ParseArgs(argc, argv);
  if (args.threads > 0) core::SetIntraOpThreads(args.threads);
  std::filesystem::create_directories(args.dir);
  const int64_t elements = int64_t{args.tensor_mib} << 18;  // 4-byte floats
  const int tensors =
      static_cast<int>(args.model_gib * 1024 / args.tensor_mib + 0.5);
  const uint64_t tensor_bytes = static_cast<uint64_t>(elements) * 4;
  std::vector<std::string> weights, fishers;
  for (int m = 0; m < args.models; ++m) {
    weights.push_back(args.dir + "/model" + std::to_string(m) + ".safetensors");
    if (!std::filesystem::exists(weights.back())) {
      Generate(weights.back(), m, tensors, elements, false);
    }
    if (args.method == "fisher") {
      fishers.push_back(args.dir + "/fisher" + std::to_string(m) +
                        ".safetensors");
      if (!std::filesystem::exists(fishers.back())) {
        Generate(fishers.back(), m + 100, tensors, elements, true);
      }
    }
  }

  const std::string out = OutputPath(args);
  struct Run {
    double seconds, user, system;
  };
  std::vector<Run> runs;
  double peak_mib = 0;
  for (int run = 0; run < args.runs; ++run) {
    const auto start = std::chrono::steady_clock::now();
    const pid_t child = ::fork();
    if (child == 0) ::_exit(RunMerge(args, weights, fishers));
    int status = 0;
    struct rusage usage {};
    ::wait4(child, &status, 0, &usage);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      std::fprintf(stderr, "merge failed\n");
      return 1;
    }
    std::filesystem::remove_all(out);  // not part of the merge's time
    peak_mib = std::max(peak_mib, usage.ru_maxrss / 1024.0);  // KiB
    runs.push_back({seconds, Seconds(usage.ru_utime), Seconds(usage.ru_stime)});
  }
  std::sort(runs.begin(), runs.end(),
            [](const Run& a, const Run& b) { return a.seconds < b.seconds; });
  const Run& median = runs[runs.size() / 2];
  const double seconds = median.seconds;
  const double inputs_per_model = args.method == "fisher" ? 2 : 1;
  const double bound_mib = args.base_mib + args.workers * inputs_per_model *
                                               args.models * tensor_bytes /
                                               1048576.0;
  const double input_gib =
      inputs_per_model * args.models * tensors * tensor_bytes / 1073741824.0;
  const double memcpy_gib = MemcpyGibPerSecond();
  const double write_alone = WriteAloneSeconds(out, tensors, elements);
  const int shards =
      core::CountShards(Specs(tensors, elements), args.shard_bytes);
  std::printf(
      "| %s (queue %d, %d of %d shards at once) | %d x %.2f GiB | %d x %d MiB "
      "| %.0f | %.0f | %s | %.2f "
      "| %.2f / %.2f | %.2f | %.2f | %.0f%% | %.2f | %.2f | %.0f%% | %s, %d "
      "|\n",
      args.method.c_str(), args.queue_depth, std::min(args.workers, shards),
      shards, args.models, args.model_gib, tensors, args.tensor_mib, peak_mib,
      bound_mib, peak_mib < bound_mib ? "yes" : "NO", seconds, median.user,
      median.system, input_gib / seconds, memcpy_gib,
      100 * input_gib / seconds / memcpy_gib, write_alone,
      input_gib / write_alone, 100 * write_alone / seconds,
      core::GetBlasInfo().core.c_str(), core::GetRuntimeInfo().threads);
  return peak_mib < bound_mib ? 0 : 3;
}
