#pragma once

#include <grpcpp/server_context.h>
#include <grpcpp/support/server_callback.h>

#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "core/status_macros.h"
#include "server/auth.h"
#include "server/grpc_status.h"

namespace amalgam::server {

// Authenticates the caller, runs `body(organization)` (which returns
// absl::StatusOr<T>) and finishes the unary call with its value or error.
template <typename T, typename Body>
grpc::ServerUnaryReactor* ServeUnary(grpc::CallbackServerContext* context,
                                     const TokenStore* tokens, T* response,
                                     Body&& body) {
  absl::StatusOr<T> result = [&]() -> absl::StatusOr<T> {
    AMALGAM_ASSIGN_OR_RETURN(std::string organization,
                             Authenticate(*context, tokens));
    return body(organization);
  }();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (result.ok()) *response = *std::move(result);
  reactor->Finish(ToGrpcStatus(result.status()));
  return reactor;
}

// A streaming reactor that only reports `status`; `Base` is
// grpc::ServerReadReactor<R> or grpc::ServerWriteReactor<W>.
template <typename Base>
class FailedReactor : public Base {
 public:
  explicit FailedReactor(const absl::Status& status) {
    this->Finish(ToGrpcStatus(status));
  }
  void OnDone() override { delete this; }
};

}  // namespace amalgam::server
