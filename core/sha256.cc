#include "core/sha256.h"

#include <openssl/evp.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

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

BackgroundSha256::BackgroundSha256() {
  try {
    thread_ = std::thread(&BackgroundSha256::Loop, this);
  } catch (const std::system_error&) {
    // No thread to be had: Update hashes in the caller.
  }
}

BackgroundSha256::~BackgroundSha256() { Stop(); }

void BackgroundSha256::Update(std::string bytes) {
  if (!thread_.joinable()) {
    hash_.Update(bytes);
    return;
  }
  absl::MutexLock lock(&mu_);
  auto room = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return pending_bytes_ < kMaxPendingBytes;
  };
  mu_.Await(absl::Condition(&room));
  pending_bytes_ += bytes.size();
  queue_.push_back(std::move(bytes));
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
  }
}

absl::StatusOr<std::string> Sha256File(const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) {
    if (errno == ENOENT)
      return absl::NotFoundError(absl::StrCat("no file ", path));
    return absl::InternalError(
        absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  // Reading and hashing overlap.
  BackgroundSha256 hash;
  std::string buffer(size_t{1} << 20, '\0');
  size_t n;
  while ((n = std::fread(buffer.data(), 1, buffer.size(), file)) > 0) {
    buffer.resize(n);
    hash.Update(std::move(buffer));
    buffer.assign(size_t{1} << 20, '\0');
  }
  const bool failed = std::ferror(file) != 0;
  std::fclose(file);
  if (failed) return absl::InternalError(absl::StrCat("cannot read ", path));
  return hash.HexDigest();
}

bool IsSha256Hex(absl::string_view hex) {
  if (hex.size() != 64) return false;
  for (char c : hex) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

}  // namespace amalgam::core
