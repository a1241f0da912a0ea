#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "amalgam/v1/amalgam.pb.h"

namespace amalgam::server {

// Longest artifact name and upload id accepted, in bytes.
inline constexpr size_t kMaxNameBytes = 256;
inline constexpr size_t kMaxUploadIdBytes = 64;
// Most files one model directory may hold.
inline constexpr int kMaxModelFiles = 4096;

// OK for an artifact or result name of at most kMaxNameBytes with no
// control character and no '/' (a sweep's results become file names);
// INVALID_ARGUMENT naming `field` otherwise. Empty is allowed (a default
// name is used).
absl::Status ValidateName(const std::string& name, const std::string& field);

// Checks an upload header on its own, before any byte is stored: a known
// kind, a positive size_bytes, a 64-digit lower-case hex sha256 or none (a
// trailer carries it), a name of
// as ValidateName allows, `describes` only on statistics, and an upload_id
// (optional) of 1..kMaxUploadIdBytes characters from [A-Za-z0-9_.-]:
// `files` (optional) naming a model directory that core::CheckModelFiles
// accepts, whose sizes add up to size_bytes. INVALID_ARGUMENT naming the
// field otherwise. RESOURCE_EXHAUSTED when
// size_bytes is over `max_upload_bytes`.
absl::Status ValidateUploadHeader(const v1::UploadHeader& header,
                                  int64_t max_upload_bytes);

// At most `max_bytes` characters from [A-Za-z0-9_.-] (an upload id, a
// replica name): INVALID_ARGUMENT naming `field` otherwise.
absl::Status ValidateIdentifier(const std::string& value,
                                const std::string& field, size_t max_bytes);

}  // namespace amalgam::server
