#pragma once

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace amalgam::server {

// Content-addressed blobs in one directory: a blob's name is the sha256 of
// its bytes, and a blob never changes once in place. Works the same on a
// local disk and on a shared volume (NFS and the like): a blob arrives by
// rename of a complete, fsynced file, and the directory is fsynced after;
// no file locks are taken. Which blobs are still wanted is the catalog's
// business: callers serialise a blob's placement and removal with the rows
// that reference it (see Catalog's content locks). Thread-safe.
class BlobStore {
 public:
  // `directory` is created if missing.
  static absl::StatusOr<BlobStore> Open(const std::string& directory);

  // The path of the blob of `sha256` (which may not exist).
  std::string PathOf(const std::string& sha256) const;

  // Puts the complete file `temp_path` in place as the blob of `sha256` (a
  // hard link, so the file stays where it is for the caller to remove), and
  // syncs it and the directory; a no-op where the blob exists already (the
  // same content stored before). `created` says which; INTERNAL naming the
  // blob on I/O errors. Cheap when the blob exists: callers put a blob once
  // before the transaction that references it, and again inside it (under
  // its content lock) in case a delete removed it in between.
  absl::Status Put(const std::string& temp_path, const std::string& sha256,
                   bool* created) const;

  // Removes the blob, if present.
  absl::Status Remove(const std::string& sha256) const;

  // The names (sha256) of blobs last written more than `age` ago.
  absl::StatusOr<std::vector<std::string>> OlderThan(
      std::filesystem::file_time_type::duration age) const;

 private:
  explicit BlobStore(std::string directory)
      : directory_(std::move(directory)) {}

  std::string directory_;
};

// Whether the file at `path` was last written more than `age` ago (false
// if it cannot be read).
bool FileOlderThan(const std::filesystem::path& path,
                   std::filesystem::file_time_type::duration age);

// fsyncs the file and its directory; INTERNAL on failure.
absl::Status SyncFileAndDir(const std::string& path);

}  // namespace amalgam::server
