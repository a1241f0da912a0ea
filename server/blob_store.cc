#include "server/blob_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace amalgam::server {

namespace fs = std::filesystem;

absl::Status SyncFileAndDir(const std::string& path) {
  for (const std::string& target :
       {path, fs::path(path).parent_path().string()}) {
    const int fd = ::open(target.c_str(), O_RDONLY);
    if (fd < 0 || ::fsync(fd) != 0) {
      const std::string error = std::strerror(errno);
      if (fd >= 0) ::close(fd);
      return absl::InternalError(
          absl::StrCat("cannot fsync ", target, ": ", error));
    }
    ::close(fd);
  }
  return absl::OkStatus();
}

bool FileOlderThan(const fs::path& path, fs::file_time_type::duration age) {
  std::error_code error;
  const fs::file_time_type written = fs::last_write_time(path, error);
  return !error && fs::file_time_type::clock::now() - written > age;
}

absl::StatusOr<BlobStore> BlobStore::Open(const std::string& directory) {
  std::error_code error;
  fs::create_directories(directory, error);
  if (error) {
    return absl::InternalError(
        absl::StrCat("cannot create ", directory, ": ", error.message()));
  }
  return BlobStore(directory);
}

std::string BlobStore::PathOf(const std::string& sha256) const {
  return (fs::path(directory_) / sha256).string();
}

absl::Status BlobStore::Put(const std::string& temp_path,
                            const std::string& sha256, bool* created) const {
  const std::string blob = PathOf(sha256);
  *created = false;
  if (::link(temp_path.c_str(), blob.c_str()) != 0) {
    if (errno == EEXIST) return absl::OkStatus();
    return absl::InternalError(
        absl::StrCat("cannot put a new file in place as blob ", sha256, ": ",
                     std::strerror(errno)));
  }
  *created = true;
  return SyncFileAndDir(blob);
}

absl::Status BlobStore::Remove(const std::string& sha256) const {
  std::error_code error;
  fs::remove(PathOf(sha256), error);
  if (error) {
    return absl::InternalError(
        absl::StrCat("cannot remove blob ", sha256, ": ", error.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> BlobStore::OlderThan(
    fs::file_time_type::duration age) const {
  std::vector<std::string> names;
  std::error_code error;
  for (fs::directory_iterator it(directory_, error), end; !error && it != end;
       it.increment(error)) {
    if (FileOlderThan(it->path(), age)) {
      names.push_back(it->path().filename().string());
    }
  }
  if (error) {
    return absl::InternalError(
        absl::StrCat("cannot list ", directory_, ": ", error.message()));
  }
  return names;
}

}  // namespace amalgam::server
