#include "core/sha256.h"

#include <openssl/evp.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace amalgam::core {

struct Sha256::State {
  EVP_MD_CTX* ctx = nullptr;
};

Sha256::Sha256() : state_(std::make_unique<State>()) {
  state_->ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(state_->ctx, EVP_sha256(), nullptr);
}

Sha256::~Sha256() { EVP_MD_CTX_free(state_->ctx); }

void Sha256::Update(const void* data, size_t size) {
  EVP_DigestUpdate(state_->ctx, data, size);
}

std::string Sha256::HexDigest() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(state_->ctx, digest, &length);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(2 * length);
  for (unsigned int i = 0; i < length; ++i) {
    hex.push_back(kHex[digest[i] >> 4]);
    hex.push_back(kHex[digest[i] & 0xf]);
  }
  return hex;
}

BackgroundSha256::~BackgroundSha256() { Stop(); }

void BackgroundSha256::Update(std::string bytes) {
  if (!thread_.joinable()) {
    bool hashed = false;
    if (no_thread_ || inline_bytes_ + bytes.size() <= kInlineBytes) {
      inline_bytes_ += bytes.size();
      hash_.Update(bytes);
      hashed = true;
    } else {
      try {
        thread_ = std::thread(&BackgroundSha256::Loop, this);
      } catch (const std::system_error&) {
        no_thread_ = true;
        hash_.Update(bytes);
        hashed = true;
      }
    }
    if (hashed) {
      absl::MutexLock lock(&mu_);
      KeepSpare(std::move(bytes));
      return;
    }
  }
  absl::MutexLock lock(&mu_);
  auto room = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return pending_bytes_ < kMaxPendingBytes;
  };
  mu_.Await(absl::Condition(&room));
  pending_bytes_ += bytes.size();
  queue_.push_back(std::move(bytes));
}

std::string BackgroundSha256::TakeSpare() {
  absl::MutexLock lock(&mu_);
  recycling_ = true;
  if (spares_.empty()) return std::string();
  std::string spare = std::move(spares_.back());
  spares_.pop_back();
  spare.clear();
  return spare;
}

void BackgroundSha256::KeepSpare(std::string bytes) {
  // Only for a producer that takes spares; others' bytes are freed at once.
  if (recycling_ && spares_.size() < kMaxSpares) {
    spares_.push_back(std::move(bytes));
  }
}

std::string BackgroundSha256::HexDigest() {
  Stop();
  return hash_.HexDigest();
}

void BackgroundSha256::Stop() {
  if (!thread_.joinable()) return;
  {
    absl::MutexLock lock(&mu_);
    closing_ = true;
  }
  thread_.join();
}

void BackgroundSha256::Loop() {
  while (true) {
    std::string bytes;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return !queue_.empty() || closing_;
      };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;
      bytes = std::move(queue_.front());
      queue_.pop_front();
    }
    hash_.Update(bytes);
    absl::MutexLock lock(&mu_);
    pending_bytes_ -= bytes.size();
    KeepSpare(std::move(bytes));
  }
}

namespace {

// Opens `path` for reading; NOT_FOUND or INTERNAL naming it.
absl::StatusOr<std::FILE*> OpenToHash(const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file != nullptr) return file;
  if (errno == ENOENT)
    return absl::NotFoundError(absl::StrCat("no file ", path));
  return absl::InternalError(
      absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
}

}  // namespace

absl::StatusOr<std::string> Sha256File(const std::string& path) {
  AMALGAM_ASSIGN_OR_RETURN(std::FILE* const file, OpenToHash(path));
  // Reading and hashing overlap; buffers go round between the two. Pieces
  // of 1 MiB, or the file's size if smaller.
  struct stat info {};
  size_t piece = size_t{1} << 20;
  if (::fstat(fileno(file), &info) == 0 && info.st_size > 0) {
    piece = std::min(piece, static_cast<size_t>(info.st_size));
  }
  BackgroundSha256 hash;
  while (true) {
    std::string buffer = hash.TakeSpare();
    buffer.resize(piece);
    const size_t n = std::fread(buffer.data(), 1, buffer.size(), file);
    if (n == 0) break;
    buffer.resize(n);
    hash.Update(std::move(buffer));
  }
  const bool failed = std::ferror(file) != 0;
  std::fclose(file);
  if (failed) return absl::InternalError(absl::StrCat("cannot read ", path));
  return hash.HexDigest();
}

absl::StatusOr<std::string> Sha256Files(const std::vector<std::string>& paths,
                                        std::vector<std::string>* each) {
  // One file: read and hashed at once (see Sha256File).
  if (paths.size() == 1 && each == nullptr) return Sha256File(paths[0]);
  Sha256 whole;
  std::vector<char> buffer(size_t{1} << 20);
  for (const std::string& path : paths) {
    AMALGAM_ASSIGN_OR_RETURN(std::FILE* const file, OpenToHash(path));
    Sha256 own;
    size_t n;
    while ((n = std::fread(buffer.data(), 1, buffer.size(), file)) > 0) {
      whole.Update(buffer.data(), n);
      if (each != nullptr) own.Update(buffer.data(), n);
    }
    const bool failed = std::ferror(file) != 0;
    std::fclose(file);
    if (failed) return absl::InternalError(absl::StrCat("cannot read ", path));
    if (each != nullptr) each->push_back(own.HexDigest());
  }
  return whole.HexDigest();
}

bool IsSha256Hex(absl::string_view hex) {
  if (hex.size() != 64) return false;
  for (char c : hex) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

}  // namespace amalgam::core
