#pragma once

#include <grpcpp/server_context.h>

#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace amalgam::server {

// The organisation every caller belongs to when no token file is configured.
inline constexpr char kLocalOrganization[] = "local";

// Bearer tokens mapped to organisations, from a token file: one `TOKEN ORG`
// pair per line, `#` starts a comment, blank lines ignored. Reload() re-reads
// the file (on SIGHUP); a failed reload keeps the previous tokens.
// Thread-safe.
class TokenStore {
 public:
  // INVALID_ARGUMENT naming the file and line for a malformed line or a
  // token listed twice; NOT_FOUND if the file does not exist;
  // FAILED_PRECONDITION if its group or others may write it or it holds an
  // example token (one starting with "change-me").
  static absl::StatusOr<std::unique_ptr<TokenStore>> Load(
      const std::string& path);

  absl::Status Reload();
  // The organisation of `token`; UNAUTHENTICATED if unknown.
  absl::StatusOr<std::string> Lookup(const std::string& token) const;
  size_t size() const;

 private:
  explicit TokenStore(std::string path) : path_(std::move(path)) {}
  static absl::StatusOr<std::map<std::string, std::string>> Parse(
      const std::string& path);

  const std::string path_;
  mutable absl::Mutex mu_;
  // SHA-256 (hex) of each token -> its organisation.
  std::map<std::string, std::string> tokens_ ABSL_GUARDED_BY(mu_);
};

// True if `address` (host:port) names a loopback interface: "localhost",
// an IPv4 literal in 127.0.0.0/8 or [::1]. Host names are not resolved.
bool IsLoopbackAddress(const std::string& address);

// Who is calling: with `tokens` null, everyone is kLocalOrganization; else
// the `authorization: Bearer TOKEN` metadata must name a known token
// (UNAUTHENTICATED otherwise).
absl::StatusOr<std::string> Authenticate(
    const grpc::CallbackServerContext& context, const TokenStore* tokens);

}  // namespace amalgam::server
