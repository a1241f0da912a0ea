#include "server/catalog_pool.h"

#include <utility>

#include "absl/synchronization/mutex.h"

namespace amalgam::server {
namespace {

class CatalogPool : public Catalog {
 public:
  explicit CatalogPool(std::vector<std::unique_ptr<Catalog>> members)
      : members_(std::move(members)) {
    for (auto& member : members_) idle_.push_back(member.get());
  }

  absl::Status Ping() override {
    Lease member(this);
    return member->Ping();
  }

  absl::Status InsertArtifact(v1::Artifact* artifact,
                              const PlaceContent& place) override {
    Lease member(this);
    return member->InsertArtifact(artifact, place);
  }

  absl::StatusOr<v1::Artifact> GetArtifact(const std::string& id) override {
    Lease member(this);
    return member->GetArtifact(id);
  }

  absl::StatusOr<v1::Artifact> GetSettledArtifact(
      const std::string& id) override {
    Lease member(this);
    return member->GetSettledArtifact(id);
  }

  absl::StatusOr<std::vector<v1::Artifact>> ListArtifacts(
      const std::string& organization) override {
    Lease member(this);
    return member->ListArtifacts(organization);
  }

  absl::StatusOr<std::pair<int64_t, int64_t>> Stats() override {
    Lease member(this);
    return member->Stats();
  }

  absl::StatusOr<v1::Artifact> ModifyArtifact(
      const std::string& id,
      const std::function<absl::Status(v1::Artifact&)>& change) override {
    Lease member(this);
    return member->ModifyArtifact(id, change);
  }

  absl::Status DeleteArtifact(
      const v1::Artifact& artifact,
      const std::function<absl::Status(const std::vector<std::string>&)>&
          remove_content) override {
    Lease member(this);
    return member->DeleteArtifact(artifact, remove_content);
  }

  absl::StatusOr<int64_t> OrgBytes(const std::string& owner,
                                   const std::string& except_upload) override {
    Lease member(this);
    return member->OrgBytes(owner, except_upload);
  }

  absl::StatusOr<v1::Job> PublishResults(v1::Job job,
                                         std::vector<v1::Artifact>* results,
                                         const PlaceContent& place) override {
    Lease member(this);
    return member->PublishResults(std::move(job), results, place);
  }

  absl::StatusOr<bool> RemoveUnreferencedContent(
      const std::string& sha256,
      const std::function<absl::Status()>& remove) override {
    Lease member(this);
    return member->RemoveUnreferencedContent(sha256, remove);
  }

  absl::Status OpenStream(const std::string& stream, const std::string& owner,
                          const std::string& upload_id,
                          const std::string& holder, absl::Duration lease,
                          int max_per_org) override {
    Lease member(this);
    return member->OpenStream(stream, owner, upload_id, holder, lease,
                              max_per_org);
  }

  absl::Status CloseStream(const std::string& stream) override {
    Lease member(this);
    return member->CloseStream(stream);
  }

  absl::Status CloseStreamsOf(const std::string& holder) override {
    Lease member(this);
    return member->CloseStreamsOf(holder);
  }

  absl::StatusOr<std::vector<std::string>> RenewStreams(
      const std::string& holder, absl::Duration lease) override {
    Lease member(this);
    return member->RenewStreams(holder, lease);
  }

  absl::StatusOr<bool> TryHousekeeping(const std::string& holder,
                                       absl::Duration lease) override {
    Lease member(this);
    return member->TryHousekeeping(holder, lease);
  }

  absl::StatusOr<UploadRow> FindUpload(const std::string& owner,
                                       const std::string& upload_id) override {
    Lease member(this);
    return member->FindUpload(owner, upload_id);
  }

  absl::Status PutUpload(const std::string& owner,
                         const v1::UploadHeader& header) override {
    Lease member(this);
    return member->PutUpload(owner, header);
  }

  absl::Status CompleteUpload(const std::string& owner,
                              const std::string& upload_id,
                              const std::string& artifact_id) override {
    Lease member(this);
    return member->CompleteUpload(owner, upload_id, artifact_id);
  }

  absl::Status TouchUpload(const std::string& owner,
                           const std::string& upload_id) override {
    Lease member(this);
    return member->TouchUpload(owner, upload_id);
  }

  absl::Status DeleteUpload(const std::string& owner,
                            const std::string& upload_id) override {
    Lease member(this);
    return member->DeleteUpload(owner, upload_id);
  }

  absl::StatusOr<bool> UploadIsStale(const std::string& owner,
                                     const std::string& upload_id,
                                     int64_t cutoff_unix_seconds) override {
    Lease member(this);
    return member->UploadIsStale(owner, upload_id, cutoff_unix_seconds);
  }

  absl::StatusOr<std::vector<UploadKey>> StaleUploads(
      int64_t cutoff_unix_seconds) override {
    Lease member(this);
    return member->StaleUploads(cutoff_unix_seconds);
  }

  absl::StatusOr<std::vector<UploadKey>> UnfinishedUploads() override {
    Lease member(this);
    return member->UnfinishedUploads();
  }

  absl::Status SubmitJob(const v1::Job& job,
                         const std::vector<std::string>& inputs,
                         const JobLimits& limits) override {
    Lease member(this);
    return member->SubmitJob(job, inputs, limits);
  }

  absl::StatusOr<std::optional<v1::Job>> ClaimJob(const std::string& runner,
                                                  const std::string& config,
                                                  absl::Duration lease,
                                                  int max_attempts) override {
    Lease member(this);
    return member->ClaimJob(runner, config, lease, max_attempts);
  }

  absl::StatusOr<bool> RenewLease(const v1::Job& job,
                                  absl::Duration lease) override {
    Lease member(this);
    return member->RenewLease(job, lease);
  }

  absl::Status UpdateRun(const v1::Job& job) override {
    Lease member(this);
    return member->UpdateRun(job);
  }

  absl::Status ReleaseRun(const v1::Job& job) override {
    Lease member(this);
    return member->ReleaseRun(job);
  }

  absl::StatusOr<v1::Job> CancelJob(const std::string& id,
                                    const std::string& owner) override {
    Lease member(this);
    return member->CancelJob(id, owner);
  }

  absl::StatusOr<std::vector<v1::Job>> RequeueRunsOf(const std::string& runner,
                                                     bool every) override {
    Lease member(this);
    return member->RequeueRunsOf(runner, every);
  }

  absl::Status AddTasks(const v1::Job& job, int count,
                        const std::string& layout) override {
    Lease member(this);
    return member->AddTasks(job, count, layout);
  }

  absl::StatusOr<std::optional<JobTask>> ClaimTask(const std::string& runner,
                                                   const std::string& config,
                                                   const std::string& job_id,
                                                   absl::Duration lease,
                                                   int max_attempts,
                                                   v1::Job* job) override {
    Lease member(this);
    return member->ClaimTask(runner, config, job_id, lease, max_attempts, job);
  }

  absl::StatusOr<bool> RenewTask(const JobTask& task,
                                 absl::Duration lease) override {
    Lease member(this);
    return member->RenewTask(task, lease);
  }

  absl::Status UpdateTask(const JobTask& task) override {
    Lease member(this);
    return member->UpdateTask(task);
  }

  absl::Status CompleteTask(
      const JobTask& task,
      const std::function<absl::Status()>& place) override {
    Lease member(this);
    return member->CompleteTask(task, place);
  }

  absl::Status ReleaseTask(const JobTask& task) override {
    Lease member(this);
    return member->ReleaseTask(task);
  }

  absl::StatusOr<std::vector<JobTask>> ListTasks(
      const std::string& job_id) override {
    Lease member(this);
    return member->ListTasks(job_id);
  }

  absl::Status FailJob(const v1::Job& job) override {
    Lease member(this);
    return member->FailJob(job);
  }

  absl::StatusOr<v1::Job> GetJob(const std::string& id) override {
    Lease member(this);
    return member->GetJob(id);
  }

  absl::StatusOr<std::vector<v1::Job>> ListJobs(
      const std::string& owner) override {
    Lease member(this);
    return member->ListJobs(owner);
  }

  absl::StatusOr<std::pair<int64_t, int64_t>> JobCounts() override {
    Lease member(this);
    return member->JobCounts();
  }

  absl::StatusOr<int64_t> PendingOutputBytes(
      const std::string& owner) override {
    Lease member(this);
    return member->PendingOutputBytes(owner);
  }

 private:
  // A member taken for one call, given back when destroyed.
  class Lease {
   public:
    explicit Lease(CatalogPool* pool) : pool_(pool) {
      absl::MutexLock lock(&pool_->mu_);
      pool_->mu_.Await(absl::Condition(
          +[](std::vector<Catalog*>* idle) { return !idle->empty(); },
          &pool_->idle_));
      member_ = pool_->idle_.back();
      pool_->idle_.pop_back();
    }
    ~Lease() {
      absl::MutexLock lock(&pool_->mu_);
      pool_->idle_.push_back(member_);
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Catalog* operator->() const { return member_; }

   private:
    CatalogPool* const pool_;
    Catalog* member_ = nullptr;
  };

  const std::vector<std::unique_ptr<Catalog>> members_;
  absl::Mutex mu_;
  std::vector<Catalog*> idle_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

std::unique_ptr<Catalog> PoolOf(std::vector<std::unique_ptr<Catalog>> members) {
  return std::make_unique<CatalogPool>(std::move(members));
}

}  // namespace amalgam::server
