#include "server/grpc_status.h"

#include <atomic>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_replace.h"

namespace amalgam::server {
namespace {

// Spellings of the data directory; written once at start-up, before any
// call is served.
std::vector<std::string>* PrivateDirectories() {
  static auto* directories = new std::vector<std::string>();
  return directories;
}

}  // namespace

void SetPrivateDirectory(const std::string& dir) {
  std::vector<std::string>& directories = *PrivateDirectories();
  directories.clear();
  std::error_code error;
  const std::string absolute =
      std::filesystem::absolute(dir, error).lexically_normal().string();
  // Longest first, so that the absolute form wins over a relative suffix.
  if (!error) directories.push_back(absolute);
  if (!dir.empty() && dir != absolute) directories.push_back(dir);
}

std::string PublicMessage(absl::string_view message) {
  std::string text(message);
  for (const std::string& dir : *PrivateDirectories()) {
    std::string trimmed = dir;
    while (trimmed.size() > 1 && trimmed.back() == '/') trimmed.pop_back();
    text = absl::StrReplaceAll(text, {{trimmed, "<data-dir>"}});
  }
  return text;
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  constexpr size_t kMaxMessage = 1024;
  std::string message = PublicMessage(status.message());
  if (message.size() > kMaxMessage) {
    message.resize(kMaxMessage - 3);
    message += "...";
  }
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), message);
}

}  // namespace amalgam::server
