#include "server/metrics.h"

#include <dlfcn.h>
#include <httplib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "amalgam/v1/amalgam.pb.h"
#include "core/runtime.h"
#include "google/protobuf/descriptor.h"
#include "prometheus/text_serializer.h"
#include "server/auth.h"
#include "server/log.h"

#ifndef AMALGAM_VERSION
#define AMALGAM_VERSION "unknown"
#endif

namespace amalgam::server {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

const Histogram::BucketBoundaries& RpcBuckets() {
  static const auto* buckets = new Histogram::BucketBoundaries{
      0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300};
  return *buckets;
}

const Histogram::BucketBoundaries& JobBuckets() {
  static const auto* buckets = new Histogram::BucketBoundaries{
      0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400};
  return *buckets;
}

// The (kind, method) pairs a finished job is counted under: merges by
// method, grow and sweep with method "-" (as JobManager reports them).
std::vector<std::pair<std::string, std::string>> JobLabels() {
  std::vector<std::pair<std::string, std::string>> labels;
  const google::protobuf::EnumDescriptor* methods =
      v1::MergeMethod_descriptor();
  for (int i = 0; i < methods->value_count(); ++i) {
    const int number = methods->value(i)->number();
    if (number == v1::MERGE_METHOD_UNSPECIFIED) continue;
    labels.emplace_back("merge",
                        absl::AsciiStrToLower(absl::StripPrefix(
                            methods->value(i)->name(), "MERGE_METHOD_")));
  }
  labels.emplace_back("grow", "-");
  labels.emplace_back("sweep", "-");
  return labels;
}

// The full names (/package.Service/Method) of the methods amalgamd serves:
// its own from their descriptors, the standard ones (served by gRPC's own
// implementations, whose descriptors are not in this process's pool) by name.
const std::set<std::string>& KnownMethods() {
  static const auto* methods = [] {
    auto* names = new std::set<std::string>{
        "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"};
    for (const char* service :
         {"amalgam.v1.ArtifactService", "amalgam.v1.JobService"}) {
      const google::protobuf::ServiceDescriptor* descriptor =
          google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
              service);
      if (descriptor == nullptr) continue;
      for (int i = 0; i < descriptor->method_count(); ++i) {
        names->insert(
            absl::StrCat("/", service, "/", descriptor->method(i)->name()));
      }
    }
    return names;
  }();
  return *methods;
}

// Observes one RPC: org from its token, bytes sent, code and duration.
class RpcObserver : public grpc::experimental::Interceptor {
 public:
  RpcObserver(grpc::experimental::ServerRpcInfo* info, Metrics* metrics,
              const TokenStore* tokens)
      : method_(MethodLabel(info->method())),
        path_(info->method() != nullptr ? info->method() : ""),
        metrics_(metrics),
        tokens_(tokens),
        start_(absl::Now()) {}

  void Intercept(
      grpc::experimental::InterceptorBatchMethods* methods) override {
    using Hook = grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(Hook::POST_RECV_INITIAL_METADATA)) {
      org_ = Organization(*methods->GetRecvInitialMetadata());
    }
    if (methods->QueryInterceptionHookPoint(Hook::PRE_SEND_MESSAGE)) {
      if (grpc::ByteBuffer* buffer = methods->GetSerializedSendMessage()) {
        sent_bytes_ += static_cast<int64_t>(buffer->Length());
      }
    }
    if (methods->QueryInterceptionHookPoint(Hook::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      const std::string code = absl::StatusCodeToString(
          static_cast<absl::StatusCode>(status.error_code()));
      const double seconds = absl::ToDoubleSeconds(absl::Now() - start_);
      metrics_->RpcDone(method_, code, seconds);
      LogFields fields("rpc");
      fields.Add("method", method_);
      // An unknown method's path is the caller's: logged cut and escaped.
      if (method_ == kUnknownMethod) fields.Add("path", path_);
      Log(LogLevel::kInfo,
          fields.Add("org", org_)
              .Add("code", code)
              .Add("duration_ms", absl::StrFormat("%.3f", seconds * 1000))
              .Add("sent_bytes", sent_bytes_));
    }
    methods->Proceed();
  }

 private:
  std::string Organization(
      const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) {
    if (tokens_ == nullptr) return kLocalOrganization;
    auto it = metadata.find("authorization");
    if (it == metadata.end()) return "-";
    const std::string value(it->second.data(), it->second.size());
    if (!absl::StartsWith(value, "Bearer ")) return "-";
    absl::StatusOr<std::string> org = tokens_->Lookup(value.substr(7));
    return org.ok() ? *org : "-";
  }

  const std::string method_;
  const std::string path_;
  Metrics* const metrics_;
  const TokenStore* const tokens_;
  const absl::Time start_;
  std::string org_ = "-";
  int64_t sent_bytes_ = 0;
};

}  // namespace

std::string MethodLabel(const char* method) {
  if (method == nullptr) return kUnknownMethod;
  return KnownMethods().count(method) > 0 ? std::string(method)
                                          : std::string(kUnknownMethod);
}

std::pair<int64_t, int64_t> DeviceMemory(const std::string& device) {
  if (device == "cpu") {
    int64_t resident_pages = 0, total_kib = 0;
    std::ifstream statm("/proc/self/statm");
    int64_t size_pages = 0;
    statm >> size_pages >> resident_pages;
    std::ifstream meminfo("/proc/meminfo");
    std::string key;
    while (meminfo >> key) {
      if (key == "MemTotal:") {
        meminfo >> total_kib;
        break;
      }
      meminfo.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
    }
    return {resident_pages * ::sysconf(_SC_PAGESIZE), total_kib * 1024};
  }
  int index = 0;
  if (!absl::StartsWith(device, "cuda") ||
      (device.size() > 5 && !absl::SimpleAtoi(device.substr(5), &index))) {
    return {0, 0};
  }
  // The CUDA runtime's cudaSetDevice / cudaMemGetInfo, if it is loaded.
  using SetDevice = int (*)(int);
  using MemGetInfo = int (*)(size_t*, size_t*);
  static void* cudart = []() -> void* {
    // Whichever CUDA runtime LibTorch loaded, else one on the search path.
    for (const char* name :
         {"libcudart.so.12", "libcudart.so.11.0", "libcudart.so"}) {
      if (void* handle = dlopen(name, RTLD_NOW | RTLD_NOLOAD)) return handle;
    }
    for (const char* name :
         {"libcudart.so.12", "libcudart.so.11.0", "libcudart.so"}) {
      if (void* handle = dlopen(name, RTLD_NOW)) return handle;
    }
    return nullptr;
  }();
  if (cudart == nullptr) return {0, 0};
  auto set_device = reinterpret_cast<SetDevice>(dlsym(cudart, "cudaSetDevice"));
  auto get_info = reinterpret_cast<MemGetInfo>(dlsym(cudart, "cudaMemGetInfo"));
  size_t free_bytes = 0, total_bytes = 0;
  if (set_device == nullptr || get_info == nullptr || set_device(index) != 0 ||
      get_info(&free_bytes, &total_bytes) != 0) {
    return {0, 0};
  }
  return {static_cast<int64_t>(total_bytes - free_bytes),
          static_cast<int64_t>(total_bytes)};
}

Metrics::Metrics(const std::string& device, const std::string& replica)
    : registry_(std::make_shared<prometheus::Registry>()), device_(device) {
  prometheus::Registry& r = *registry_;
  // What this process alone counts carries the replica's name; what the
  // catalog counts (queue, stored artifacts) is the same on every replica.
  std::map<std::string, std::string> own;
  if (!replica.empty()) own["replica"] = replica;
  rpcs_ = &BuildCounter()
               .Name("amalgam_rpcs_total")
               .Labels(own)
               .Help("RPCs handled, by method and status code")
               .Register(r);
  rpc_seconds_ = &BuildHistogram()
                      .Name("amalgam_rpc_duration_seconds")
                      .Labels(own)
                      .Help("RPC latency, by method")
                      .Register(r);
  jobs_ = &BuildCounter()
               .Name("amalgam_jobs_total")
               .Labels(own)
               .Help("Jobs finished, by kind, method and final state")
               .Register(r);
  job_seconds_ = &BuildHistogram()
                      .Name("amalgam_job_duration_seconds")
                      .Labels(own)
                      .Help("Time from start to end of finished jobs")
                      .Register(r);
  job_output_bytes_ = &BuildCounter()
                           .Name("amalgam_job_output_bytes_total")
                           .Labels(own)
                           .Help("Bytes written by succeeded jobs")
                           .Register(r);
  job_throughput_ =
      &BuildGauge()
           .Name("amalgam_merge_throughput_bytes_per_second")
           .Labels(own)
           .Help("Output bytes per second of the last succeeded job")
           .Register(r);
  received_ = &BuildCounter()
                   .Name("amalgam_received_bytes_total")
                   .Labels(own)
                   .Help("Artifact bytes received by uploads")
                   .Register(r)
                   .Add({});
  sent_ = &BuildCounter()
               .Name("amalgam_sent_bytes_total")
               .Labels(own)
               .Help("Artifact bytes sent by downloads")
               .Register(r)
               .Add({});
  uploads_in_progress_ = &BuildGauge()
                              .Name("amalgam_uploads_in_progress")
                              .Labels(own)
                              .Help("Upload streams open now")
                              .Register(r)
                              .Add({});
  queued_ = &BuildGauge()
                 .Name("amalgam_jobs_queued")
                 .Help("Jobs waiting to run (queue depth)")
                 .Register(r)
                 .Add({});
  running_ = &BuildGauge()
                  .Name("amalgam_jobs_running")
                  .Help("Jobs running now")
                  .Register(r)
                  .Add({});
  artifacts_ = &BuildGauge()
                    .Name("amalgam_artifacts")
                    .Help("Artifacts in the catalog")
                    .Register(r)
                    .Add({});
  stored_bytes_ = &BuildGauge()
                       .Name("amalgam_stored_bytes")
                       .Help("Bytes of distinct artifact blobs stored")
                       .Register(r)
                       .Add({});
  auto& device_memory = BuildGauge()
                            .Name("amalgam_device_memory_bytes")
                            .Labels(own)
                            .Help(
                                "Memory of the device jobs run on: used "
                                "(cpu: this process's resident set) and "
                                "total")
                            .Register(r);
  device_used_ = &device_memory.Add({{"device", device}, {"kind", "used"}});
  device_total_ = &device_memory.Add({{"device", device}, {"kind", "total"}});
  BuildGauge()
      .Name("amalgam_device_info")
      .Labels(own)
      .Help("The device jobs run on (value 1)")
      .Register(r)
      .Add({{"device", device}})
      .Set(1);
  // Every (kind, method, state) a job can finish with exists from the start
  // at 0: Prometheus's increase() and rate() miss a series' first sample.
  for (const auto& [kind, method] : JobLabels()) {
    for (const char* state : {"succeeded", "failed", "cancelled"}) {
      jobs_->Add({{"kind", kind}, {"method", method}, {"state", state}});
    }
    job_seconds_->Add({{"kind", kind}, {"method", method}}, JobBuckets());
    job_output_bytes_->Add({{"kind", kind}});
  }
  const core::RuntimeInfo runtime = core::GetRuntimeInfo();
  BuildGauge()
      .Name("amalgam_build_info")
      .Labels(own)
      .Help("Version and runtime libraries (value 1)")
      .Register(r)
      .Add({{"version", AMALGAM_VERSION},
            {"libtorch", runtime.libtorch},
            {"blas", runtime.blas.library},
            {"cuda", runtime.cuda}})
      .Set(1);
  BuildGauge()
      .Name("amalgam_blas_info")
      .Labels(own)
      .Help("The BLAS library and the OpenBLAS kernels (core) in use (value 1)")
      .Register(r)
      .Add({{"library", runtime.blas.library}, {"core", runtime.blas.core}})
      .Set(1);
}

void Metrics::RpcDone(const std::string& method, const std::string& code,
                      double seconds) {
  rpcs_->Add({{"method", method}, {"code", code}}).Increment();
  rpc_seconds_->Add({{"method", method}}, RpcBuckets()).Observe(seconds);
}

void Metrics::JobFinished(const std::string& kind, const std::string& method,
                          const std::string& state, double seconds,
                          uint64_t output_bytes) {
  jobs_->Add({{"kind", kind}, {"method", method}, {"state", state}})
      .Increment();
  job_seconds_->Add({{"kind", kind}, {"method", method}}, JobBuckets())
      .Observe(seconds);
  if (state == "succeeded") {
    job_output_bytes_->Add({{"kind", kind}})
        .Increment(static_cast<double>(output_bytes));
    if (seconds > 0) {
      job_throughput_->Add({{"kind", kind}})
          .Set(static_cast<double>(output_bytes) / seconds);
    }
  }
}

void Metrics::SetQueue(int64_t queued, int64_t running) {
  queued_->Set(static_cast<double>(queued));
  running_->Set(static_cast<double>(running));
}

void Metrics::SetStored(int64_t artifacts, int64_t bytes) {
  artifacts_->Set(static_cast<double>(artifacts));
  stored_bytes_->Set(static_cast<double>(bytes));
}

void Metrics::RefreshDeviceMemory() {
  const auto [used, total] = DeviceMemory(device_);
  device_used_->Set(static_cast<double>(used));
  device_total_->Set(static_cast<double>(total));
}

std::string Metrics::Serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

grpc::experimental::Interceptor* RpcObserverFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  return new RpcObserver(info, metrics_, tokens_);
}

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(
    const std::string& address, const Metrics* metrics,
    std::function<void()> refresh) {
  const size_t colon = address.rfind(':');
  int port = -1;
  if (colon == std::string::npos ||
      !absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics-listen ", address, " is not host:port"));
  }
  std::string host = address.substr(0, colon);
  if (host.size() > 1 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  auto server = std::unique_ptr<MetricsServer>(new MetricsServer());
  server->http_ = std::make_unique<httplib::Server>();
  server->http_->Get(
      "/metrics", [metrics, refresh = std::move(refresh)](
                      const httplib::Request&, httplib::Response& response) {
        if (refresh) refresh();
        response.set_content(metrics->Serialize(),
                             "text/plain; version=0.0.4; charset=utf-8");
      });
  if (port == 0) {
    server->port_ = server->http_->bind_to_any_port(host);
  } else if (server->http_->bind_to_port(host, port)) {
    server->port_ = port;
  }
  if (server->port_ <= 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on --metrics-listen ", address));
  }
  httplib::Server* http = server->http_.get();
  auto returned = std::make_shared<std::atomic<bool>>(false);
  server->thread_ = std::thread([http, returned] {
    http->listen_after_bind();
    *returned = true;
  });
  // stop() is a no-op until the loop runs: wait for it, so that stopping
  // right after starting cannot hang; but not for a loop that already ended.
  while (!http->is_running() && !*returned) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (!http->is_running()) {
    server->thread_.join();
    return absl::UnavailableError(
        absl::StrCat("the metrics server on --metrics-listen ", address,
                     " stopped at once"));
  }
  return server;
}

MetricsServer::~MetricsServer() {
  if (http_ != nullptr) http_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace amalgam::server
