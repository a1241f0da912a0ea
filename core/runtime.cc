#include "core/runtime.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <sched.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/torch_util.h"

namespace amalgam::core {
namespace {

std::string ReadSmallFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return "";
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// The cgroup v2 quota of this process's cgroup (or of the cgroup mounted at
// /sys/fs/cgroup, as inside a container); then cgroup v1's. 0: unlimited.
int CgroupCpus() {
  std::vector<std::string> cpu_max_files;
  for (absl::string_view line :
       absl::StrSplit(ReadSmallFile("/proc/self/cgroup"), '\n')) {
    if (absl::StartsWith(line, "0::")) {
      cpu_max_files.push_back(
          absl::StrCat("/sys/fs/cgroup", line.substr(3), "/cpu.max"));
    }
  }
  cpu_max_files.push_back("/sys/fs/cgroup/cpu.max");
  for (const std::string& file : cpu_max_files) {
    const std::string text = ReadSmallFile(file);
    if (!text.empty()) return CpusFromCpuMax(text);
  }
  for (const char* dir : {"/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"}) {
    long long quota = 0, period = 0;
    if (absl::SimpleAtoi(absl::StripAsciiWhitespace(ReadSmallFile(
                             absl::StrCat(dir, "/cpu.cfs_quota_us"))),
                         &quota) &&
        absl::SimpleAtoi(absl::StripAsciiWhitespace(ReadSmallFile(
                             absl::StrCat(dir, "/cpu.cfs_period_us"))),
                         &period)) {
      return CpusFromCgroupQuota(quota, period);
    }
  }
  return 0;
}

// The largest |a - b| relative to the largest |b|, over a GEMM of `dtype`
// against the same product summed in double.
double GemmError(at::ScalarType dtype) {
  constexpr int64_t kM = 96, kK = 80, kN = 112;
  std::vector<double> a(kM * kK), b(kK * kN);
  // Small integers over 8: exact in every dtype, products and sums too up to
  // float32's rounding of the accumulation.
  for (int64_t i = 0; i < kM * kK; ++i) a[i] = ((i * 7) % 17 - 8) / 8.0;
  for (int64_t i = 0; i < kK * kN; ++i) b[i] = ((i * 5) % 13 - 6) / 8.0;
  const auto options = at::TensorOptions().dtype(at::kDouble);
  at::Tensor ta = at::from_blob(a.data(), {kM, kK}, options).to(dtype);
  at::Tensor tb = at::from_blob(b.data(), {kK, kN}, options).to(dtype);
  at::Tensor product = at::mm(ta, tb).to(at::kDouble).contiguous();
  const double* got = product.data_ptr<double>();
  double worst = 0, largest = 0;
  for (int64_t i = 0; i < kM; ++i) {
    for (int64_t j = 0; j < kN; ++j) {
      double sum = 0;
      for (int64_t k = 0; k < kK; ++k) sum += a[i * kK + k] * b[k * kN + j];
      worst = std::max(worst, std::abs(got[i * kN + j] - sum));
      largest = std::max(largest, std::abs(sum));
    }
  }
  return largest > 0 ? worst / largest : worst;
}

}  // namespace

absl::StatusOr<std::string> ResolveDevice(const std::string& spec) {
  int index = 0;
  if (spec == "cpu") return std::string("cpu");
  if (spec == "auto" || spec == "cuda") {
    index = 0;
  } else if (absl::StartsWith(spec, "cuda:")) {
    const std::string digits = spec.substr(5);
    if (digits.empty() ||
        digits.find_first_not_of("0123456789") != std::string::npos ||
        !absl::SimpleAtoi(digits, &index)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "invalid device \"", spec, "\"; expected auto, cpu, cuda or cuda:N"));
    }
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "invalid device \"", spec, "\"; expected auto, cpu, cuda or cuda:N"));
  }
  size_t count = 0;
  try {
    // size_t in LibTorch 1.13, c10::DeviceIndex (int8_t) in 2.x.
    count = torch::cuda::is_available()
                ? static_cast<size_t>(torch::cuda::device_count())
                : 0;
  } catch (const c10::Error& e) {
    return FromTorchError(e, "probing CUDA");
  }
  if (spec == "auto") {
    return count > 0 ? std::string("cuda:0") : std::string("cpu");
  }
  if (count == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("device \"", spec,
                     "\" requested but this build or machine has no CUDA"));
  }
  if (static_cast<size_t>(index) >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("device \"", spec, "\" requested but there are only ",
                     count, " CUDA devices"));
  }
  return absl::StrCat("cuda:", index);
}

BlasInfo GetBlasInfo() {
  BlasInfo blas;
  blas.library = "unknown";
  if (void* sgemm = dlsym(RTLD_DEFAULT, "sgemm_")) {
    Dl_info info;
    if (dladdr(sgemm, &info) != 0 && info.dli_fname != nullptr) {
      blas.library = info.dli_fname;
      if (char* real = realpath(info.dli_fname, nullptr)) {
        blas.library = real;
        std::free(real);
      }
    }
  }
  using GetText = const char* (*)();
  if (auto get_config = reinterpret_cast<GetText>(
          dlsym(RTLD_DEFAULT, "openblas_get_config"))) {
    blas.library = absl::StrCat(get_config(), " (", blas.library, ")");
  }
  if (auto get_core = reinterpret_cast<GetText>(
          dlsym(RTLD_DEFAULT, "openblas_get_corename"))) {
    blas.core = get_core();
  }
  return blas;
}

CpuFeatures DetectCpuFeatures() {
  CpuFeatures cpu;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // libgcc also checks that the OS saves the AVX and AVX-512 state (XCR0).
  cpu.avx512 =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
      __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  cpu.avx2_fma =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return cpu;
}

bool IsGenericBlasCore(absl::string_view core) {
  for (absl::string_view generic : {"prescott", "katmai", "core2", "nehalem",
                                    "penryn", "dunnington", "atom"}) {
    if (absl::EqualsIgnoreCase(core, generic)) return true;
  }
  return false;
}

absl::StatusOr<BlasCoreChoice> ChooseBlasCore(absl::string_view flag,
                                              absl::string_view env_core,
                                              absl::string_view loaded,
                                              const CpuFeatures& cpu) {
  if (flag.empty()) {
    return absl::InvalidArgumentError(
        "--blas-core must be auto, keep or an OpenBLAS core name");
  }
  BlasCoreChoice choice;
  if (flag == "keep") {
    choice.reason = "--blas-core keep";
    return choice;
  }
  if (loaded.empty()) {
    choice.reason = "the BLAS is not OpenBLAS";
    return choice;
  }
  if (flag != "auto") {
    if (absl::EqualsIgnoreCase(flag, loaded)) {
      choice.reason = absl::StrCat("--blas-core ", flag, " is loaded");
    } else {
      choice.core = std::string(flag);
      choice.reason = absl::StrCat("--blas-core ", flag);
    }
    return choice;
  }
  if (!env_core.empty()) {
    choice.reason = absl::StrCat("OPENBLAS_CORETYPE=", env_core, " is set");
    return choice;
  }
  if (!IsGenericBlasCore(loaded)) {
    choice.reason = absl::StrCat("OpenBLAS detected ", loaded);
    return choice;
  }
  if (cpu.avx512) {
    choice.core = "SkylakeX";
    choice.reason = absl::StrCat("OpenBLAS fell back to generic ", loaded,
                                 " on a CPU with AVX-512 F/CD/BW/DQ/VL");
  } else if (cpu.avx2_fma) {
    choice.core = "Haswell";
    choice.reason = absl::StrCat("OpenBLAS fell back to generic ", loaded,
                                 " on a CPU with AVX2 and FMA");
  } else {
    choice.reason =
        absl::StrCat("OpenBLAS chose ", loaded, "; the CPU has no AVX2");
  }
  return choice;
}

absl::Status CheckGemm() {
  return GuardTorch("checking the BLAS", [&]() -> absl::Status {
    for (at::ScalarType dtype : {at::kFloat, at::kDouble}) {
      const double tolerance = dtype == at::kFloat ? 1e-5 : 1e-12;
      const double error = GemmError(dtype);
      if (!(error <= tolerance)) {
        return absl::InternalError(absl::StrCat(
            "a ", dtype == at::kFloat ? "float32" : "float64",
            " matrix product through the BLAS differs from a plain loop by ",
            error, " (relative; allowed ", tolerance, ")"));
      }
    }
    return absl::OkStatus();
  });
}

int CpusFromCgroupQuota(long long quota, long long period) {
  if (quota <= 0 || period <= 0) return 0;
  return static_cast<int>((quota + period - 1) / period);
}

int CpusFromCpuMax(absl::string_view cpu_max) {
  std::vector<absl::string_view> fields = absl::StrSplit(
      absl::StripAsciiWhitespace(cpu_max), ' ', absl::SkipEmpty());
  long long quota = 0, period = 0;
  if (fields.size() != 2 || fields[0] == "max" ||
      !absl::SimpleAtoi(fields[0], &quota) ||
      !absl::SimpleAtoi(fields[1], &period)) {
    return 0;
  }
  return CpusFromCgroupQuota(quota, period);
}

int UsableCpus() {
  int cpus = 0;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
  if (cpus <= 0) cpus = 1;
  const int quota = CgroupCpus();
  if (quota > 0) cpus = std::min(cpus, quota);
  return cpus;
}

int IntraOpThreadsFor(int usable_cpus, int workers) {
  return std::max(1, usable_cpus / std::max(1, workers));
}

void SetIntraOpThreads(int threads) { at::set_num_threads(threads); }

RuntimeInfo GetRuntimeInfo() {
  RuntimeInfo runtime;
  runtime.libtorch = TORCH_VERSION;
  runtime.blas = GetBlasInfo();
  runtime.cuda = "no";
  try {
    runtime.threads = at::get_num_threads();
    if (torch::cuda::is_available()) {
      runtime.cuda = absl::StrCat(
          "yes (", static_cast<int>(torch::cuda::device_count()), " devices)");
    }
  } catch (const c10::Error&) {
    runtime.cuda = "unknown";
  }
  return runtime;
}

std::string DescribeRuntime() {
  const RuntimeInfo runtime = GetRuntimeInfo();
  return absl::StrCat(
      "LibTorch ", runtime.libtorch, "; BLAS: ", runtime.blas.library,
      runtime.blas.core.empty()
          ? ""
          : absl::StrCat("; BLAS core: ", runtime.blas.core),
      "; intra-op threads: ", runtime.threads, "; CUDA: ", runtime.cuda);
}

}  // namespace amalgam::core
