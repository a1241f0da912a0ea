#pragma once

#include <cstddef>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

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

// SHA-256 computed on a thread of its own, so hashing (about 0.6 s per GiB)
// overlaps the caller's receiving and writing. Update hands the bytes over
// and returns at once, unless kMaxPendingBytes are still waiting (then it
// waits: the caller cannot run ahead without bound). The first
// kInlineBytes are hashed in the caller and the thread starts only after
// them, so small inputs cost no thread; where no thread can be had, all is
// hashed in the caller. One producer; not thread-safe otherwise.
class BackgroundSha256 {
 public:
  static constexpr size_t kInlineBytes = size_t{4} << 20;
  static constexpr size_t kMaxPendingBytes = size_t{16} << 20;

  BackgroundSha256() = default;
  ~BackgroundSha256();
  BackgroundSha256(const BackgroundSha256&) = delete;
  BackgroundSha256& operator=(const BackgroundSha256&) = delete;

  void Update(std::string bytes);
  // An empty string that keeps the capacity of bytes already hashed (or a
  // plain empty one): filling it instead of a new string saves allocating
  // (and faulting in) a buffer per piece.
  std::string TakeSpare();
  // Waits for every byte handed over; once, then no more updates.
  std::string HexDigest();

 private:
  static constexpr size_t kMaxSpares = 4;
  void KeepSpare(std::string bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  void Loop();
  void Stop();

  Sha256 hash_;  // the thread's alone while it runs
  size_t inline_bytes_ = 0;
  bool no_thread_ = false;  // creating it failed
  absl::Mutex mu_;
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  size_t pending_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::string> spares_ ABSL_GUARDED_BY(mu_);
  bool recycling_ ABSL_GUARDED_BY(mu_) = false;  // TakeSpare was called
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// Hex SHA-256 of a whole file; NOT_FOUND / INTERNAL on I/O errors.
absl::StatusOr<std::string> Sha256File(const std::string& path);

// Hex SHA-256 of the files one after the other, reading each byte once;
// `each` (may be null) gets each file's own. NOT_FOUND / INTERNAL on I/O
// errors.
absl::StatusOr<std::string> Sha256Files(const std::vector<std::string>& paths,
                                        std::vector<std::string>* each);

// True if `hex` is 64 lower-case hex digits.
bool IsSha256Hex(absl::string_view hex);

}  // namespace amalgam::core
