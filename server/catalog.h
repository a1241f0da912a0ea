#pragma once

// The catalog: the rows of artifacts, their shares, resumable uploads and
// jobs. Each method is one transaction. Files are not its business (see
// Storage, which pairs catalog rows with blobs). Thread-safe.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "amalgam/v1/amalgam.pb.h"

namespace amalgam::server {

// A resumable upload's row: its header, and the artifact it made once
// finished (empty before).
struct UploadRow {
  v1::UploadHeader header;
  std::string artifact_id;
};

// (owner, upload id).
using UploadKey = std::pair<std::string, std::string>;

class Catalog {
 public:
  virtual ~Catalog() = default;

  // Inserts a new artifact under a fresh id and the current time, both set
  // in `artifact` (a colliding id is drawn again, never overwritten).
  virtual absl::Status InsertArtifact(v1::Artifact* artifact) = 0;
  // NOT_FOUND naming the id; DATA_LOSS for a corrupt row.
  virtual absl::StatusOr<v1::Artifact> GetArtifact(const std::string& id) = 0;
  // Every artifact, or (`organization` set) those it owns or that are
  // shared with it, through indexed columns; in insertion order.
  virtual absl::StatusOr<std::vector<v1::Artifact>> ListArtifacts(
      const std::string& organization) = 0;
  // Artifacts catalogued, and the bytes of their distinct contents.
  virtual absl::StatusOr<std::pair<int64_t, int64_t>> Stats() = 0;
  // Reads artifact `id`, applies `change` and writes it back: concurrent
  // changes are never lost, and an artifact deleted meanwhile is NOT_FOUND,
  // never recreated. An error from `change` is returned, nothing written.
  virtual absl::StatusOr<v1::Artifact> ModifyArtifact(
      const std::string& id,
      const std::function<absl::Status(v1::Artifact&)>& change) = 0;
  // Whether an artifact other than `id` has content `sha256`.
  virtual absl::StatusOr<bool> ContentHasOtherArtifacts(
      const std::string& sha256, const std::string& id) = 0;
  // Removes the artifact's row and its shares (nothing if it is gone).
  virtual absl::Status DeleteArtifact(const std::string& id) = 0;
  // Bytes `owner` holds: its artifacts' distinct contents and the declared
  // sizes of its unfinished uploads, except the upload `except_upload`.
  virtual absl::StatusOr<int64_t> OrgBytes(
      const std::string& owner, const std::string& except_upload) = 0;
  // Inserts each of `results` as InsertArtifact does, sets their ids as
  // `job`'s result_ids and writes `job`, all or nothing. Returns the job.
  virtual absl::StatusOr<v1::Job> PublishResults(
      v1::Job job, std::vector<v1::Artifact>* results) = 0;

  // Resumable uploads, keyed by (owner, upload id). NOT_FOUND when none.
  virtual absl::StatusOr<UploadRow> FindUpload(
      const std::string& owner, const std::string& upload_id) = 0;
  // Registers (or replaces) an unfinished upload, touched now.
  virtual absl::Status PutUpload(const std::string& owner,
                                 const v1::UploadHeader& header) = 0;
  virtual absl::Status CompleteUpload(const std::string& owner,
                                      const std::string& upload_id,
                                      const std::string& artifact_id) = 0;
  virtual absl::Status TouchUpload(const std::string& owner,
                                   const std::string& upload_id) = 0;
  virtual absl::Status DeleteUpload(const std::string& owner,
                                    const std::string& upload_id) = 0;
  // Whether the upload exists, untouched since `cutoff_unix_seconds`.
  virtual absl::StatusOr<bool> UploadIsStale(const std::string& owner,
                                             const std::string& upload_id,
                                             int64_t cutoff_unix_seconds) = 0;
  virtual absl::StatusOr<std::vector<UploadKey>> StaleUploads(
      int64_t cutoff_unix_seconds) = 0;
  // Uploads not finished yet (they have a file).
  virtual absl::StatusOr<std::vector<UploadKey>> UnfinishedUploads() = 0;

  // Inserts a new job's row; ALREADY_EXISTS if its id is taken.
  virtual absl::Status AddJob(const v1::Job& job) = 0;
  // Replaces an existing job's row (inserts it if missing).
  virtual absl::Status PutJob(const v1::Job& job) = 0;
  virtual absl::StatusOr<v1::Job> GetJob(const std::string& id) = 0;
  virtual absl::StatusOr<std::vector<v1::Job>> ListJobs() = 0;
};

// A random id with the given prefix, e.g. "art_3f9c0a7b21d4e5f6", from the
// kernel's CSPRNG (getrandom).
std::string NewId(const std::string& prefix);

// Opens the catalog named by `uri` and brings its schema up to date (numbered
// migrations, one transaction each, under a lock): "sqlite" is catalog.db in
// `data_dir`; "postgresql://..." (or "postgres://...") a PostgreSQL database
// by libpq URI. INVALID_ARGUMENT for any other URI.
absl::StatusOr<std::unique_ptr<Catalog>> OpenCatalog(
    const std::string& uri, const std::string& data_dir);

}  // namespace amalgam::server
