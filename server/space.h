#pragma once

// Disk space and per-organisation byte quotas: what admits an upload or a
// job before it writes a byte.

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace amalgam::server {

// Bytes an unprivileged writer may still use on the filesystem holding
// `dir` (statvfs f_bavail). INTERNAL naming the directory's role if statvfs
// fails.
absl::StatusOr<int64_t> FreeBytes(const std::string& dir);

// OK if `adding` more bytes leave at least `reserve` free on the filesystem
// holding `dir`; RESOURCE_EXHAUSTED saying how much is free otherwise.
// `what` names the writer ("upload of 123 bytes").
absl::Status CheckFreeSpace(const std::string& dir, int64_t adding,
                            int64_t reserve, const std::string& what);

// OK if `organization`, holding `used` bytes, may add `adding` under `quota`
// (0: unlimited); RESOURCE_EXHAUSTED naming the organisation, its usage and
// quota otherwise.
absl::Status CheckQuota(const std::string& organization, int64_t used,
                        int64_t adding, int64_t quota, const std::string& what);

}  // namespace amalgam::server
