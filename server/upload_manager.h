#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "amalgam/v1/amalgam.pb.h"
#include "core/sha256.h"
#include "server/metrics.h"
#include "server/storage.h"

namespace amalgam::server {

struct UploadOptions {
  // Largest upload accepted, in bytes.
  int64_t max_upload_bytes = int64_t{64} << 30;
  // Upload streams one organisation may have open at once.
  int max_uploads_per_org = 8;
  // A resumable upload untouched this long is removed with its bytes.
  absl::Duration upload_expiry = absl::Hours(24);
  // Bytes one organisation may hold (artifacts, partial uploads, outputs of
  // its queued and running jobs); 0: unlimited.
  int64_t quota_bytes_per_org = 0;
  // Bytes kept free on the data volume: an upload that would eat into them
  // is refused before its first byte.
  int64_t disk_reserve_bytes = 0;
  // Where uploads are counted; may be null.
  Metrics* metrics = nullptr;
  // The name this process holds its streams under (see Catalog::OpenStream),
  // and the lease it renews them by.
  std::string holder = "local";
  absl::Duration stream_lease = absl::Seconds(30);
};

// The upload protocol, without gRPC: a header, then chunks at increasing
// offsets, then the end of the stream; the bytes are verified against the
// declared sha256 and validated by kind before the artifact becomes
// visible. An upload with an upload_id is resumable: its bytes are kept
// under uploads/ for a later stream (on any replica) to continue, and once
// finished its id answers with the artifact it made. Thread-safe; one
// Session per stream.
class UploadManager {
 public:
  class Session;

  // Starts the renewal of this process's stream leases.
  UploadManager(Storage* storage, UploadOptions options);
  // Stops it; every Session must be gone.
  ~UploadManager();

  // Starts receiving `owner`'s upload `header` (blocking: catalog calls):
  // checks the header, opens a stream in the catalog (one of the owner's
  // upload slots, cluster-wide), checks the quota and free space, and opens
  // the file (a new one, or the resumable upload's at the bytes it holds).
  // ABORTED if another stream, on any replica, is receiving the same
  // upload id: that stream is cancelled (its client is most likely gone;
  // at once in this process, by its `cancel_other`, else at its holder's
  // next renewal), so that a retry finds the id free.
  absl::StatusOr<std::unique_ptr<Session>> Begin(
      const std::string& owner, const v1::UploadHeader& header,
      std::function<void()> cancel_other);

  // How many bytes of a resumable upload the server holds, and their sha256
  // (reads them); NOT_FOUND when the id is unknown to `owner`.
  absl::StatusOr<v1::UploadStatus> Status(const std::string& owner,
                                          const std::string& upload_id);

  // Removes resumable uploads untouched for the expiry (their rows and
  // bytes). Those being received are touched at each renewal, and those a
  // stream of this process receives are never removed. Returns how many it
  // removed.
  absl::StatusOr<int> ExpireStale();

 private:
  // Refuses, before its first byte, an upload that would take its owner
  // over the byte quota or the data volume into its reserve. `held`: the
  // bytes of it the server already has.
  absl::Status Admit(const std::string& owner, const v1::UploadHeader& header,
                     int64_t held);
  void Release(const std::string& stream);
  // Every period: renews the leases of this process's streams, touches the
  // uploads they receive, and cancels those asked to stop (or all of them,
  // once the catalog has been unreachable for two thirds of a lease: by
  // then another replica may take their upload ids over).
  void RenewLoop();

  struct Active {
    UploadKey upload;  // (owner, upload id); the id empty for a one-shot
    std::function<void()> cancel;
  };

  Storage* const storage_;
  const UploadOptions options_;
  absl::Mutex mu_;
  // This process's open streams, by stream id.
  std::map<std::string, Active> active_ ABSL_GUARDED_BY(mu_);
  // Streams ended whose catalog rows could not be closed (catalog down):
  // closed again at each renewal, which would otherwise keep them.
  std::vector<std::string> unclosed_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread renewer_;
};

class UploadManager::Session {
 public:
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  // Closes the stream (blocking: catalog calls). A one-shot upload not
  // completed loses its bytes; a resumable one keeps them, and its expiry
  // clock restarts.
  ~Session();

  // Set when the upload had finished on an earlier stream (whose response
  // the client lost): the artifact it made. There is nothing to receive.
  const std::optional<v1::Artifact>& finished() const { return finished_; }
  // Bytes the server holds of this upload.
  int64_t received() const { return received_; }

  // Appends a chunk (one write into the page cache; cheap enough for a
  // reaction thread). Its data is moved out. FAILED_PRECONDITION (ABORTED
  // for a resumable upload, which the client resumes from GetUpload) when
  // its offset is not the bytes held; INVALID_ARGUMENT past the declared
  // size; RESOURCE_EXHAUSTED on a full disk.
  absl::Status Append(v1::UploadChunk* chunk);

  // The digest after the last byte, where the header has none:
  // INVALID_ARGUMENT before every declared byte came, for a second
  // trailer, or for one that contradicts the header's sha256.
  absl::Status Trailer(const v1::UploadTrailer& trailer);
  // The stream ended: INVALID_ARGUMENT unless every declared byte came, and
  // the sha256 (in the header or the trailer).
  absl::Status EndOfStream();

  // Blocking, off the reaction threads: verifies the bytes against the
  // declared sha256 (header or trailer; DATA_LOSS), syncs them, validates the
  // content by kind (INVALID_ARGUMENT or FAILED_PRECONDITION) and catalogues
  // the artifact. Bytes that fail verification are discarded, also a resumable
  // upload's.
  absl::StatusOr<v1::Artifact> Complete();

 private:
  friend class UploadManager;
  Session(UploadManager* manager, std::string owner, v1::UploadHeader header);

  // Registers or finds the resumable upload and opens its file.
  absl::Status OpenResumable();
  absl::StatusOr<v1::Artifact> Verify();
  bool CloseFile();

  UploadManager* const manager_;
  const std::string owner_;
  const v1::UploadHeader header_;
  std::string stream_;        // its catalog stream, once opened
  bool resumable_ = false;    // has an upload_id: the file outlives the stream
  bool resumed_ = false;      // began past offset 0: hash the file at the end
  bool bad_content_ = false;  // sha256 or validation failed: discard
  // The sha256 the bytes must have: the header's, or the trailer's.
  std::string expected_sha256_;
  bool trailer_ = false;  // a trailer came
  int64_t received_ = 0;
  std::optional<v1::Artifact> finished_;
  std::optional<v1::Artifact> described_;  // what a statistics upload describes
  core::BackgroundSha256 hash_;
  std::string path_;  // the file being written; empty once catalogued
  std::FILE* file_ = nullptr;
};

}  // namespace amalgam::server
