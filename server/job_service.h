#pragma once

#include "amalgam/v1/amalgam.grpc.pb.h"
#include "server/auth.h"
#include "server/executor.h"
#include "server/job_manager.h"

namespace amalgam::server {

// Thin RPC layer over JobManager.
class JobServiceImpl final : public v1::JobService::CallbackService {
 public:
  // `tokens` may be null (no authentication: one local organisation).
  // Unary calls run on `rpc_executor`.
  JobServiceImpl(JobManager* jobs, const TokenStore* tokens,
                 Executor* rpc_executor)
      : jobs_(jobs), tokens_(tokens), rpc_executor_(rpc_executor) {}

  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const v1::SubmitJobRequest* request,
                                      v1::Job* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const v1::GetJobRequest* request,
                                   v1::Job* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const v1::ListJobsRequest* request,
                                     v1::ListJobsResponse* response) override;
  grpc::ServerWriteReactor<v1::JobEvent>* WatchJob(
      grpc::CallbackServerContext* context,
      const v1::WatchJobRequest* request) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const v1::CancelJobRequest* request,
                                      v1::Job* response) override;

 private:
  class WatchReactor;

  JobManager* const jobs_;
  const TokenStore* const tokens_;
  Executor* const rpc_executor_;
};

}  // namespace amalgam::server
