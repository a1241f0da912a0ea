#pragma once

#include <cstdint>

#include "amalgam/v1/amalgam.grpc.pb.h"
#include "server/auth.h"
#include "server/executor.h"
#include "server/job_manager.h"
#include "server/storage.h"

namespace amalgam::server {

struct ArtifactServiceOptions {
  // Largest upload accepted, in bytes.
  int64_t max_upload_bytes = int64_t{64} << 30;
  // Size of download chunks.
  int64_t chunk_bytes = int64_t{1} << 20;
};

// Upload (verified against the declared sha256 and validated by kind before
// the artifact becomes visible), list, get and download of artifacts.
// Blocking verification runs on `executor`, not on gRPC threads.
class ArtifactServiceImpl final : public v1::ArtifactService::CallbackService {
 public:
  // `tokens` may be null (no authentication: one local organisation).
  ArtifactServiceImpl(Storage* storage, Executor* executor, JobManager* jobs,
                      const TokenStore* tokens, ArtifactServiceOptions options);

  grpc::ServerReadReactor<v1::UploadRequest>* Upload(
      grpc::CallbackServerContext* context,
      v1::UploadResponse* response) override;
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

  // The artifact if `org` owns it; NOT_FOUND if it cannot read it,
  // PERMISSION_DENIED if it may only read it.
  absl::StatusOr<v1::Artifact> OwnedArtifact(const std::string& id,
                                             const std::string& org);

  Storage* const storage_;
  Executor* const executor_;
  JobManager* const jobs_;
  const TokenStore* const tokens_;
  const ArtifactServiceOptions options_;
};

}  // namespace amalgam::server
