#include "server/auth.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "core/sha256.h"

namespace amalgam::server {

namespace {

// Tokens are kept and looked up by their SHA-256, so the time a lookup takes
// depends on the digest, never on how much of a secret a guess matched.
std::string TokenKey(absl::string_view token) {
  core::Sha256 hash;
  hash.Update(token.data(), token.size());
  return hash.HexDigest();
}

}  // namespace

absl::StatusOr<std::map<std::string, std::string>> TokenStore::Parse(
    const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("cannot read token file ", path));
  }
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "token file %s is writable by its group or by others (mode %04o): "
        "anyone could add a token; chmod go-w it",
        path, st.st_mode & 07777));
  }
  std::ifstream in(path);
  if (!in)
    return absl::NotFoundError(absl::StrCat("cannot read token file ", path));
  std::map<std::string, std::string> tokens;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (const size_t hash = line.find('#'); hash != std::string::npos) {
      line.resize(hash);
    }
    std::istringstream fields(line);
    std::string token, org, extra;
    if (!(fields >> token)) continue;  // blank or comment
    if (!(fields >> org) || (fields >> extra)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", number, ": expected `TOKEN ORGANISATION`"));
    }
    if (absl::StartsWith(token, "change-me")) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, ":", number,
          ": an example token (change-me...) is not a secret; replace it, "
          "e.g. with the output of `openssl rand -hex 32`"));
    }
    if (!tokens.emplace(TokenKey(token), org).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", number, ": token listed twice"));
    }
  }
  return tokens;
}

absl::StatusOr<std::unique_ptr<TokenStore>> TokenStore::Load(
    const std::string& path) {
  auto store = std::unique_ptr<TokenStore>(new TokenStore(path));
  absl::Status status = store->Reload();
  if (!status.ok()) return status;
  return store;
}

absl::Status TokenStore::Reload() {
  absl::StatusOr<std::map<std::string, std::string>> tokens = Parse(path_);
  if (!tokens.ok()) return tokens.status();
  absl::MutexLock lock(&mu_);
  tokens_ = *std::move(tokens);
  return absl::OkStatus();
}

absl::StatusOr<std::string> TokenStore::Lookup(const std::string& token) const {
  absl::MutexLock lock(&mu_);
  auto it = tokens_.find(TokenKey(token));
  if (it == tokens_.end()) {
    return absl::UnauthenticatedError("unknown bearer token");
  }
  return it->second;
}

size_t TokenStore::size() const {
  absl::MutexLock lock(&mu_);
  return tokens_.size();
}

bool IsLoopbackAddress(const std::string& address) {
  const size_t colon = address.rfind(':');
  std::string host =
      colon == std::string::npos ? address : address.substr(0, colon);
  if (host == "localhost") return true;
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
    in6_addr v6;
    return inet_pton(AF_INET6, host.c_str(), &v6) == 1 &&
           IN6_IS_ADDR_LOOPBACK(&v6);
  }
  // A literal IPv4 address in 127.0.0.0/8; names other than localhost
  // (127.example.com) are not loopback.
  in_addr v4;
  return inet_pton(AF_INET, host.c_str(), &v4) == 1 &&
         (ntohl(v4.s_addr) >> 24) == 127;
}

absl::StatusOr<std::string> Authenticate(
    const grpc::CallbackServerContext& context, const TokenStore* tokens) {
  if (tokens == nullptr) return std::string(kLocalOrganization);
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return absl::UnauthenticatedError(
        "missing `authorization: Bearer TOKEN` metadata");
  }
  absl::string_view value(it->second.data(), it->second.size());
  if (!absl::ConsumePrefix(&value, "Bearer ")) {
    return absl::UnauthenticatedError(
        "authorization metadata must be `Bearer TOKEN`");
  }
  return tokens->Lookup(std::string(value));
}

}  // namespace amalgam::server
