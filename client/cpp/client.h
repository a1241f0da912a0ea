#pragma once

// C++ client of the Amalgam API (amalgam.v1): uploads and downloads of
// artifacts, job submission, watching and cancellation.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "amalgam/v1/amalgam.grpc.pb.h"
#include "amalgam/v1/amalgam.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace amalgam::client {

struct ClientOptions {
  // host:port of amalgamd.
  std::string address = "127.0.0.1:50051";
  // Bearer token; when non-empty every call sends
  // `authorization: Bearer <token>`.
  std::string token;
  // Deadline of each unary call. Streaming calls (upload, download, watch)
  // have none: they last as long as the transfer or the job.
  absl::Duration unary_deadline = absl::Seconds(30);
  // gRPC message size limits, both directions.
  int max_send_message_bytes = 16 << 20;
  int max_receive_message_bytes = 16 << 20;
  // TLS: PEM file of the CA that signed the server's certificate. Empty:
  // plaintext. With `tls_cert`/`tls_key` the client also presents a
  // certificate (mutual TLS).
  std::string tls_ca;
  std::string tls_cert;
  std::string tls_key;
  // Bytes per upload chunk; must leave room for framing under
  // max_send_message_bytes.
  int64_t chunk_bytes = 1 << 20;
  // An upload whose stream breaks (UNAVAILABLE, ABORTED) is resumed from the
  // offset the server reports, up to this many times, waiting
  // `retry_backoff`, then twice that, ... (at most 10 s) in between.
  int upload_retries = 5;
  absl::Duration retry_backoff = absl::Milliseconds(200);
  // Uploads smaller than this are hashed before they are sent (their bytes
  // are read twice, the second time from the page cache), so that the
  // upload id comes from the content and an identical file anywhere
  // resumes or reuses the same upload. Larger ones are hashed while they
  // are sent (read once), and their id comes from the files' identity.
  int64_t dedup_below_bytes = int64_t{64} << 20;
};

// Called with bytes done and bytes total as a transfer advances.
using ProgressCallback = std::function<void(int64_t done, int64_t total)>;
// Called with every event of a watched job, the final one included.
using JobEventCallback = std::function<void(const amalgam::v1::JobEvent&)>;

// Converts a gRPC status to an absl::Status: same numeric code, the server's
// message. The only such conversion in the client.
absl::Status FromGrpcStatus(const grpc::Status& status);

// True for SUCCEEDED, FAILED and CANCELLED.
bool IsFinal(amalgam::v1::JobState state);

// One file of what an upload sends: its size, device, inode and
// modification time (ns) when the upload began.
struct UploadPart {
  std::string path;
  int64_t size = 0;
  uint64_t device = 0;
  uint64_t inode = 0;
  int64_t mtime_ns = 0;
};

// A connection to one server. Methods return the server's status code and
// message on failure. Thread-safe: calls may run concurrently.
class Client {
 public:
  // INVALID_ARGUMENT for unusable options. Does not connect: the first call
  // does, and fails with UNAVAILABLE when nothing listens.
  static absl::StatusOr<std::unique_ptr<Client>> Create(
      const ClientOptions& options);

  Client(const ClientOptions& options, std::shared_ptr<grpc::Channel> channel);

  // Streams the file at `path`, or the files of the model directory at
  // `path` one after the other, as a resumable upload, hashing while it
  // sends (the digest goes in the trailer): when the stream breaks, asks
  // the server how much it holds (GetUpload), checks that the file still
  // begins with those bytes (FAILED_PRECONDITION naming it otherwise) and
  // sends the rest, as `upload_retries` allows. `describes` names the
  // weights artifact that a gram or fisher file belongs to (may be empty).
  // `upload_id` names the upload; by default it is derived from kind, name,
  // describes, size and the files' names, sizes, devices, inodes and
  // modification times, so uploading the same files again after an
  // interruption (from any process) resumes it. With `dedup`, or under
  // `dedup_below_bytes`, the files are hashed first and the id comes from
  // the sha256 instead. NOT_FOUND when the file is missing. Returns the new
  // artifact.
  absl::StatusOr<amalgam::v1::Artifact> Upload(
      amalgam::v1::ArtifactKind kind, const std::string& path,
      const std::string& name, const std::string& describes,
      const ProgressCallback& progress = nullptr,
      const std::string& upload_id = "", bool dedup = false);
  // How many bytes of upload `upload_id` the server holds.
  absl::StatusOr<amalgam::v1::UploadStatus> GetUpload(
      const std::string& upload_id);

  absl::StatusOr<amalgam::v1::ListArtifactsResponse> ListArtifacts(
      amalgam::v1::ArtifactKind kind = amalgam::v1::ARTIFACT_KIND_UNSPECIFIED);
  absl::StatusOr<amalgam::v1::Artifact> GetArtifact(const std::string& id);
  // Owner only; FAILED_PRECONDITION while a job uses the artifact.
  absl::StatusOr<amalgam::v1::DeleteArtifactResponse> DeleteArtifact(
      const amalgam::v1::DeleteArtifactRequest& request);
  // Owner only: grants (or, with `revoke`, withdraws) read access.
  absl::StatusOr<amalgam::v1::ShareArtifactResponse> ShareArtifact(
      const amalgam::v1::ShareArtifactRequest& request);

  // Streams file `file` of the artifact (empty: its one .safetensors file;
  // FAILED_PRECONDITION for a sharded model) into `out_path + ".tmp"`,
  // checks the size and the sha256 announced in the first chunk, fsyncs and
  // renames to `out_path`. DATA_LOSS on a mismatch (the temporary file is
  // removed). Returns the file's size and sha256 as announced.
  absl::StatusOr<amalgam::v1::DownloadChunk> Download(
      const std::string& artifact_id, const std::string& out_path,
      const ProgressCallback& progress = nullptr, const std::string& file = "");
  // Downloads every file of the artifact's model directory into `dir`
  // (created if missing), each as Download does; progress counts the whole
  // model. Returns the artifact.
  absl::StatusOr<amalgam::v1::Artifact> DownloadModel(
      const std::string& artifact_id, const std::string& dir,
      const ProgressCallback& progress = nullptr);

  absl::StatusOr<amalgam::v1::Job> SubmitJob(
      const amalgam::v1::SubmitJobRequest& request);
  absl::StatusOr<amalgam::v1::Job> GetJob(const std::string& id);
  absl::StatusOr<amalgam::v1::ListJobsResponse> ListJobs();
  // Follows the job until it reaches a final state and returns it (a failed
  // job is an OK status with state FAILED). ABORTED if the stream ends early
  // and the job is still not final.
  absl::StatusOr<amalgam::v1::Job> WatchJob(
      const std::string& id, const JobEventCallback& callback = nullptr);
  absl::StatusOr<amalgam::v1::Job> CancelJob(const std::string& id);

  // The server's grpc.health.v1 status for `service` ("" for the server).
  absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus>
  CheckHealth(const std::string& service = "");

 private:
  // One upload stream: the header, then the parts' bytes from `offset`
  // (the first `offset` bytes are read to check they hash to
  // `held_sha256`), then a trailer with the sha256 where the header has
  // none.
  absl::StatusOr<amalgam::v1::Artifact> SendUpload(
      const amalgam::v1::UploadHeader& header,
      const std::vector<UploadPart>& parts, int64_t offset,
      const std::string& held_sha256, const ProgressCallback& progress);
  // Sets metadata (token) and, for unary calls, the deadline.
  void Prepare(grpc::ClientContext* context, bool unary) const;
  // One unary call, prepared as above; its status as absl's.
  template <typename Stub, typename Request, typename Response>
  absl::StatusOr<Response> Unary(
      Stub& stub,
      grpc::Status (Stub::*method)(grpc::ClientContext*, const Request&,
                                   Response*),
      const Request& request) const;

  const ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<amalgam::v1::ArtifactService::Stub> artifacts_;
  std::unique_ptr<amalgam::v1::JobService::Stub> jobs_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

}  // namespace amalgam::client
