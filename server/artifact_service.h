#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "amalgam/v1/amalgam.grpc.pb.h"
#include "server/auth.h"
#include "server/executor.h"
#include "server/job_manager.h"
#include "server/metrics.h"
#include "server/storage.h"

namespace amalgam::server {

struct ArtifactServiceOptions {
  // Largest upload accepted, in bytes.
  int64_t max_upload_bytes = int64_t{64} << 30;
  // Size of download chunks.
  int64_t chunk_bytes = int64_t{1} << 20;
  // Upload streams one organisation may have open at once.
  int max_uploads_per_org = 8;
  // Download streams one organisation may have open at once.
  int max_downloads_per_org = 8;
  // A resumable upload untouched this long is removed with its bytes.
  absl::Duration upload_expiry = absl::Hours(24);
  // Where transfers are counted; may be null.
  Metrics* metrics = nullptr;
  // Bytes one organisation may hold (artifacts, partial uploads, outputs of
  // its queued and running jobs); 0: unlimited.
  int64_t quota_bytes_per_org = 0;
  // Bytes kept free on the data volume: an upload that would eat into them
  // is refused before its first byte.
  int64_t disk_reserve_bytes = 0;
};

// Upload (verified against the declared sha256 and validated by kind before
// the artifact becomes visible), list, get and download of artifacts.
// Blocking verification runs on `executor`, not on gRPC threads.
class ArtifactServiceImpl final : public v1::ArtifactService::CallbackService {
 public:
  // `tokens` may be null (no authentication: one local organisation).
  // Unary calls run on `rpc_executor`, the reads and writes of upload and
  // download streams on `io_executor`.
  ArtifactServiceImpl(Storage* storage, Executor* executor,
                      Executor* rpc_executor, Executor* io_executor,
                      JobManager* jobs, const TokenStore* tokens,
                      ArtifactServiceOptions options);
  // Stops the expiry of abandoned uploads.
  ~ArtifactServiceImpl() override;

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

  // Streams of one kind open per organisation, at most `max_per_org` each.
  class OrgSlots {
   public:
    OrgSlots(int max_per_org, std::string what)
        : max_per_org_(max_per_org), what_(std::move(what)) {}
    // RESOURCE_EXHAUSTED, naming the organisation, over the limit.
    absl::Status Acquire(const std::string& owner);
    void Release(const std::string& owner);

   private:
    const int max_per_org_;
    const std::string what_;  // "uploads", "downloads"
    absl::Mutex mu_;
    std::map<std::string, int> per_org_ ABSL_GUARDED_BY(mu_);
  };

  // Upload streams in progress: per-organisation counts (the limit) and the
  // resumable ids being received, so one id has one stream at a time.
  class UploadTracker {
   public:
    explicit UploadTracker(int max_per_org) : slots_(max_per_org, "uploads") {}
    // RESOURCE_EXHAUSTED over the limit; ABORTED if `upload_id` (may be
    // empty) is already being received, after cancelling that stream (its
    // client is most likely gone).
    absl::Status Acquire(const std::string& owner, const std::string& upload_id,
                         grpc::CallbackServerContext* context);
    void Release(const std::string& owner, const std::string& upload_id);
    // Removes a stale upload unless a stream is receiving it or it was
    // touched since `cutoff_unix_seconds`.
    void RemoveIfIdle(Storage* storage, const std::string& owner,
                      const std::string& upload_id,
                      int64_t cutoff_unix_seconds);

   private:
    OrgSlots slots_;
    absl::Mutex mu_;
    std::map<std::pair<std::string, std::string>, grpc::CallbackServerContext*>
        active_ ABSL_GUARDED_BY(mu_);
  };

  // Removes uploads untouched for options_.upload_expiry, until stopped.
  void ExpireUploads();

  // The artifact if `org` owns it; NOT_FOUND if it cannot read it,
  // PERMISSION_DENIED if it may only read it.
  absl::StatusOr<v1::Artifact> OwnedArtifact(const std::string& id,
                                             const std::string& org);

  Storage* const storage_;
  Executor* const executor_;
  Executor* const rpc_executor_;
  Executor* const io_executor_;
  JobManager* const jobs_;
  const TokenStore* const tokens_;
  const ArtifactServiceOptions options_;
  UploadTracker uploads_;
  OrgSlots downloads_;
  absl::Mutex stop_mu_;
  bool stopping_ ABSL_GUARDED_BY(stop_mu_) = false;
  std::thread expirer_;
};

}  // namespace amalgam::server
