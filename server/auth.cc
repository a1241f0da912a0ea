#include "server/auth.h"

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace amalgam::server {

absl::StatusOr<std::map<std::string, std::string>> TokenStore::Parse(
    const std::string& path) {
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
    if (!tokens.emplace(token, org).second) {
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
  auto it = tokens_.find(token);
  if (it == tokens_.end()) {
    return absl::UnauthenticatedError("unknown bearer token");
  }
  return it->second;
}

size_t TokenStore::size() const {
  absl::MutexLock lock(&mu_);
  return tokens_.size();
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
