#pragma once

#include <grpcpp/support/status.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace amalgam::server {

// The data directory whose paths callers never see (set once at start-up,
// before serving): PublicMessage writes them as "<data-dir>".
void SetPrivateDirectory(const std::string& dir);
std::string PublicMessage(absl::string_view message);

// The one place an absl::Status becomes a grpc::Status: same numeric code,
// the message made public (PublicMessage) and capped at 1 KiB.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace amalgam::server
