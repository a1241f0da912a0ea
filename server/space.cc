#include "server/space.h"

#include <sys/statvfs.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace amalgam::server {

absl::StatusOr<int64_t> FreeBytes(const std::string& dir) {
  struct statvfs vfs;
  if (::statvfs(dir.c_str(), &vfs) != 0) {
    return absl::InternalError(
        absl::StrCat("cannot read the free space of the data directory: ",
                     std::strerror(errno)));
  }
  return static_cast<int64_t>(vfs.f_bavail) *
         static_cast<int64_t>(vfs.f_frsize);
}

absl::Status CheckFreeSpace(const std::string& dir, int64_t adding,
                            int64_t reserve, const std::string& what) {
  absl::StatusOr<int64_t> free = FreeBytes(dir);
  if (!free.ok()) return free.status();
  if (adding > *free - reserve) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, " does not fit: the data volume has ", *free,
                     " bytes free and keeps ", reserve,
                     " in reserve; delete artifacts or retry later"));
  }
  return absl::OkStatus();
}

absl::Status CheckQuota(const std::string& organization, int64_t used,
                        int64_t adding, int64_t quota,
                        const std::string& what) {
  if (quota <= 0 || used + adding <= quota) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      what, " would take organisation ", organization, " to ", used + adding,
      " bytes (it holds ", used,
      " in artifacts, partial uploads and job outputs), over its quota of ",
      quota, " bytes; delete artifacts first"));
}

}  // namespace amalgam::server
