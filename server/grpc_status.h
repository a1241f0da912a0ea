#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace amalgam::server {

// The one place an absl::Status becomes a grpc::Status: same numeric code,
// the message capped at 1 KiB.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace amalgam::server
