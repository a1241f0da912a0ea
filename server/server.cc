#include "server/server.h"

#include <ATen/Parallel.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/impl/server_builder_plugin.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/runtime.h"
#include "core/status_macros.h"
#include "server/grpc_status.h"
#include "server/log.h"
#include "server/upload_header.h"

namespace amalgam::server {

namespace {

constexpr int kMaxMessageBytes = 8 << 20;

absl::StatusOr<std::string> ReadPem(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Plaintext, TLS, or mutual TLS, from the --tls-* options.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeCredentials(
    const ServerOptions& options) {
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (options.tls_cert_file.empty()) {
    if (!options.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls-client-ca needs --tls-cert and --tls-key");
    }
    return grpc::InsecureServerCredentials();
  }
  grpc::SslServerCredentialsOptions ssl(
      options.tls_client_ca_file.empty()
          ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
          : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  AMALGAM_ASSIGN_OR_RETURN(pair.cert_chain, ReadPem(options.tls_cert_file));
  AMALGAM_ASSIGN_OR_RETURN(pair.private_key, ReadPem(options.tls_key_file));
  ssl.pem_key_cert_pairs.push_back(pair);
  if (!options.tls_client_ca_file.empty()) {
    AMALGAM_ASSIGN_OR_RETURN(ssl.pem_root_certs,
                             ReadPem(options.tls_client_ca_file));
  }
  return grpc::SslServerCredentials(ssl);
}

// Drops gRPC's reflection plugin from a ServerBuilder (linking the library
// registers it for every builder).
class WithoutReflection : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>*
                         plugins) override {
    plugins->erase(
        std::remove_if(plugins->begin(), plugins->end(),
                       [](const std::unique_ptr<grpc::ServerBuilderPlugin>& p) {
                         return p->name() == "proto_server_reflection";
                       }),
        plugins->end());
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Start(
    const ServerOptions& options) {
  if (options.tokens_file.empty() && !IsLoopbackAddress(options.listen)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--listen ", options.listen,
        " is not a loopback address; without --tokens amalgamd serves "
        "loopback only"));
  }
  if (options.workers < 1 || options.max_queued_jobs < 1 ||
      options.verify_threads < 1 || options.max_upload_bytes < 1 ||
      options.max_jobs_per_org < 1 || options.max_uploads_per_org < 1 ||
      options.max_downloads_per_org < 1 || options.max_models_per_job < 2 ||
      options.upload_expiry <= absl::ZeroDuration() ||
      options.quota_bytes_per_org < 0 || options.disk_reserve_bytes < 0 ||
      options.testing_step_delay < absl::ZeroDuration() ||
      options.job_lease < absl::Milliseconds(300) || options.max_attempts < 1) {
    return absl::InvalidArgumentError(
        "--workers, --max-queued-jobs, --verify-threads, --max-upload-bytes, "
        "--max-jobs-per-org, --max-uploads-per-org, --max-downloads-per-org, "
        "--max-attempts and --upload-expiry must be positive, --job-lease "
        "300ms or more, --max-models-per-job 2 or "
        "more; --quota-bytes-per-org and --disk-reserve-bytes not "
        "negative");
  }
  const bool plaintext_tokens = !options.tokens_file.empty() &&
                                options.tls_cert_file.empty() &&
                                !IsLoopbackAddress(options.listen);
  if (plaintext_tokens && !options.allow_plaintext_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--listen ", options.listen,
        " is not a loopback address, so bearer tokens would cross the network "
        "in plaintext: serve TLS (--tls-cert, --tls-key), or give "
        "--allow-plaintext-tokens when a service mesh or ingress terminates "
        "TLS in front of amalgamd"));
  }
  AMALGAM_ASSIGN_OR_RETURN(std::string device,
                           core::ResolveDevice(options.device));
  SetPrivateDirectory(options.data_dir);
  auto server = std::unique_ptr<Server>(new Server());
  if (!options.tokens_file.empty()) {
    AMALGAM_ASSIGN_OR_RETURN(server->tokens_,
                             TokenStore::Load(options.tokens_file));
  }
  std::string replica_name = options.replica_name;
  // It names a directory under tmp/ and the jobs' runner.
  AMALGAM_RETURN_IF_ERROR(
      ValidateIdentifier(replica_name, "--replica-name", 128));
  if (replica_name == "." || replica_name == "..") {
    return absl::InvalidArgumentError(
        "--replica-name may not be \".\" or \"..\"");
  }
  if (replica_name.empty()) {
    char host[256] = {};
    ::gethostname(host, sizeof(host) - 1);
    replica_name = absl::StrCat(host, "-", ::getpid());
  }
  const bool sole_process = options.catalog == "sqlite";
  server->metrics_ =
      std::make_unique<Metrics>(device, sole_process ? "" : replica_name);
  AMALGAM_ASSIGN_OR_RETURN(server->storage_,
                           Storage::Open(options.data_dir, options.catalog,
                                         sole_process ? "" : replica_name));
  server->executor_ =
      std::make_unique<Executor>(options.verify_threads, /*max_queued=*/256);
  // Unary calls: catalog reads and writes (with their fsyncs), off the gRPC
  // reaction threads.
  server->rpc_executor_ =
      std::make_unique<Executor>(/*threads=*/8, /*max_queued=*/4096);
  // Download streams' file reads: one task per stream at a time.
  server->io_executor_ =
      std::make_unique<Executor>(/*threads=*/8, /*max_queued=*/4096);
  if (!sole_process) {
    AMALGAM_ASSIGN_OR_RETURN(server->job_changes_,
                             ListenForJobChanges(options.catalog));
  }
  JobManagerOptions job_options;
  job_options.job_changes = server->job_changes_.get();
  job_options.workers = options.workers;
  job_options.max_queued = options.max_queued_jobs;
  job_options.max_active_per_org = options.max_jobs_per_org;
  job_options.testing_step_delay = options.testing_step_delay;
  job_options.device = device;
  job_options.max_output_bytes = options.max_upload_bytes;
  job_options.max_models_per_job = options.max_models_per_job;
  job_options.quota_bytes_per_org = options.quota_bytes_per_org;
  job_options.disk_reserve_bytes = options.disk_reserve_bytes;
  job_options.metrics = server->metrics_.get();
  job_options.replica_name = replica_name;
  job_options.sole_process = sole_process;
  job_options.job_lease = options.job_lease;
  job_options.max_attempts = options.max_attempts;
  {
    // What decides a result's last bits; every run of a job shares it.
    const core::BlasInfo blas = core::GetBlasInfo();
    job_options.numeric_config =
        absl::StrCat("blas=", blas.core.empty() ? "unknown" : blas.core,
                     " threads=", at::get_num_threads(),
                     " device=", device.substr(0, device.find(':')));
  }
  server->jobs_ =
      std::make_unique<JobManager>(server->storage_.get(), job_options);
  AMALGAM_RETURN_IF_ERROR(server->jobs_->Recover());

  UploadOptions upload_options;
  upload_options.max_upload_bytes = options.max_upload_bytes;
  upload_options.max_uploads_per_org = options.max_uploads_per_org;
  upload_options.upload_expiry = options.upload_expiry;
  upload_options.quota_bytes_per_org = options.quota_bytes_per_org;
  upload_options.disk_reserve_bytes = options.disk_reserve_bytes;
  upload_options.metrics = server->metrics_.get();
  upload_options.holder = replica_name;
  // The lease a replica holds its upload streams by is its jobs' lease.
  upload_options.stream_lease = options.job_lease;
  server->uploads_ =
      std::make_unique<UploadManager>(server->storage_.get(), upload_options);
  HousekeepingOptions housekeeping;
  housekeeping.holder = replica_name;
  housekeeping.period = std::clamp(options.upload_expiry / 4,
                                   absl::Milliseconds(250), absl::Minutes(1));
  server->housekeeper_ = std::make_unique<Housekeeper>(
      server->storage_.get(), server->uploads_.get(), housekeeping);
  ArtifactServiceOptions artifact_options;
  artifact_options.max_downloads_per_org = options.max_downloads_per_org;
  artifact_options.metrics = server->metrics_.get();
  server->artifact_service_ = std::make_unique<ArtifactServiceImpl>(
      server->storage_.get(), server->uploads_.get(), server->executor_.get(),
      server->rpc_executor_.get(), server->io_executor_.get(),
      server->jobs_.get(), server->tokens_.get(), artifact_options);
  server->job_service_ = std::make_unique<JobServiceImpl>(
      server->jobs_.get(), server->tokens_.get(), server->rpc_executor_.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  AMALGAM_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                           MakeCredentials(options));
  builder.AddListeningPort(options.listen, credentials, &server->port_);
  // Reflection lists every service and message to whoever asks, and gRPC's
  // implementation cannot check a token: it is served only without --tokens
  // (loopback, one organisation).
  if (!options.tokens_file.empty()) {
    builder.SetOption(std::make_unique<WithoutReflection>());
  }
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  builder.RegisterService(server->artifact_service_.get());
  builder.RegisterService(server->job_service_.get());
  std::vector<
      std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
      observers;
  observers.push_back(std::make_unique<RpcObserverFactory>(
      server->metrics_.get(), server->tokens_.get()));
  builder.experimental().SetInterceptorCreators(std::move(observers));
  server->grpc_server_ = builder.BuildAndStart();
  if (server->grpc_server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen));
  }
  if (!options.metrics_listen.empty()) {
    Storage* storage = server->storage_.get();
    JobManager* jobs = server->jobs_.get();
    Metrics* metrics = server->metrics_.get();
    AMALGAM_ASSIGN_OR_RETURN(
        server->metrics_server_,
        MetricsServer::Start(
            options.metrics_listen, metrics, [storage, jobs, metrics] {
              const auto [queued, running] = jobs->Counts();
              metrics->SetQueue(queued, running);
              metrics->RefreshDeviceMemory();
              absl::StatusOr<std::pair<int64_t, int64_t>> stored =
                  storage->Stats();
              if (stored.ok()) {
                metrics->SetStored(stored->first, stored->second);
              }
            }));
  }
  if (plaintext_tokens) {
    Log(LogLevel::kWarning,
        LogFields("plaintext_tokens")
            .Add("listen", options.listen)
            .Add("reason",
                 "--allow-plaintext-tokens: bearer tokens arrive without TLS; "
                 "a mesh or ingress must terminate TLS in front of amalgamd"));
  }
  server->drain_timeout_ = options.drain_timeout;
  server->grpc_server_->GetHealthCheckService()->SetServingStatus(true);
  server->catalog_check_ = std::thread([s = server.get()] {
    bool reachable = true;
    while (!s->stop_catalog_check_.WaitForNotificationWithTimeout(
        absl::Seconds(1))) {
      const absl::Status status = s->storage_->catalog()->Ping();
      if (status.ok() == reachable) continue;
      reachable = status.ok();
      s->grpc_server_->GetHealthCheckService()->SetServingStatus(reachable);
      Log(reachable ? LogLevel::kInfo : LogLevel::kError,
          reachable ? LogFields("catalog_reachable")
                    : LogFields("catalog_unreachable")
                          .Add("error", status.message()));
    }
  });
  Log(LogLevel::kInfo,
      LogFields("serving")
          .Add("listen", options.listen)
          .Add("port", server->port_)
          .Add("data_dir", options.data_dir)
          .Add("catalog", options.catalog == "sqlite" ? "sqlite" : "postgresql")
          .Add("metrics_port", server->metrics_port())
          .Add("device", device)
          .Add("workers", options.workers)
          .Add("runtime", core::DescribeRuntime()));
  return server;
}

absl::Status Server::ReloadTokens() {
  if (tokens_ == nullptr) return absl::OkStatus();
  AMALGAM_RETURN_IF_ERROR(tokens_->Reload());
  Log(LogLevel::kInfo,
      LogFields("tokens_reloaded").Add("tokens", tokens_->size()));
  return absl::OkStatus();
}

void Server::Shutdown() {
  if (grpc_server_ == nullptr || stopped_) return;
  stopped_ = true;
  stop_catalog_check_.Notify();
  if (catalog_check_.joinable()) catalog_check_.join();
  // Drain: health says NOT_SERVING (load balancers stop sending), no new job
  // starts, running ones get drain_timeout to finish.
  grpc_server_->GetHealthCheckService()->SetServingStatus(false);
  Log(LogLevel::kInfo, LogFields("draining"));
  jobs_->Drain(drain_timeout_);
  grpc_server_->Shutdown(std::chrono::system_clock::now() +
                         std::chrono::seconds(5));
  grpc_server_->Wait();
  // The metrics server's scrape callback reads the job manager: stop it first.
  metrics_server_.reset();
  housekeeper_.reset();
  jobs_.reset();
  Log(LogLevel::kInfo, LogFields("stopped"));
}

Server::~Server() { Shutdown(); }

}  // namespace amalgam::server
