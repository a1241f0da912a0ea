// amalgamd: the Amalgam model-merging server.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "core/cpu_cache.h"
#include "core/runtime.h"
#include "server/log.h"
#include "server/server.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "gRPC address host:port (port 0 picks a free port)");
ABSL_FLAG(std::string, data_dir, "./var/amalgam",
          "data directory: blobs, uploads and the SQLite catalog");
ABSL_FLAG(std::string, catalog, "sqlite",
          "sqlite (catalog.db in --data-dir) or a libpq URI such as "
          "postgresql://amalgam@/amalgam?host=/run/pg");
ABSL_FLAG(std::string, replica_name, "",
          "the name this replica runs jobs under (Job.runner); default: "
          "hostname-pid");
ABSL_FLAG(absl::Duration, job_lease, absl::Seconds(30),
          "a replica's hold on the jobs it runs and the upload streams it "
          "receives, renewed every third of it; another replica takes over "
          "a job, or resumes an upload, whose lease expired");
ABSL_FLAG(int, max_attempts, 3,
          "runs of a job whose runner stopped (killed, partitioned) before it "
          "fails");
ABSL_FLAG(std::string, device, "auto", "auto | cpu | cuda | cuda:N");
ABSL_FLAG(int, workers, 1, "merge jobs that run at once");
ABSL_FLAG(int, max_queued_jobs, 64, "jobs that may wait to run");
ABSL_FLAG(int64_t, max_upload_bytes, int64_t{64} << 30,
          "largest artifact accepted, in bytes");
ABSL_FLAG(int64_t, quota_bytes_per_org, 0,
          "bytes one organisation may hold: its artifacts, partial uploads "
          "and the outputs of its queued and running jobs; 0: unlimited");
ABSL_FLAG(int64_t, disk_reserve_bytes, int64_t{128} << 20,
          "bytes kept free on the data volume: uploads and jobs that would "
          "eat into them are refused (RESOURCE_EXHAUSTED) before writing");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9464",
          "Prometheus endpoint host:port (GET /metrics); empty disables it");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "on SIGTERM, how long running jobs may take to finish");
ABSL_FLAG(int, max_jobs_per_org, 16,
          "queued plus running jobs one organisation may have");
ABSL_FLAG(int, max_uploads_per_org, 8,
          "upload streams one organisation may have open at once");
ABSL_FLAG(int, max_downloads_per_org, 8,
          "download streams one organisation may have open at once");
ABSL_FLAG(int, max_models_per_job, 64, "most models one merge job may name");
ABSL_FLAG(absl::Duration, upload_expiry, absl::Hours(24),
          "an unfinished resumable upload untouched this long is removed");
ABSL_FLAG(absl::Duration, testing_step_delay, absl::ZeroDuration(),
          "tests only: pause after each merged tensor");
ABSL_FLAG(std::string, port_file, "",
          "if set, the bound gRPC port and then the metrics port (0 if "
          "none) are written here, a line each, once serving");
ABSL_FLAG(std::string, tokens, "",
          "token file: `TOKEN ORG` per line (reloaded on SIGHUP); without it "
          "amalgamd listens on loopback only and every caller is `local`");
ABSL_FLAG(std::string, tls_cert, "", "TLS: PEM certificate chain");
ABSL_FLAG(std::string, tls_key, "", "TLS: PEM private key");
ABSL_FLAG(std::string, tls_client_ca, "",
          "mutual TLS: PEM of the CA that signs client certificates");
ABSL_FLAG(bool, allow_plaintext_tokens, false,
          "serve bearer tokens without TLS on a non-loopback --listen (only "
          "behind a service mesh or ingress that terminates TLS)");
ABSL_FLAG(std::string, log_level, "info", "debug | info | warning | error");
ABSL_FLAG(std::string, blas_core, "auto",
          "OpenBLAS kernels: auto (replace a generic core OpenBLAS fell back "
          "to by the CPU's best), keep, or a core name such as SkylakeX");
ABSL_FLAG(int, threads, 0,
          "LibTorch intra-op threads per job; 0: the usable CPUs (affinity, "
          "cgroup quota) shared among --workers");

namespace {

// The contract spells flags with dashes (--data-dir); Abseil with
// underscores. Rewrites the flag names only, never the values.
std::vector<std::string> NormalizeFlagNames(int argc, char** argv) {
  std::vector<std::string> args;
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    if (i > 0 && arg.size() > 2 && arg.compare(0, 2, "--") == 0) {
      const size_t end = std::min(arg.find('='), arg.size());
      for (size_t j = 2; j < end; ++j) {
        if (arg[j] == '-') arg[j] = '_';
      }
    }
    args.push_back(std::move(arg));
  }
  return args;
}

bool WritePortFile(const std::string& path, int port, int metrics_port) {
  const std::string temp = path + ".tmp";
  {
    std::ofstream out(temp);
    out << port << "\n" << metrics_port << "\n";
    if (!out) return false;
  }
  return std::rename(temp.c_str(), path.c_str()) == 0;
}

// Set on a restart that asked OpenBLAS for other kernels:
// "CORE<TAB>LOADED<TAB>REASON".
constexpr char kBlasChosenEnv[] = "AMALGAM_BLAS_CHOSEN";
// Set on a restart back to the loaded kernels after the chosen ones failed
// the GEMM check: why.
constexpr char kBlasKeptEnv[] = "AMALGAM_BLAS_KEPT";

std::string TakeEnv(const char* name) {
  const char* value = std::getenv(name);
  std::string text = value != nullptr ? value : "";
  unsetenv(name);
  return text;
}

// Re-executes this program with `env` set: OpenBLAS reads
// OPENBLAS_CORETYPE, and OpenMP OMP_WAIT_POLICY, only when they load.
// Returns only if exec fails (then the variables are as before).
void Restart(char** argv,
             const std::vector<std::pair<std::string, std::string>>& env) {
  std::vector<std::pair<std::string, std::string>> before;
  for (const auto& [name, value] : env) {
    const char* old = std::getenv(name.c_str());
    before.emplace_back(name, old != nullptr ? old : "");
    setenv(name.c_str(), value.c_str(), 1);
  }
  execv("/proc/self/exe", argv);
  amalgam::server::Log(amalgam::server::LogLevel::kWarning,
                       amalgam::server::LogFields("restart_failed")
                           .Add("error", std::strerror(errno)));
  for (const auto& [name, value] : before) {
    if (value.empty()) {
      unsetenv(name.c_str());
    } else {
      setenv(name.c_str(), value.c_str(), 1);
    }
  }
}

// Chooses the OpenBLAS kernels (--blas-core) and OpenMP's wait policy,
// restarting the process when either changes, and checks a GEMM against a
// plain loop before serving. Returns false, having said why, if the BLAS
// gives wrong products.
//
// OpenMP's default policy spins idle intra-op threads, which then take the
// CPUs from OpenBLAS's own threads: RegMean of BERT-base shapes took 24.3 s
// on 2 intra-op threads against 16.0 s on 1, and 15.2 s on 2 with
// OMP_WAIT_POLICY=PASSIVE (SkylakeX; bench/README.md, blas_cores.sh). Unless
// the user set it, amalgamd runs with PASSIVE.
bool SetUpBlas(char** argv) {
  using amalgam::server::Log;
  using amalgam::server::LogFields;
  using amalgam::server::LogLevel;
  const amalgam::core::BlasInfo blas = amalgam::core::GetBlasInfo();
  const std::string chosen = TakeEnv(kBlasChosenEnv);
  const std::string kept = TakeEnv(kBlasKeptEnv);
  std::string reason;
  // Run at most once: the chosen kernels are checked before they are kept.
  std::optional<absl::Status> check;
  if (!chosen.empty()) {
    std::vector<std::string> parts = absl::StrSplit(chosen, '\t');
    parts.resize(3);
    check = amalgam::core::CheckGemm();
    if (!check->ok() || !absl::EqualsIgnoreCase(blas.core, parts[0])) {
      const std::string why =
          check->ok()
              ? absl::StrCat("OpenBLAS loaded ", blas.core, " when asked for ",
                             parts[0])
              : absl::StrCat(parts[0],
                             " failed the GEMM check: ", check->message());
      Restart(argv, {{"OPENBLAS_CORETYPE", parts[1]}, {kBlasKeptEnv, why}});
    }
    reason = absl::StrCat("chosen over ", parts[1], ": ", parts[2]);
  } else if (!kept.empty()) {
    reason = absl::StrCat("kept: ", kept);
    Log(LogLevel::kWarning,
        LogFields("blas_core_kept").Add("core", blas.core).Add("reason", kept));
  } else {
    const char* env_core = std::getenv("OPENBLAS_CORETYPE");
    absl::StatusOr<amalgam::core::BlasCoreChoice> choice =
        amalgam::core::ChooseBlasCore(
            absl::GetFlag(FLAGS_blas_core), env_core != nullptr ? env_core : "",
            blas.core, amalgam::core::DetectCpuFeatures());
    if (!choice.ok()) {
      std::fprintf(stderr, "amalgamd: %s\n",
                   std::string(choice.status().message()).c_str());
      return false;
    }
    std::vector<std::pair<std::string, std::string>> env;
    if (!choice->core.empty()) {
      env.emplace_back("OPENBLAS_CORETYPE", choice->core);
      env.emplace_back(
          kBlasChosenEnv,
          absl::StrCat(choice->core, "\t", blas.core, "\t", choice->reason));
    }
    if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
      env.emplace_back("OMP_WAIT_POLICY", "PASSIVE");
    }
    if (!env.empty()) Restart(argv, env);
    reason = choice->reason;
  }
  if (!check.has_value()) check = amalgam::core::CheckGemm();
  if (!check->ok()) {
    std::fprintf(stderr, "amalgamd: the BLAS (%s, core %s) is broken: %s\n",
                 blas.library.c_str(), blas.core.c_str(),
                 std::string(check->message()).c_str());
    return false;
  }
  Log(LogLevel::kInfo, LogFields("blas")
                           .Add("library", blas.library)
                           .Add("core", blas.core.empty() ? "-" : blas.core)
                           .Add("reason", reason)
                           .Add("gemm_check", "ok"));
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  using amalgam::server::Log;
  using amalgam::server::LogFields;
  using amalgam::server::LogLevel;
  absl::SetProgramUsageMessage(
      "amalgamd --listen 127.0.0.1:50051 --data-dir ./var/amalgam "
      "[--device auto|cpu|cuda[:N]]");
  std::vector<std::string> normalized = NormalizeFlagNames(argc, argv);
  std::vector<char*> normalized_argv;
  for (std::string& arg : normalized) normalized_argv.push_back(arg.data());
  absl::ParseCommandLine(static_cast<int>(normalized_argv.size()),
                         normalized_argv.data());
  // LibTorch's allocator slot is a plain global: set it before any thread.
  amalgam::core::InstallCpuCache();

  LogLevel level;
  if (!amalgam::server::ParseLogLevel(absl::GetFlag(FLAGS_log_level), &level)) {
    std::fprintf(
        stderr,
        "amalgamd: --log-level must be debug, info, warning or error\n");
    return 2;
  }
  amalgam::server::SetLogLevel(level);

  // Signals are taken synchronously by sigwait below; block them before any
  // thread starts so every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // After the mask: the GEMM check may start LibTorch's threads.
  if (!SetUpBlas(argv)) return 1;

  amalgam::server::ServerOptions options;
  options.listen = absl::GetFlag(FLAGS_listen);
  options.tokens_file = absl::GetFlag(FLAGS_tokens);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  options.allow_plaintext_tokens = absl::GetFlag(FLAGS_allow_plaintext_tokens);
  options.data_dir = absl::GetFlag(FLAGS_data_dir);
  options.catalog = absl::GetFlag(FLAGS_catalog);
  options.replica_name = absl::GetFlag(FLAGS_replica_name);
  options.job_lease = absl::GetFlag(FLAGS_job_lease);
  options.max_attempts = absl::GetFlag(FLAGS_max_attempts);
  options.device = absl::GetFlag(FLAGS_device);
  options.workers = absl::GetFlag(FLAGS_workers);
  options.max_queued_jobs = absl::GetFlag(FLAGS_max_queued_jobs);
  options.max_upload_bytes = absl::GetFlag(FLAGS_max_upload_bytes);
  options.quota_bytes_per_org = absl::GetFlag(FLAGS_quota_bytes_per_org);
  options.disk_reserve_bytes = absl::GetFlag(FLAGS_disk_reserve_bytes);
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  options.drain_timeout = absl::GetFlag(FLAGS_drain_timeout);
  options.max_jobs_per_org = absl::GetFlag(FLAGS_max_jobs_per_org);
  options.max_uploads_per_org = absl::GetFlag(FLAGS_max_uploads_per_org);
  options.max_downloads_per_org = absl::GetFlag(FLAGS_max_downloads_per_org);
  options.max_models_per_job = absl::GetFlag(FLAGS_max_models_per_job);
  options.upload_expiry = absl::GetFlag(FLAGS_upload_expiry);
  options.testing_step_delay = absl::GetFlag(FLAGS_testing_step_delay);
  const int threads = absl::GetFlag(FLAGS_threads);
  if (threads < 0) {
    std::fprintf(stderr, "amalgamd: --threads must be 0 (automatic) or more\n");
    return 2;
  }
  const int usable_cpus = amalgam::core::UsableCpus();
  const int intra_op = threads > 0 ? threads
                                   : amalgam::core::IntraOpThreadsFor(
                                         usable_cpus, options.workers);
  amalgam::core::SetIntraOpThreads(intra_op);
  const char* wait_policy = std::getenv("OMP_WAIT_POLICY");
  Log(LogLevel::kInfo,
      LogFields("threads")
          .Add("intra_op", intra_op)
          .Add("source", threads > 0 ? "--threads" : "auto")
          .Add("usable_cpus", usable_cpus)
          .Add("workers", options.workers)
          .Add("omp_wait_policy", wait_policy != nullptr ? wait_policy : "-"));
  auto server = amalgam::server::Server::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "amalgamd: %s\n",
                 std::string(server.status().message()).c_str());
    return 1;
  }
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty() &&
      !WritePortFile(port_file, (*server)->port(), (*server)->metrics_port())) {
    std::fprintf(stderr, "amalgamd: cannot write --port-file %s\n",
                 port_file.c_str());
    return 1;
  }
  int signal = 0;
  while (sigwait(&signals, &signal) == 0 && signal == SIGHUP) {
    absl::Status status = (*server)->ReloadTokens();
    if (!status.ok()) {
      Log(LogLevel::kError,
          LogFields("tokens_reload_failed").Add("error", status.message()));
    }
  }
  Log(LogLevel::kInfo, LogFields("shutdown").Add("signal", signal));
  (*server)->Shutdown();
  // Exit without the destructors: see Server::Shutdown.
  std::fflush(nullptr);
  std::_Exit(0);
}
