// RegMean of 3 BERT-base-shaped models (12 layers, hidden 768, intermediate
// 3072; random weights and random positive definite Grams; with
// --shared_inputs, query, key and value read one input, so their Gram is
// stored once, with aliases, as amalgam.stats.gram writes it) in one run:
// core::ExecuteMerge in each precision asked for against two PyTorch
// implementations of the paper's formula (bench/regmean_reference.py run by
// /usr/bin/python3 on the same files: a float64 solve, the ground truth of
// the errors, and the RegMean authors' float32 style), and the merge's
// GFLOP/s against this machine's float64 matmul rate measured here.
//
//   regmean_bert [--dir build/regmean-bert] [--layers 12] [--shared_inputs]
//                [--precision float64,float32] [--device cpu|cuda]
#include <ATen/ATen.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/merge.h"
#include "core/runtime.h"
#include "core/safetensors.h"

ABSL_FLAG(std::string, dir, "build/regmean-bert",
          "scratch directory (\"-shared\" appended with --shared_inputs)");
ABSL_FLAG(bool, shared_inputs, false,
          "query, key and value share one Gram per layer (stored once, with "
          "aliases)");
ABSL_FLAG(int, layers, 12, "encoder layers");
ABSL_FLAG(int, threads, 0, "LibTorch intra-op threads; 0 keeps its default");
ABSL_FLAG(std::vector<std::string>, precision,
          std::vector<std::string>({"float64", "float32"}),
          "amalgam's RegMean precisions to run, one row each");
ABSL_FLAG(std::string, device, "cpu",
          "where amalgam's merge runs (the references run on the CPU)");
ABSL_FLAG(std::string, python, "/usr/bin/python3",
          "the Python (with PyTorch) that runs the references");
ABSL_FLAG(int, runs, 1,
          "rounds of amalgam's merges and the authors' style, one after the "
          "other; the rows give each one's median and the speed-ups those of "
          "the medians and, per round, their least and greatest");
ABSL_FLAG(bool, reference, true,
          "also run the PyTorch reference (bench/regmean_reference.py)");

namespace {

namespace core = amalgam::core;
using Clock = std::chrono::steady_clock;

constexpr int kModels = 3;
constexpr int64_t kHidden = 768, kInner = 3072;
constexpr double kAlpha = 0.9;

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t h = v.size() / 2;
  return v.size() % 2 == 1 ? v[h] : (v[h - 1] + v[h]) / 2;
}

struct Linear {
  std::string name;
  int64_t out, in;
};

std::vector<Linear> Linears(int layers) {
  std::vector<Linear> linears;
  for (int l = 0; l < layers; ++l) {
    const std::string p = absl::StrCat("encoder.layer.", l, ".");
    for (const char* m : {"query", "key", "value"}) {
      linears.push_back(
          {p + "attention.self." + m + ".weight", kHidden, kHidden});
    }
    linears.push_back({p + "attention.output.dense.weight", kHidden, kHidden});
    linears.push_back({p + "intermediate.dense.weight", kInner, kHidden});
    linears.push_back({p + "output.dense.weight", kHidden, kInner});
  }
  return linears;
}

void WriteFile(const std::string& path,
               const std::vector<std::pair<std::string, at::Tensor>>& tensors,
               const std::map<std::string, std::string>& metadata) {
  std::vector<core::TensorSpec> specs;
  for (const auto& [name, t] : tensors) {
    specs.push_back({name, core::DType::kF32, t.sizes().vec()});
  }
  auto writer = core::SafetensorsWriter::Create(path, specs, metadata);
  for (const auto& [name, t] : tensors) {
    (*writer)
        ->Append(absl::Span<const uint8_t>(
            static_cast<const uint8_t*>(t.data_ptr()), t.numel() * 4))
        .IgnoreError();
  }
  (*writer)->Finish().IgnoreError();
}

// Model m's weights and Grams (G = B B^T / r + I/10 with B n x 64: positive
// definite, with a spread of eigenvalues like real activations; symmetric).
// `shared`: key and value alias the query's Gram.
void Generate(const std::string& dir, int layers, bool shared) {
  at::manual_seed(2026);
  for (int m = 0; m < kModels; ++m) {
    std::vector<std::pair<std::string, at::Tensor>> weights, grams;
    std::map<std::string, std::string> metadata = {{"num_examples", "1000"},
                                                   {"reduction", "mean"}};
    for (const Linear& linear : Linears(layers)) {
      weights.push_back(
          {linear.name, at::randn({linear.out, linear.in}) * 0.05});
      const std::string module = linear.name.substr(0, linear.name.size() - 6);
      weights.push_back({module + "bias", at::randn({linear.out}) * 0.05});
      if (shared && (absl::EndsWith(module, ".key.") ||
                     absl::EndsWith(module, ".value."))) {
        metadata[absl::StrCat("alias.", linear.name)] =
            module.substr(0, module.rfind('.', module.size() - 2)) +
            ".query.weight";
        continue;
      }
      at::Tensor b = at::randn({linear.in, 64});
      const at::Tensor g = at::matmul(b, b.t()) / 64 + at::eye(linear.in) * 0.1;
      // Made exactly symmetric: a float32 product's (i, j) and (j, i) can
      // differ in the last bit (they do with OpenBLAS's Zen kernels), and a
      // Cholesky solve (lower triangle) and an LU solve (both) would then
      // solve different systems, 1e-6 apart at these condition numbers.
      grams.push_back({linear.name, (g + g.t()) / 2});
    }
    WriteFile(absl::StrCat(dir, "/model", m, ".safetensors"), weights, {});
    WriteFile(absl::StrCat(dir, "/gram", m, ".safetensors"), grams, metadata);
  }
}

// Floating-point operations of the RegMean formula per weight: forming
// sum G~ (N n^2) and sum G~ W^T (N 2 n^2 m), Cholesky (n^3/3) and the two
// triangular solves (2 n^2 m).
double Flops(int layers) {
  double flops = 0;
  for (const Linear& l : Linears(layers)) {
    const double n = static_cast<double>(l.in), m = static_cast<double>(l.out);
    flops += kModels * n * n + kModels * 2 * n * n * m + n * n * n / 3 +
             2 * n * n * m;
  }
  return flops;
}

// The device's matmul rate, GFLOP/s, best of 3: float64 2048 x 2048 on the
// CPU, float32 8192 x 8192 on a GPU (reading one element waits for it).
double MatmulGflops(const at::Device& device) {
  const bool gpu = !device.is_cpu();
  const int64_t n = gpu ? 8192 : 2048;
  const auto options =
      at::TensorOptions(gpu ? at::kFloat : at::kDouble).device(device);
  at::Tensor a = at::randn({n, n}, options);
  at::Tensor b = at::randn({n, n}, options);
  at::matmul(a, b)[0][0].item<double>();
  double best = 0;
  for (int i = 0; i < 3; ++i) {
    const auto start = Clock::now();
    at::matmul(a, b)[0][0].item<double>();
    best = std::max(best, 2.0 * n * n * n / Seconds(start) / 1e9);
  }
  return best;
}

// Merges into `out` in `precision`; writes the fast mode's counts (weights
// solved in float32, redone in float64) to `out`/counts.
int RunMerge(const std::string& dir, core::RegMeanPrecision precision,
             const std::string& out) {
  std::vector<std::unique_ptr<core::SafetensorsReader>> readers;
  std::vector<core::MergeInput> inputs;
  for (int m = 0; m < kModels; ++m) {
    core::MergeInput input;
    readers.push_back(*core::SafetensorsReader::Open(
        absl::StrCat(dir, "/model", m, ".safetensors")));
    input.weights = readers.back().get();
    readers.push_back(*core::SafetensorsReader::Open(
        absl::StrCat(dir, "/gram", m, ".safetensors")));
    input.gram = readers.back().get();
    input.label = absl::StrCat("model", m);
    inputs.push_back(input);
  }
  core::MergeOptions options;
  options.method = core::MergeMethod::kRegMean;
  options.alpha = kAlpha;
  options.precision = precision;
  options.device = absl::GetFlag(FLAGS_device);
  auto plan = core::PlanMerge(inputs, options);
  if (!plan.ok()) {
    std::fprintf(stderr, "%s\n", plan.status().ToString().c_str());
    return 1;
  }
  core::MergeProgress last;
  absl::Status status = core::ExecuteMerge(
      *plan, inputs, options, out,
      [&last](const core::MergeProgress& p) { last = p; }, nullptr);
  if (!status.ok()) {
    std::fprintf(stderr, "%s\n", status.ToString().c_str());
    return 1;
  }
  std::FILE* counts = std::fopen((out + "/counts").c_str(), "w");
  if (counts == nullptr) return 1;
  std::fprintf(counts, "%lld %lld\n", static_cast<long long>(last.fast_solves),
               static_cast<long long>(last.fast_fallbacks));
  return std::fclose(counts) == 0 ? 0 : 1;
}

// Ours in one precision, run in a child (for its peak RSS).
struct Ours {
  std::string precision;
  double rss_mib = 0, weight_error = 0, output_error = 0;
  std::vector<double> rounds;  // seconds
  long long fast_solves = 0, fast_fallbacks = 0;
};

bool RunOurs(const std::string& dir, Ours* ours) {
  const core::RegMeanPrecision precision =
      ours->precision == "float32" ? core::RegMeanPrecision::kFloat32
                                   : core::RegMeanPrecision::kFloat64;
  const std::string out = dir + "/merged-" + ours->precision;
  std::filesystem::remove_all(out);
  const auto start = Clock::now();
  const pid_t child = ::fork();
  if (child == 0) ::_exit(RunMerge(dir, precision, out));
  int status = 0;
  struct rusage usage {};
  ::wait4(child, &status, 0, &usage);
  ours->rounds.push_back(Seconds(start));
  ours->rss_mib = std::max(ours->rss_mib, usage.ru_maxrss / 1024.0);
  std::FILE* counts = std::fopen((out + "/counts").c_str(), "r");
  const bool read =
      counts != nullptr && std::fscanf(counts, "%lld %lld", &ours->fast_solves,
                                       &ours->fast_fallbacks) == 2;
  if (counts != nullptr) std::fclose(counts);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 && read;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const bool shared = absl::GetFlag(FLAGS_shared_inputs);
  const std::string dir = absl::GetFlag(FLAGS_dir) + (shared ? "-shared" : "");
  const int layers = absl::GetFlag(FLAGS_layers);
  if (absl::GetFlag(FLAGS_threads) > 0) {
    core::SetIntraOpThreads(absl::GetFlag(FLAGS_threads));
  }
  const std::string core_threads = absl::StrCat(core::GetBlasInfo().core, ", ",
                                                core::GetRuntimeInfo().threads);
  std::filesystem::create_directories(dir);
  if (!std::filesystem::exists(dir + "/gram2.safetensors")) {
    // In a child: the parent's pages would count in every later child's
    // peak RSS.
    const pid_t child = ::fork();
    if (child == 0) {
      Generate(dir, layers, shared);
      ::_exit(0);
    }
    int status = 0;
    ::waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return 1;
  }

  std::vector<Ours> ours;
  for (const std::string& precision : absl::GetFlag(FLAGS_precision)) {
    if (precision != "float64" && precision != "float32") {
      std::fprintf(stderr, "--precision: float64 or float32, not %s\n",
                   precision.c_str());
      return 2;
    }
    ours.push_back({precision});
  }
  const int runs = absl::GetFlag(FLAGS_runs);
  if (runs < 1) {
    std::fprintf(stderr, "--runs: at least 1, not %d\n", runs);
    return 2;
  }

  // The references, same files, same machine: float64 (the ground truth of
  // every error, which also scores ours), then the authors' style. Each
  // reports its own time (load, merge, save: no interpreter start-up), peak
  // RSS and errors against the float64 solve.
  struct Reference {
    double rss_mib = 0, weight_error = 0, output_error = 0;
    std::vector<double> rounds;  // seconds
  };
  auto run_reference = [&](const char* style, Reference* r,
                           std::vector<Ours>* scored) {
    std::string command =
        absl::StrCat(absl::GetFlag(FLAGS_python), " ", AMALGAM_SOURCE_DIR,
                     "/bench/regmean_reference.py ", dir, " ", kModels, " ",
                     kAlpha, " ", style);
    for (const Ours& o : *scored) {
      absl::StrAppend(&command, " ", dir, "/merged-", o.precision,
                      "/model.safetensors");
    }
    std::FILE* pipe = ::popen(command.c_str(), "r");
    double seconds = 0;
    bool read = pipe != nullptr &&
                std::fscanf(pipe,
                            " seconds=%lf peak_rss_mib=%lf weight_error=%lf "
                            "output_error=%lf",
                            &seconds, &r->rss_mib, &r->weight_error,
                            &r->output_error) == 4;
    for (Ours& o : *scored) {
      read = read && std::fscanf(pipe, " weight_error=%lf output_error=%lf",
                                 &o.weight_error, &o.output_error) == 2;
    }
    r->rounds.push_back(seconds);
    return pipe != nullptr && ::pclose(pipe) == 0 && read;
  };
  // Rounds of ours and the authors' style, one after the other (this
  // machine's speed drifts by 20% over minutes); the float64 solve, which
  // scores ours (the same results every round), after the first.
  Reference float64, authors;
  std::vector<Ours> none;
  const bool reference = absl::GetFlag(FLAGS_reference);
  for (int round = 0; round < runs; ++round) {
    for (Ours& o : ours) {
      if (!RunOurs(dir, &o)) return 1;
    }
    if (reference &&
        ((round == 0 && !run_reference("float64", &float64, &ours)) ||
         !run_reference("authors", &authors, &none))) {
      std::fprintf(stderr, "a reference failed\n");
      return 1;
    }
  }
  const double authors_seconds = reference ? Median(authors.rounds) : 0;

  const double gflop = Flops(layers) / 1e9;
  const at::Device device(absl::GetFlag(FLAGS_device));
  const double peak = MatmulGflops(device);
  std::printf(
      "| implementation | seconds (median of %d) | speed-up over the authors' "
      "style | per round, least - greatest | GFLOP/s "
      "| share of %s %s matmul (%.1f GFLOP/s) | peak RSS (MiB) "
      "| weight error | output error "
      "| weights solved in float32 / redone in float64 "
      "| BLAS core, intra-op threads |\n",
      runs, device.str().c_str(), device.is_cpu() ? "f64" : "f32", peak);
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
  // The speed-ups of each round (ours against the authors' style of the
  // same round), least and greatest.
  auto spread = [&](const std::vector<double>& rounds) -> std::string {
    if (!reference || rounds.size() != authors.rounds.size()) return "-";
    double least = 1e300, greatest = 0;
    for (size_t i = 0; i < rounds.size(); ++i) {
      least = std::min(least, authors.rounds[i] / rounds[i]);
      greatest = std::max(greatest, authors.rounds[i] / rounds[i]);
    }
    return absl::StrFormat("%.2fx - %.2fx", least, greatest);
  };
  auto row = [&](const std::string& name, double seconds, double rss_mib,
                 double weight_error, double output_error,
                 const std::string& fast, const std::string& rounds) {
    std::printf(
        "| %s | %.1f | %s | %s | %.1f | %.0f%% | %.0f | %s | %s | %s | %s |\n",
        name.c_str(), seconds,
        reference ? absl::StrFormat("%.2fx", authors_seconds / seconds).c_str()
                  : "-",
        rounds.c_str(), gflop / seconds, 100 * gflop / seconds / peak, rss_mib,
        reference ? absl::StrFormat("%.2g", weight_error).c_str() : "-",
        reference ? absl::StrFormat("%.2g", output_error).c_str() : "-",
        fast.c_str(), core_threads.c_str());
  };
  for (const Ours& o : ours) {
    row(absl::StrCat("amalgam core::ExecuteMerge on ", device.str(),
                     ", precision ", o.precision),
        Median(o.rounds), o.rss_mib, o.weight_error, o.output_error,
        o.precision == "float32"
            ? absl::StrCat(o.fast_solves, " / ", o.fast_fallbacks)
            : "-",
        spread(o.rounds));
  }
  if (reference) {
    row("PyTorch float64 solve (bench/regmean_reference.py float64, one "
        "run)",
        float64.rounds[0], float64.rss_mib, 0.0, 0.0, "-", "-");
    row("PyTorch, the authors' style: float32, torch.inverse "
        "(bench/regmean_reference.py authors)",
        authors_seconds, authors.rss_mib, authors.weight_error,
        authors.output_error, "-", "-");
  }
  std::printf(
      "\n%d layers, %d models, %.1f GFLOP per merge (formula count); errors "
      "against the float64 solve; query, key and value Grams %s\n",
      layers, kModels, gflop,
      shared ? "shared (one per layer, aliased)" : "apart (one per weight)");
  return 0;
}
