#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "amalgam/v1/amalgam.grpc.pb.h"
#include "server/auth.h"
#include "server/executor.h"
#include "server/job_manager.h"
#include "server/metrics.h"
#include "server/storage.h"
#include "server/upload_manager.h"

namespace amalgam::server {

struct ArtifactServiceOptions {
  // Size of download chunks.
  int64_t chunk_bytes = int64_t{1} << 20;
  // Download streams one organisation may have open at once.
  int max_downloads_per_org = 8;
  // Where downloads are counted; may be null.
  Metrics* metrics = nullptr;
};

// The gRPC face of artifacts: upload (the protocol is `uploads`'s; the
// reactor moves messages, and the blocking verification runs on
// `executor`), list, get, share, delete and download.
class ArtifactServiceImpl final : public v1::ArtifactService::CallbackService {
 public:
  // `tokens` may be null (no authentication: one local organisation).
  // Unary calls run on `rpc_executor`, the file reads of download streams
  // on `io_executor`.
  ArtifactServiceImpl(Storage* storage, UploadManager* uploads,
                      Executor* executor, Executor* rpc_executor,
                      Executor* io_executor, JobManager* jobs,
                      const TokenStore* tokens, ArtifactServiceOptions options);

  grpc::ServerReadReactor<v1::UploadRequest>* Upload(
      grpc::CallbackServerContext* context,
      v1::UploadResponse* response) override;
  // How many bytes of a resumable upload the server holds; NOT_FOUND when
  // the id is unknown to the caller's organisation, finished or expired.
  grpc::ServerUnaryReactor* GetUpload(grpc::CallbackServerContext* context,
                                      const v1::GetUploadRequest* request,
                                      v1::UploadStatus* response) override;
  grpc::ServerUnaryReactor* ListArtifacts(
      grpc::CallbackServerContext* context,
      const v1::ListArtifactsRequest* request,
      v1::ListArtifactsResponse* response) override;
  grpc::ServerUnaryReactor* GetArtifact(grpc::CallbackServerContext* context,
                                        const v1::GetArtifactRequest* request,
                                        v1::Artifact* response) override;
  // Owner only; FAILED_PRECONDITION while a queued or running job uses it.
  grpc::ServerUnaryReactor* DeleteArtifact(
      grpc::CallbackServerContext* context,
      const v1::DeleteArtifactRequest* request,
      v1::DeleteArtifactResponse* response) override;
  // Owner only: grants (or revokes) another organisation read access.
  grpc::ServerUnaryReactor* ShareArtifact(
      grpc::CallbackServerContext* context,
      const v1::ShareArtifactRequest* request,
      v1::ShareArtifactResponse* response) override;
  grpc::ServerWriteReactor<v1::DownloadChunk>* Download(
      grpc::CallbackServerContext* context,
      const v1::DownloadRequest* request) override;

 private:
  class UploadReactor;
  class DownloadReactor;

  // Download streams open per organisation, at most `max_per_org` each (in
  // this process).
  class OrgSlots {
   public:
    OrgSlots(int max_per_org, std::string what)
        : max_per_org_(max_per_org), what_(std::move(what)) {}
    // RESOURCE_EXHAUSTED, naming the organisation, over the limit.
    absl::Status Acquire(const std::string& owner);
    void Release(const std::string& owner);

   private:
    const int max_per_org_;
    const std::string what_;  // "downloads"
    absl::Mutex mu_;
    std::map<std::string, int> per_org_ ABSL_GUARDED_BY(mu_);
  };

  // The artifact if `org` owns it; NOT_FOUND if it cannot read it,
  // PERMISSION_DENIED if it may only read it.
  absl::StatusOr<v1::Artifact> OwnedArtifact(const std::string& id,
                                             const std::string& org);

  Storage* const storage_;
  UploadManager* const uploads_;
  Executor* const executor_;
  Executor* const rpc_executor_;
  Executor* const io_executor_;
  JobManager* const jobs_;
  const TokenStore* const tokens_;
  const ArtifactServiceOptions options_;
  OrgSlots downloads_;
};

}  // namespace amalgam::server
