#include "server/storage.h"

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/sha256.h"
#include "core/status_macros.h"

namespace amalgam::server {

namespace fs = std::filesystem;

namespace {

// Files that another replica may be writing right now are younger than this:
// a replica starting on a shared data directory leaves them alone.
constexpr auto kForeignFileAge = std::chrono::hours(1);

}  // namespace

absl::StatusOr<std::unique_ptr<Storage>> Storage::Open(
    const std::string& data_dir, const std::string& catalog,
    const std::string& replica) {
  std::error_code error;
  for (const char* sub : {"tmp", "uploads"}) {
    fs::create_directories(fs::path(data_dir) / sub, error);
    if (error) {
      return absl::InternalError(absl::StrCat("cannot create ", data_dir, "/",
                                              sub, ": ", error.message()));
    }
  }
  // Files in tmp/ belong to uploads and jobs of an earlier run: all of them
  // where this process is the data directory's only one; else those in its
  // own tmp/<replica>/, and those of other replicas older than an hour.
  const fs::path tmp = fs::path(data_dir) / "tmp";
  const fs::path own = replica.empty() ? tmp : tmp / replica;
  for (fs::directory_iterator it(tmp, error), end; !error && it != end;
       it.increment(error)) {
    std::error_code ignored;
    if (replica.empty() || it->path() == own) {
      fs::remove_all(it->path(), ignored);
    } else if (it->is_directory(ignored)) {
      for (fs::directory_iterator file(it->path(), ignored), last;
           !ignored && file != last; file.increment(ignored)) {
        std::error_code skip;
        if (FileOlderThan(file->path(), kForeignFileAge)) {
          fs::remove_all(file->path(), skip);
        }
      }
    }
  }
  if (error) {
    return absl::InternalError(
        absl::StrCat("cannot list ", data_dir, "/tmp: ", error.message()));
  }
  fs::create_directories(own, error);
  if (error) {
    return absl::InternalError(
        absl::StrCat("cannot create ", own.string(), ": ", error.message()));
  }
  AMALGAM_ASSIGN_OR_RETURN(
      BlobStore blobs,
      BlobStore::Open((fs::path(data_dir) / "blobs").string()));
  AMALGAM_ASSIGN_OR_RETURN(std::unique_ptr<Catalog> opened,
                           OpenCatalog(catalog, data_dir));
  auto storage = std::unique_ptr<Storage>(
      new Storage(data_dir, own.string(), std::move(blobs), std::move(opened)));
  AMALGAM_RETURN_IF_ERROR(storage->ReconcileUploads(
      replica.empty()
          ? fs::file_time_type::duration::zero()
          : std::chrono::duration_cast<fs::file_time_type::duration>(
                kForeignFileAge)));
  return storage;
}

Storage::Storage(std::string data_dir, std::string tmp_dir, BlobStore blobs,
                 std::unique_ptr<Catalog> catalog)
    : data_dir_(std::move(data_dir)),
      tmp_dir_(std::move(tmp_dir)),
      blobs_(std::move(blobs)),
      catalog_(std::move(catalog)) {}

Storage::~Storage() = default;

std::string Storage::NewTempPath(const std::string& prefix) {
  return (fs::path(tmp_dir_) / NewId(prefix)).string();
}

std::string Storage::BlobPath(const std::string& sha256) const {
  return blobs_.PathOf(sha256);
}

absl::StatusOr<v1::Artifact> Storage::AddArtifact(
    const std::vector<std::string>& temp_paths, v1::Artifact artifact) {
  AMALGAM_ASSIGN_OR_RETURN(std::vector<std::string> created,
                           PlaceBlobs({{temp_paths, artifact}}));
  // Put in place again inside the transaction that inserts the row, under
  // the catalog's content locks (a no-op unless a delete or collection of
  // the same content, on any replica, removed it meanwhile).
  absl::Status inserted = catalog_->InsertArtifact(
      &artifact,
      [&](const v1::Artifact& placed) { return PutAgain(temp_paths, placed); });
  FinishPlacing(inserted.ok(), temp_paths, created);
  AMALGAM_RETURN_IF_ERROR(inserted);
  return artifact;
}

absl::StatusOr<v1::Job> Storage::PublishResults(
    v1::Job job, std::vector<StagedArtifact> results) {
  AMALGAM_ASSIGN_OR_RETURN(std::vector<std::string> created,
                           PlaceBlobs(results));
  std::vector<v1::Artifact> artifacts;
  std::vector<std::string> temps;
  for (auto& [paths, artifact] : results) {
    artifacts.push_back(artifact);
    temps.insert(temps.end(), paths.begin(), paths.end());
  }
  size_t next = 0;
  absl::StatusOr<v1::Job> published = catalog_->PublishResults(
      std::move(job), &artifacts, [&](const v1::Artifact& placed) {
        return PutAgain(results[next++].first, placed);
      });
  FinishPlacing(published.ok(), temps, created);
  return published;
}

absl::Status Storage::CompleteTask(JobTask task, const std::string& path) {
  AMALGAM_ASSIGN_OR_RETURN(task.sha256, core::Sha256File(path));
  std::error_code error;
  task.size_bytes = static_cast<int64_t>(fs::file_size(path, error));
  if (error) {
    return absl::InternalError(
        absl::StrCat("cannot read the size of ", path, ": ", error.message()));
  }
  bool created = false;
  AMALGAM_RETURN_IF_ERROR(blobs_.Put(path, task.sha256, &created));
  const absl::Status completed = catalog_->CompleteTask(task, [&] {
    bool again = false;
    return blobs_.Put(path, task.sha256, &again);
  });
  FinishPlacing(completed.ok(), {path},
                created ? std::vector<std::string>{task.sha256}
                        : std::vector<std::string>{});
  return completed;
}

absl::Status Storage::LinkBlob(const std::string& sha256,
                               const std::string& path) const {
  std::error_code error;
  fs::create_hard_link(blobs_.PathOf(sha256), path, error);
  if (error) {
    return absl::DataLossError(absl::StrCat("the blob ", sha256,
                                            " of a written shard cannot be "
                                            "read: ",
                                            error.message()));
  }
  return absl::OkStatus();
}

absl::Status Storage::PutAgain(const std::vector<std::string>& temp_paths,
                               const v1::Artifact& artifact) {
  const std::vector<v1::ModelFile> files = ArtifactFiles(artifact);
  for (size_t i = 0; i < files.size(); ++i) {
    bool again = false;
    AMALGAM_RETURN_IF_ERROR(
        blobs_.Put(temp_paths[i], files[i].sha256(), &again));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> Storage::PlaceBlobs(
    const std::vector<StagedArtifact>& staged) {
  // The slow part (the syncs of file and directory) before any catalog
  // lock is taken.
  std::vector<std::string> created;
  for (const auto& [temps, artifact] : staged) {
    const std::vector<v1::ModelFile> files = ArtifactFiles(artifact);
    if (files.size() != temps.size()) {
      FinishPlacing(false, {}, created);
      return absl::InternalError(
          absl::StrCat("artifact \"", artifact.name(), "\" has ", files.size(),
                       " files but ", temps.size(), " were written"));
    }
    for (size_t i = 0; i < files.size(); ++i) {
      bool made = false;
      absl::Status placed = blobs_.Put(temps[i], files[i].sha256(), &made);
      if (made) created.push_back(files[i].sha256());
      if (!placed.ok()) {
        FinishPlacing(false, {}, created);
        return placed;
      }
    }
  }
  return created;
}

void Storage::FinishPlacing(bool committed,
                            const std::vector<std::string>& temps,
                            const std::vector<std::string>& created) {
  if (committed) {
    // The blobs hold the bytes now.
    std::error_code ignored;
    for (const std::string& temp : temps) fs::remove(temp, ignored);
    return;
  }
  // Blobs this call brought in that no committed row references (else the
  // collection of unreferenced blobs finds them later).
  for (const std::string& sha256 : created) {
    catalog_
        ->RemoveUnreferencedContent(sha256,
                                    [&] { return blobs_.Remove(sha256); })
        .IgnoreError();
  }
}

absl::StatusOr<int64_t> Storage::CollectGarbage(
    std::filesystem::file_time_type::duration age) {
  AMALGAM_ASSIGN_OR_RETURN(std::vector<std::string> candidates,
                           blobs_.OlderThan(age));
  int64_t removed = 0;
  for (const std::string& sha256 : candidates) {
    AMALGAM_ASSIGN_OR_RETURN(
        const bool gone, catalog_->RemoveUnreferencedContent(
                             sha256, [&] { return blobs_.Remove(sha256); }));
    removed += gone ? 1 : 0;
  }
  return removed;
}

absl::StatusOr<std::unique_ptr<core::SafetensorsReader>> Storage::OpenBlob(
    const v1::Artifact& artifact) const {
  std::map<std::string, std::string> paths;
  for (const v1::ModelFile& file : ArtifactFiles(artifact)) {
    paths[file.name()] = BlobPath(file.sha256());
  }
  absl::StatusOr<std::unique_ptr<core::SafetensorsReader>> reader =
      core::SafetensorsReader::OpenModel(paths);
  if (!reader.ok()) {
    return absl::DataLossError(
        absl::StrCat("blob of artifact ", artifact.id(),
                     " cannot be read: ", reader.status().message()));
  }
  return reader;
}

absl::StatusOr<v1::Artifact> Storage::GetArtifact(const std::string& id) {
  return catalog_->GetArtifact(id);
}

void DescribeTensors(const core::SafetensorsReader& reader,
                     v1::Artifact* artifact) {
  int64_t parameters = 0;
  std::set<std::string> dtypes;
  for (const core::TensorInfo& tensor : reader.tensors()) {
    parameters += tensor.numel;
    dtypes.insert(core::DTypeName(tensor.dtype));
  }
  artifact->set_tensor_count(static_cast<int64_t>(reader.tensors().size()));
  artifact->set_parameter_count(parameters);
  artifact->clear_dtypes();
  for (const std::string& dtype : dtypes) artifact->add_dtypes(dtype);
  for (const auto& [key, value] : reader.metadata()) {
    (*artifact->mutable_metadata())[key] = value;
  }
}

bool ViewFor(const std::string& organization, v1::Artifact* artifact) {
  if (artifact->owner() == organization) return true;
  for (const std::string& org : artifact->shared_with()) {
    if (org == organization) {
      artifact->clear_shared_with();
      return true;
    }
  }
  return false;
}

absl::StatusOr<v1::Artifact> Storage::GetArtifactFor(
    const std::string& id, const std::string& organization) {
  absl::StatusOr<v1::Artifact> artifact = GetArtifact(id);
  if (!artifact.ok()) return artifact;
  if (ViewFor(organization, &*artifact)) return artifact;
  return absl::NotFoundError(absl::StrCat("artifact ", id, " not found"));
}

absl::StatusOr<std::pair<int64_t, int64_t>> Storage::Stats() {
  return catalog_->Stats();
}

absl::StatusOr<v1::Artifact> Storage::ModifyArtifact(
    const std::string& id,
    const std::function<absl::Status(v1::Artifact&)>& change) {
  return catalog_->ModifyArtifact(id, change);
}

absl::Status Storage::DeleteArtifact(const v1::Artifact& artifact) {
  // The blob goes first: on a full disk the row's deletion needs room in
  // the catalog's log, which the blob frees. Inside the catalog's
  // transaction, under its content lock, so no upload or job of the same
  // content registers against the blob in between. A crash in between
  // leaves a row without its blob, which reads as DATA_LOSS and is deleted
  // again.
  return catalog_->DeleteArtifact(
      artifact, [&](const std::vector<std::string>& sole) -> absl::Status {
        for (const std::string& sha256 : sole) {
          AMALGAM_RETURN_IF_ERROR(blobs_.Remove(sha256));
        }
        return absl::OkStatus();
      });
}

absl::StatusOr<int64_t> Storage::OrgBytes(const std::string& owner,
                                          const std::string& except_upload) {
  return catalog_->OrgBytes(owner, except_upload);
}

absl::StatusOr<std::vector<v1::Artifact>> Storage::ListArtifacts(
    const std::string& organization) {
  return catalog_->ListArtifacts(organization);
}

std::string Storage::UploadPath(const std::string& owner,
                                const std::string& upload_id) const {
  // Hashed: ids are client-chosen and must not shape paths.
  core::Sha256 hash;
  hash.Update(owner);
  hash.Update("\n", 1);
  hash.Update(upload_id);
  return (fs::path(data_dir_) / "uploads" / hash.HexDigest()).string();
}

absl::StatusOr<PartialUpload> Storage::FindUpload(
    const std::string& owner, const std::string& upload_id) {
  AMALGAM_ASSIGN_OR_RETURN(UploadRow row,
                           catalog_->FindUpload(owner, upload_id));
  PartialUpload upload;
  upload.owner = owner;
  upload.header = std::move(row.header);
  upload.artifact_id = std::move(row.artifact_id);
  upload.path = UploadPath(owner, upload_id);
  if (!upload.artifact_id.empty()) {
    upload.committed_bytes = upload.header.size_bytes();
    return upload;
  }
  std::error_code error;
  const uintmax_t size = fs::file_size(upload.path, error);
  upload.committed_bytes = error ? 0 : static_cast<int64_t>(size);
  return upload;
}

absl::StatusOr<PartialUpload> Storage::CreateUpload(
    const std::string& owner, const v1::UploadHeader& header) {
  PartialUpload upload;
  upload.owner = owner;
  upload.header = header;
  upload.path = UploadPath(owner, header.upload_id());
  absl::MutexLock lock(&mu_);
  AMALGAM_RETURN_IF_ERROR(catalog_->PutUpload(owner, header));
  std::FILE* file = std::fopen(upload.path.c_str(), "wb");
  if (file == nullptr || std::fclose(file) != 0) {
    return absl::InternalError(absl::StrCat("cannot create ", upload.path, ": ",
                                            std::strerror(errno)));
  }
  return upload;
}

absl::Status Storage::CompleteUpload(const std::string& owner,
                                     const std::string& upload_id,
                                     const std::string& artifact_id) {
  absl::MutexLock lock(&mu_);
  AMALGAM_RETURN_IF_ERROR(
      catalog_->CompleteUpload(owner, upload_id, artifact_id));
  std::error_code error;
  fs::remove(UploadPath(owner, upload_id), error);
  return absl::OkStatus();
}

absl::Status Storage::TouchUpload(const std::string& owner,
                                  const std::string& upload_id) {
  absl::MutexLock lock(&mu_);
  return catalog_->TouchUpload(owner, upload_id);
}

absl::Status Storage::RemoveUpload(const std::string& owner,
                                   const std::string& upload_id) {
  absl::MutexLock lock(&mu_);
  // File first: it frees the room a full disk needs for the row's deletion
  // (a row without its file is dropped at the next start).
  std::error_code error;
  fs::remove(UploadPath(owner, upload_id), error);
  return catalog_->DeleteUpload(owner, upload_id);
}

absl::StatusOr<bool> Storage::RemoveStaleUpload(const std::string& owner,
                                                const std::string& upload_id,
                                                int64_t cutoff_unix_seconds) {
  absl::MutexLock lock(&mu_);
  // Decided by a read, so that the file can go before the row (see
  // RemoveUpload); touches take the same lock, so none comes in between.
  AMALGAM_ASSIGN_OR_RETURN(
      const bool stale,
      catalog_->UploadIsStale(owner, upload_id, cutoff_unix_seconds));
  if (!stale) return false;  // touched since, or gone
  std::error_code error;
  fs::remove(UploadPath(owner, upload_id), error);
  AMALGAM_RETURN_IF_ERROR(catalog_->DeleteUpload(owner, upload_id));
  return true;
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>>
Storage::StaleUploads(int64_t cutoff_unix_seconds) {
  return catalog_->StaleUploads(cutoff_unix_seconds);
}

absl::Status Storage::ReconcileUploads(
    std::filesystem::file_time_type::duration settled) {
  // Finished uploads have no file: only their artifact id is kept. With
  // `settled`, rows touched and files written more recently than that may
  // be another replica's upload being created: they are left alone.
  const int64_t cutoff =
      static_cast<int64_t>(std::time(nullptr)) -
      std::chrono::duration_cast<std::chrono::seconds>(settled).count();
  AMALGAM_ASSIGN_OR_RETURN(std::vector<UploadKey> unfinished,
                           catalog_->UnfinishedUploads());
  std::set<UploadKey> old_rows;
  if (settled != settled.zero()) {
    AMALGAM_ASSIGN_OR_RETURN(std::vector<UploadKey> settled_rows,
                             catalog_->StaleUploads(cutoff + 1));
    old_rows.insert(settled_rows.begin(), settled_rows.end());
  }
  std::vector<UploadKey> missing;
  std::set<std::string> paths;
  for (UploadKey& key : unfinished) {
    std::string path = UploadPath(key.first, key.second);
    std::error_code error;
    if (fs::exists(path, error)) {
      paths.insert(std::move(path));
    } else if (settled == settled.zero() || old_rows.count(key) > 0) {
      missing.push_back(std::move(key));
    } else {
      paths.insert(std::move(path));  // being created: its file comes next
    }
  }
  // Files first: they free room that a full disk needs for the row writes.
  std::error_code error;
  for (fs::directory_iterator it(fs::path(data_dir_) / "uploads", error), end;
       !error && it != end; it.increment(error)) {
    if (paths.count(it->path().string()) == 0 &&
        (settled == settled.zero() || FileOlderThan(it->path(), settled))) {
      std::error_code ignored;
      fs::remove_all(it->path(), ignored);
    }
  }
  for (const auto& [owner, id] : missing) {
    AMALGAM_RETURN_IF_ERROR(catalog_->DeleteUpload(owner, id));
  }
  return absl::OkStatus();
}

}  // namespace amalgam::server
