#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace amalgam::core {

// Incremental SHA-256 (OpenSSL). Not thread-safe.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(const void* data, size_t size);
  void Update(absl::string_view data) { Update(data.data(), data.size()); }
  // Lower-case hex digest; the object must not be updated afterwards.
  std::string HexDigest();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Hex SHA-256 of a whole file; NOT_FOUND / INTERNAL on I/O errors.
absl::StatusOr<std::string> Sha256File(const std::string& path);

// True if `hex` is 64 lower-case hex digits.
bool IsSha256Hex(absl::string_view hex);

}  // namespace amalgam::core
