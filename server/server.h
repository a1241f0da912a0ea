#pragma once

#include <grpcpp/server.h>

#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "server/artifact_service.h"
#include "server/auth.h"
#include "server/executor.h"
#include "server/housekeeping.h"
#include "server/job_manager.h"
#include "server/job_service.h"
#include "server/metrics.h"
#include "server/storage.h"

namespace amalgam::server {

struct ServerOptions {
  // host:port; port 0 picks a free one. Loopback only without tokens_file.
  std::string listen = "127.0.0.1:50051";
  // Token file (`TOKEN ORG` per line); empty: no authentication, every
  // caller is organisation "local".
  std::string tokens_file;
  // TLS: PEM certificate chain and key of the server; both or neither.
  std::string tls_cert_file;
  std::string tls_key_file;
  // Mutual TLS: PEM of the CA that signs client certificates; clients
  // without a valid certificate are refused. Needs tls_cert_file.
  std::string tls_client_ca_file;
  // With tokens on a non-loopback address, plaintext is refused unless set
  // (a mesh or ingress terminates TLS in front of amalgamd).
  bool allow_plaintext_tokens = false;
  std::string data_dir = "./var/amalgam";
  // "sqlite" (catalog.db in data_dir) or a postgresql:// URI.
  std::string catalog = "sqlite";
  // The name this process runs jobs under; empty: hostname and pid.
  std::string replica_name;
  // A runner's lease on its job, and the runs after which a job whose
  // runners stopped fails.
  absl::Duration job_lease = absl::Seconds(30);
  int max_attempts = 3;
  // "auto", "cpu", "cuda" or "cuda:N".
  std::string device = "auto";
  // Jobs that run at once.
  int workers = 1;
  int max_queued_jobs = 64;
  int64_t max_upload_bytes = int64_t{64} << 30;
  // Bytes one organisation may hold (0: unlimited), and bytes kept free on
  // the data volume.
  int64_t quota_bytes_per_org = 0;
  int64_t disk_reserve_bytes = int64_t{128} << 20;
  // Queued plus running jobs per organisation.
  int max_jobs_per_org = 16;
  // Open upload and download streams per organisation.
  int max_uploads_per_org = 8;
  int max_downloads_per_org = 8;
  // Most models one merge may name.
  int max_models_per_job = 64;
  // Unfinished resumable uploads untouched this long are removed.
  absl::Duration upload_expiry = absl::Hours(24);
  // host:port of the Prometheus endpoint (GET /metrics); empty: none.
  std::string metrics_listen = "127.0.0.1:9464";
  // On shutdown, how long running jobs may take to finish.
  absl::Duration drain_timeout = absl::Seconds(30);
  // Tests only: pause after each merged tensor.
  absl::Duration testing_step_delay = absl::ZeroDuration();
  // Threads that verify finished uploads.
  int verify_threads = 2;
};

// amalgamd: storage, job manager and the gRPC services, with
// grpc.health.v1 (unauthenticated, for probes) and, without a token file,
// server reflection.
class Server {
 public:
  // Opens storage, recovers jobs, binds and starts serving.
  // INVALID_ARGUMENT for bad options, UNAVAILABLE if the address cannot be
  // bound.
  static absl::StatusOr<std::unique_ptr<Server>> Start(
      const ServerOptions& options);
  ~Server();

  // The bound ports (metrics: 0 when disabled).
  int port() const { return port_; }
  int metrics_port() const {
    return metrics_server_ != nullptr ? metrics_server_->port() : 0;
  }
  // Reports NOT_SERVING, lets running jobs finish (drain_timeout), stops
  // accepting calls, waits for calls in flight, stops the workers (jobs
  // still running are re-run on the next start). Everything is durable once
  // it returns: a process may exit then without destroying the Server, whose
  // grpc::Server destructor can stall for seconds in gRPC 1.51 after large
  // client streams (grpc/grpc#41050).
  void Shutdown();
  // Re-reads the token file (SIGHUP); the old tokens stay on error.
  absl::Status ReloadTokens();

 private:
  Server() = default;

  int port_ = 0;
  bool stopped_ = false;
  absl::Duration drain_timeout_;
  std::unique_ptr<TokenStore> tokens_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Storage> storage_;
  std::unique_ptr<Executor> executor_;
  std::unique_ptr<Executor> rpc_executor_;
  std::unique_ptr<Executor> io_executor_;
  // Notifications of other replicas' job changes (PostgreSQL catalogs).
  std::unique_ptr<JobChanges> job_changes_;
  std::unique_ptr<JobManager> jobs_;
  std::unique_ptr<UploadManager> uploads_;
  // Expiry of uploads and collection of blobs; stopped with the jobs.
  std::unique_ptr<Housekeeper> housekeeper_;
  std::unique_ptr<ArtifactServiceImpl> artifact_service_;
  std::unique_ptr<JobServiceImpl> job_service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  std::unique_ptr<MetricsServer> metrics_server_;
  // Checks the catalog every second: health says NOT_SERVING while it is
  // unreachable. Stopped (Notify, join) before the drain.
  absl::Notification stop_catalog_check_;
  std::thread catalog_check_;
};

}  // namespace amalgam::server
