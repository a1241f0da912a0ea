#pragma once

#include <cstdint>

#include "amalgam/v1/amalgam.grpc.pb.h"
#include "server/executor.h"
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
  ArtifactServiceImpl(Storage* storage, Executor* executor,
                      ArtifactServiceOptions options);

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
  grpc::ServerWriteReactor<v1::DownloadChunk>* Download(
      grpc::CallbackServerContext* context,
      const v1::DownloadRequest* request) override;

 private:
  class UploadReactor;
  class DownloadReactor;

  Storage* const storage_;
  Executor* const executor_;
  const ArtifactServiceOptions options_;
};

// The organisation on whose behalf a call runs. Until tokens exist (a later
// issue) every caller is the one local organisation.
std::string CallerOrganization(const grpc::CallbackServerContext& context);

}  // namespace amalgam::server
