#include "server/job_service.h"

#include <deque>
#include <string>

#include "absl/synchronization/mutex.h"
#include "server/grpc_status.h"
#include "server/rpc_util.h"

namespace amalgam::server {
// Streams job snapshots: every state change is sent; progress-only updates
// that arrive while a write is in flight collapse into the latest one.
class JobServiceImpl::WatchReactor
    : public grpc::ServerWriteReactor<v1::JobEvent> {
 public:
  WatchReactor(JobManager* jobs, std::string id, std::string organization)
      : jobs_(jobs),
        id_(std::move(id)),
        organization_(std::move(organization)) {}

  // Subscribes; must be called once, right after construction.
  void Start() {
    absl::StatusOr<uint64_t> token = jobs_->Watch(
        id_, organization_, [this](const v1::Job& job) { OnJob(job); });
    if (!token.ok()) {
      {
        absl::MutexLock lock(&mu_);
        done_ = finished_ = true;
      }
      Finish(ToGrpcStatus(token.status()));
      return;
    }
    absl::MutexLock lock(&mu_);
    token_ = *token;
    subscribed_ = true;
    started_ = true;
    WriteNextLocked();
  }

  void OnWriteDone(bool ok) override {
    bool finish = false;
    bool final_sent = false;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      final_sent = ok && IsFinal(in_flight_.job().state());
      if (!ok || final_sent || done_) {
        done_ = true;
        finish = ClaimFinishLocked();
      } else {
        WriteNextLocked();
      }
    }
    if (finish) {
      Unsubscribe();
      Finish(final_sent
                 ? grpc::Status::OK
                 : grpc::Status(grpc::StatusCode::CANCELLED, "watch ended"));
    }
  }

  // The client went away (or the server is shutting down): end the call now
  // unless a write is in flight, whose OnWriteDone then ends it.
  void OnCancel() override {
    bool finish = false;
    {
      absl::MutexLock lock(&mu_);
      done_ = true;
      if (!writing_) finish = ClaimFinishLocked();
    }
    if (finish) {
      Unsubscribe();
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "watch cancelled"));
    }
  }

  void OnDone() override {
    Unsubscribe();
    delete this;
  }

 private:
  // Called by the manager under its lock.
  void OnJob(const v1::Job& job) {
    absl::MutexLock lock(&mu_);
    if (done_) return;
    if (!pending_.empty() && pending_.back().state() == job.state()) {
      pending_.back() = job;
    } else {
      pending_.push_back(job);
    }
    // Until Start() has the token, nothing is written: a write could end
    // the call before the subscription is known.
    if (started_ && !writing_) WriteNextLocked();
  }

  // True exactly once: the caller then calls Finish.
  bool ClaimFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return false;
    finished_ = true;
    return true;
  }

  void WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (pending_.empty()) return;
    *in_flight_.mutable_job() = std::move(pending_.front());
    pending_.pop_front();
    writing_ = true;
    StartWrite(&in_flight_);
  }

  void Unsubscribe() {
    uint64_t token = 0;
    {
      absl::MutexLock lock(&mu_);
      if (!subscribed_) return;
      subscribed_ = false;
      token = token_;
    }
    jobs_->Unwatch(id_, token);
  }

  JobManager* const jobs_;
  const std::string id_;
  const std::string organization_;
  absl::Mutex mu_;
  std::deque<v1::Job> pending_ ABSL_GUARDED_BY(mu_);
  v1::JobEvent in_flight_ ABSL_GUARDED_BY(mu_);
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;      // no more writes
  bool finished_ ABSL_GUARDED_BY(mu_) = false;  // Finish called
  bool subscribed_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t token_ ABSL_GUARDED_BY(mu_) = 0;
};

grpc::ServerUnaryReactor* JobServiceImpl::SubmitJob(
    grpc::CallbackServerContext* context, const v1::SubmitJobRequest* request,
    v1::Job* response) {
  return ServeUnary(
      context, tokens_, rpc_executor_, response,
      [=](const std::string& org) { return jobs_->Submit(*request, org); });
}

grpc::ServerUnaryReactor* JobServiceImpl::GetJob(
    grpc::CallbackServerContext* context, const v1::GetJobRequest* request,
    v1::Job* response) {
  return ServeUnary(
      context, tokens_, rpc_executor_, response,
      [=](const std::string& org) { return jobs_->Get(request->id(), org); });
}

grpc::ServerUnaryReactor* JobServiceImpl::ListJobs(
    grpc::CallbackServerContext* context,
    const v1::ListJobsRequest* /*request*/, v1::ListJobsResponse* response) {
  return ServeUnary(
      context, tokens_, rpc_executor_, response, [=](const std::string& org) {
        v1::ListJobsResponse list;
        for (v1::Job& job : jobs_->List(org)) *list.add_jobs() = std::move(job);
        return absl::StatusOr<v1::ListJobsResponse>(std::move(list));
      });
}

grpc::ServerWriteReactor<v1::JobEvent>* JobServiceImpl::WatchJob(
    grpc::CallbackServerContext* context, const v1::WatchJobRequest* request) {
  absl::StatusOr<std::string> org = Authenticate(*context, tokens_);
  if (!org.ok()) {
    return new FailedReactor<grpc::ServerWriteReactor<v1::JobEvent>>(
        org.status());
  }
  auto* reactor = new WatchReactor(jobs_, request->id(), *org);
  reactor->Start();
  return reactor;
}

grpc::ServerUnaryReactor* JobServiceImpl::CancelJob(
    grpc::CallbackServerContext* context, const v1::CancelJobRequest* request,
    v1::Job* response) {
  return ServeUnary(context, tokens_, rpc_executor_, response,
                    [=](const std::string& org) {
                      return jobs_->Cancel(request->id(), org);
                    });
}

}  // namespace amalgam::server
