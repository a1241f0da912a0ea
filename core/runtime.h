#pragma once

// The machine a merge runs on: the device, the BLAS library and its kernels,
// and how many CPU threads LibTorch may use.

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace amalgam::core {

// "cpu" or "cuda:N" for a --device value ("auto", "cpu", "cuda", "cuda:N").
// INVALID_ARGUMENT for a malformed value, FAILED_PRECONDITION for CUDA when
// this build or machine has none.
absl::StatusOr<std::string> ResolveDevice(const std::string& spec);

// The BLAS LibTorch calls (Debian's LibTorch calls whatever libblas.so.3 the
// alternatives system points to) and, for OpenBLAS, the kernels it chose.
struct BlasInfo {
  std::string library;  // OpenBLAS's config string and the file; "unknown"
  std::string core;     // openblas_get_corename(); empty if not OpenBLAS
};
BlasInfo GetBlasInfo();

// What the CPU reports (cpuid), as far as BLAS kernels care.
struct CpuFeatures {
  bool avx512 = false;    // AVX-512 F, CD, BW, DQ and VL, all of them
  bool avx2_fma = false;  // AVX2 and FMA
};
CpuFeatures DetectCpuFeatures();

// True for OpenBLAS's generic pre-AVX kernels (Prescott, Katmai, Core2,
// Nehalem, Penryn, Dunnington, Atom), case-insensitively.
bool IsGenericBlasCore(absl::string_view core);

// What to do about the BLAS kernels before serving.
struct BlasCoreChoice {
  // The OPENBLAS_CORETYPE to restart with; empty: keep what was loaded.
  std::string core;
  // Why, for the log.
  std::string reason;
};

// Decides from --blas-core (`flag`: "auto", "keep" or a core name), the
// user's OPENBLAS_CORETYPE (`env_core`, empty if unset), the core OpenBLAS
// loaded (`loaded`, empty if the BLAS is not OpenBLAS) and the CPU. "auto"
// replaces a generic core by SkylakeX on AVX-512 CPUs or Haswell on AVX2+FMA
// ones, and never overrides the user's variable. A named core is asked for
// unless already loaded. INVALID_ARGUMENT for an empty flag.
absl::StatusOr<BlasCoreChoice> ChooseBlasCore(absl::string_view flag,
                                              absl::string_view env_core,
                                              absl::string_view loaded,
                                              const CpuFeatures& cpu);

// Multiplies small float32 and float64 matrices through LibTorch (so through
// the BLAS) and compares them with a plain triple loop in double. INTERNAL,
// naming the dtype and the error, when they disagree.
absl::Status CheckGemm();

// CPUs this process may run on: its affinity mask, capped by the cgroup CPU
// quota (cgroup v2 cpu.max or v1 cpu.cfs_quota_us, rounded up). At least 1.
int UsableCpus();
// The CPU quota in a cgroup v2 `cpu.max` text ("max 100000", "150000
// 100000"), rounded up to whole CPUs; 0 when unlimited or unreadable.
int CpusFromCgroupQuota(long long quota, long long period);
int CpusFromCpuMax(absl::string_view cpu_max);

// LibTorch's intra-op threads per job: the usable CPUs shared among
// `workers` concurrent jobs, at least 1.
int IntraOpThreadsFor(int usable_cpus, int workers);
// Sets LibTorch's intra-op thread count (process-wide; call before jobs
// run).
void SetIntraOpThreads(int threads);

// What DescribeRuntime says, field by field (for build-info metrics).
struct RuntimeInfo {
  std::string libtorch;  // version
  BlasInfo blas;         // the BLAS library actually loaded
  std::string cuda;      // "no", "yes (N devices)" or "unknown"
  int threads = 0;       // intra-op threads
};
RuntimeInfo GetRuntimeInfo();

// One line naming LibTorch's version, its BLAS and kernels, the intra-op
// threads and whether CUDA is usable.
std::string DescribeRuntime();

}  // namespace amalgam::core
