#pragma once

#include <grpcpp/support/server_interceptor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/status/statusor.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace httplib {
class Server;
}

namespace amalgam::server {

class TokenStore;

// The server's Prometheus metrics (prometheus-cpp registry, text format).
// Names follow the Prometheus conventions: `amalgam_` prefix, `_total` for
// counters, base units (`_seconds`, `_bytes`). Thread-safe.
class Metrics {
 public:
  // `device` is the resolved device ("cpu", "cuda:0"). `replica`, where
  // several processes share a catalog: the `replica` label of the metrics
  // that differ per process (none where it is empty).
  explicit Metrics(const std::string& device, const std::string& replica = "");

  // One finished RPC (from the interceptor).
  void RpcDone(const std::string& method, const std::string& code,
               double seconds);
  // Artifact bytes received by uploads and sent by downloads.
  void BytesReceived(int64_t bytes) { received_->Increment(bytes); }
  void BytesSent(int64_t bytes) { sent_->Increment(bytes); }
  // Upload streams open now.
  void UploadStarted() { uploads_in_progress_->Increment(); }
  void UploadEnded() { uploads_in_progress_->Decrement(); }
  // A job reached a final state; `method` is the merge method or "-".
  void JobFinished(const std::string& kind, const std::string& method,
                   const std::string& state, double seconds,
                   uint64_t output_bytes);
  // Refreshed before each scrape.
  void SetQueue(int64_t queued, int64_t running);
  void SetStored(int64_t artifacts, int64_t bytes);
  // Reads the device's memory in use and in total (refreshed per scrape).
  void RefreshDeviceMemory();

  // The text exposition of every metric.
  std::string Serialize() const;

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* rpcs_;
  prometheus::Family<prometheus::Histogram>* rpc_seconds_;
  prometheus::Family<prometheus::Counter>* jobs_;
  prometheus::Family<prometheus::Histogram>* job_seconds_;
  prometheus::Family<prometheus::Counter>* job_output_bytes_;
  prometheus::Family<prometheus::Gauge>* job_throughput_;
  prometheus::Counter* received_;
  prometheus::Counter* sent_;
  prometheus::Gauge* uploads_in_progress_;
  prometheus::Gauge* queued_;
  prometheus::Gauge* running_;
  prometheus::Gauge* artifacts_;
  prometheus::Gauge* stored_bytes_;
  const std::string device_;
  prometheus::Gauge* device_used_;
  prometheus::Gauge* device_total_;
};

// The `method` label of an RPC: its full name when amalgamd serves that
// method, else kUnknownMethod, so that callers cannot add label values (nor
// grow /metrics) by calling made-up methods.
inline constexpr char kUnknownMethod[] = "unknown";
std::string MethodLabel(const char* method);

// Memory of `device` in bytes: {used, total}. For "cpu" the process's
// resident set and the machine's memory; for "cuda:N" what the CUDA runtime
// reports (loaded at run time, so a CPU-only build needs no CUDA). {0, 0}
// when unknown.
std::pair<int64_t, int64_t> DeviceMemory(const std::string& device);

// Counts and times every RPC into `metrics` and writes one log line per RPC:
// method, organisation, code, duration and bytes sent.
class RpcObserverFactory
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  // `tokens` may be null (every caller is `local`).
  RpcObserverFactory(Metrics* metrics, const TokenStore* tokens)
      : metrics_(metrics), tokens_(tokens) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;

 private:
  Metrics* const metrics_;
  const TokenStore* const tokens_;
};

// Serves GET /metrics over HTTP (cpp-httplib: prometheus-cpp's civetweb
// exposer cannot start in a process that links LibTorch).
class MetricsServer {
 public:
  // `address` is host:port (port 0 picks one); `refresh` runs before each
  // scrape. UNAVAILABLE if the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& address, const Metrics* metrics,
      std::function<void()> refresh);
  ~MetricsServer();

  int port() const { return port_; }

 private:
  MetricsServer() = default;

  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace amalgam::server
