#pragma once

#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "amalgam/v1/amalgam.pb.h"
#include "core/safetensors.h"
#include "server/blob_store.h"
#include "server/catalog.h"

namespace amalgam::server {

// A resumable upload: its header (with the client's upload_id), and the file
// its bytes go to. `committed_bytes` is what the file holds. Once finished,
// `artifact_id` names the artifact it made (kept until it expires, so that a
// client whose final response was lost gets that artifact, not a second one).
struct PartialUpload {
  std::string owner;
  v1::UploadHeader header;
  std::string path;
  int64_t committed_bytes = 0;
  std::string artifact_id;
};

// The storage of a data directory and its catalog:
//   blobs/<sha256>   immutable artifact contents (content-addressed)
//   tmp/             one-shot uploads and job outputs being written
//   uploads/         bytes of resumable uploads in progress
//   catalog.db       the SQLite (WAL) catalog, unless it is in PostgreSQL
// A blob is fsynced and renamed into place before its catalog row commits, so
// a crash never leaves a visible artifact without its bytes. Thread-safe.
class Storage {
 public:
  // Creates the directory layout if missing and opens the catalog `catalog`
  // (see OpenCatalog). `replica` empty: this process is the data
  // directory's only one; else the name of one replica of several sharing
  // it, which writes its temporary files under tmp/<replica>/ and leaves
  // other replicas' recent files alone. INTERNAL on I/O or database errors.
  static absl::StatusOr<std::unique_ptr<Storage>> Open(
      const std::string& data_dir, const std::string& catalog = "sqlite",
      const std::string& replica = "");
  ~Storage();

  // A fresh path under tmp/ for a file being written (not created).
  std::string NewTempPath(const std::string& prefix);

  // Moves the complete, fsynced files at `temp_paths` (one per file of the
  // artifact, in the order of ArtifactFiles) into the blob store under their
  // sha256 and commits the catalog row. Assigns the id and creation time;
  // returns the stored artifact. On error the files stay.
  absl::StatusOr<v1::Artifact> AddArtifact(
      const std::vector<std::string>& temp_paths, v1::Artifact artifact);

  // An artifact's files written but not stored yet: their temporary paths
  // (in the order of ArtifactFiles), and its row.
  using StagedArtifact = std::pair<std::vector<std::string>, v1::Artifact>;

  // Makes a finished job's results visible together with its final row, in
  // one transaction: each result's files are moved into the blob store and
  // it is catalogued under a fresh id, the ids are set as `job`'s
  // result_ids and `job` is written. On error no result is catalogued and
  // the job's row is unchanged. Returns the job as written.
  absl::StatusOr<v1::Job> PublishResults(v1::Job job,
                                         std::vector<StagedArtifact> results);

  // Records task `task` done with the shard file at `path` (complete,
  // fsynced) as its blob, placed under its content lock, fenced (see
  // Catalog::CompleteTask); the file is removed once the blob holds it.
  absl::Status CompleteTask(JobTask task, const std::string& path);
  // Links the blob of `sha256` (of a task) at `path`, for a job to
  // assemble its model directory; DATA_LOSS naming the blob if it is gone.
  absl::Status LinkBlob(const std::string& sha256,
                        const std::string& path) const;

  // Removes blobs written more than `age` ago that no artifact references
  // (left by a crash between a blob's placement and its row's commit, a
  // failed publication, or a job that ended before its tasks' shards were
  // published) and no task holds. Returns how many it removed.
  absl::StatusOr<int64_t> CollectGarbage(
      std::filesystem::file_time_type::duration age);

  // NOT_FOUND naming the id when there is no such artifact.
  absl::StatusOr<v1::Artifact> GetArtifact(const std::string& id);
  // The artifact if `organization` may read it (owner or shared with it);
  // NOT_FOUND with the same message as an unknown id otherwise, so ids of
  // other organisations do not leak. Non-owners do not see `shared_with`.
  absl::StatusOr<v1::Artifact> GetArtifactFor(const std::string& id,
                                              const std::string& organization);
  // Every artifact, or (`organization` set) those it owns or that are
  // shared with it, read through indexed columns; in creation order.
  absl::StatusOr<std::vector<v1::Artifact>> ListArtifacts(
      const std::string& organization = "");
  // Artifacts in the catalog and the bytes of their distinct blobs.
  absl::StatusOr<std::pair<int64_t, int64_t>> Stats();
  // Reads artifact `id`, applies `change` and writes it back, as one step
  // that no other catalog call interleaves with: concurrent changes are
  // never lost, and an artifact deleted meanwhile is NOT_FOUND, never
  // recreated. An error from `change` is returned and nothing is written.
  absl::StatusOr<v1::Artifact> ModifyArtifact(
      const std::string& id,
      const std::function<absl::Status(v1::Artifact&)>& change);
  // Deletes the artifact unless a queued or running job reads it
  // (FAILED_PRECONDITION naming the job to its owner): the blob, unless
  // another artifact has the same content, then the catalog row (in that
  // order, so that a full disk can be freed).
  absl::Status DeleteArtifact(const v1::Artifact& artifact);
  // Bytes `owner` holds: its artifacts' distinct blobs and the declared
  // sizes of its unfinished uploads, except the upload `except_upload`.
  absl::StatusOr<int64_t> OrgBytes(const std::string& owner,
                                   const std::string& except_upload = "");
  // The path of the blob of content `sha256`.
  std::string BlobPath(const std::string& sha256) const;
  // Opens an artifact's tensors (the model directory its blobs make);
  // DATA_LOSS (naming the artifact) when the catalog has the row but a blob
  // is gone or unreadable.
  absl::StatusOr<std::unique_ptr<core::SafetensorsReader>> OpenBlob(
      const v1::Artifact& artifact) const;

  // Resumable uploads, keyed by (owner, upload id): an id names a different
  // upload for each organisation. NOT_FOUND when there is none.
  absl::StatusOr<PartialUpload> FindUpload(const std::string& owner,
                                           const std::string& upload_id);
  // Registers a new upload (row first, then an empty file).
  absl::StatusOr<PartialUpload> CreateUpload(const std::string& owner,
                                             const v1::UploadHeader& header);
  // Records that the upload made `artifact_id` (its file is gone by then).
  absl::Status CompleteUpload(const std::string& owner,
                              const std::string& upload_id,
                              const std::string& artifact_id);
  // Marks the upload as active now (it expires `expiry` after this).
  absl::Status TouchUpload(const std::string& owner,
                           const std::string& upload_id);
  // Removes the file (if still there) and the row.
  absl::Status RemoveUpload(const std::string& owner,
                            const std::string& upload_id);
  // Removes the upload only if it is still untouched since
  // `cutoff_unix_seconds`; true if it was removed.
  absl::StatusOr<bool> RemoveStaleUpload(const std::string& owner,
                                         const std::string& upload_id,
                                         int64_t cutoff_unix_seconds);
  // (owner, upload id) of uploads untouched since `cutoff_unix_seconds`.
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> StaleUploads(
      int64_t cutoff_unix_seconds);

  // The catalog, for what involves no files (jobs, counts).
  Catalog* catalog() const { return catalog_.get(); }

  const std::string& data_dir() const { return data_dir_; }

 private:
  Storage(std::string data_dir, std::string tmp_dir, BlobStore blobs,
          std::unique_ptr<Catalog> catalog);

  // Puts each file's blob in place before its transaction; returns the
  // blobs it created.
  absl::StatusOr<std::vector<std::string>> PlaceBlobs(
      const std::vector<StagedArtifact>& staged);
  // Inside the transaction: puts the blobs of `artifact`'s files in place
  // again (see AddArtifact).
  absl::Status PutAgain(const std::vector<std::string>& temp_paths,
                        const v1::Artifact& artifact);
  // After the transaction: removes the temporary files if it `committed`,
  // else the blobs `created` (the files stay with the caller).
  void FinishPlacing(bool committed, const std::vector<std::string>& temps,
                     const std::vector<std::string>& created);
  // Drops upload rows without a file and files without a row (a crash
  // between the two writes), leaving those younger than `settled`.
  absl::Status ReconcileUploads(
      std::filesystem::file_time_type::duration settled);
  std::string UploadPath(const std::string& owner,
                         const std::string& upload_id) const;

  const std::string data_dir_;
  // tmp/, or tmp/<replica>/ on a shared data directory.
  const std::string tmp_dir_;
  const BlobStore blobs_;
  const std::unique_ptr<Catalog> catalog_;
  // Held across an upload's staleness check and its removal, and where an
  // upload's row and file change together.
  absl::Mutex mu_;
};

// Sets `artifact`'s tensor_count, parameter_count, dtypes and metadata from
// `reader`, which holds its tensors.
void DescribeTensors(const core::SafetensorsReader& reader,
                     v1::Artifact* artifact);

// The one rule of read access: true if `organization` owns `artifact` or it
// was shared with it; for a non-owner, `shared_with` is cleared.
bool ViewFor(const std::string& organization, v1::Artifact* artifact);

}  // namespace amalgam::server
