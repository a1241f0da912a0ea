#pragma once

#include <grpcpp/server_context.h>
#include <grpcpp/support/server_callback.h>

#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "core/status_macros.h"
#include "server/auth.h"
#include "server/executor.h"
#include "server/grpc_status.h"

namespace amalgam::server {

// Authenticates the caller, runs `body(organization)` (which returns
// absl::StatusOr<T>) and finishes the unary call with its value or error:
// on `executor`, off the gRPC reaction thread, since bodies read the catalog
// and files. `body` is kept until it has run: it must capture by value.
// RESOURCE_EXHAUSTED at once when the executor's queue is full.
template <typename T, typename Body>
grpc::ServerUnaryReactor* ServeUnary(grpc::CallbackServerContext* context,
                                     const TokenStore* tokens,
                                     Executor* executor, T* response,
                                     Body body) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const bool scheduled = executor->Schedule(
      [context, tokens, response, reactor, body = std::move(body)]() {
        absl::StatusOr<T> result = [&]() -> absl::StatusOr<T> {
          AMALGAM_ASSIGN_OR_RETURN(std::string organization,
                                   Authenticate(*context, tokens));
          return body(organization);
        }();
        if (result.ok()) *response = *std::move(result);
        reactor->Finish(ToGrpcStatus(result.status()));
      });
  if (!scheduled) {
    reactor->Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                 "the server has too many calls in progress; "
                                 "retry later"));
  }
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
