#pragma once

// The catalog: the rows of artifacts, their shares, resumable uploads and
// jobs. Each method is one transaction. Files are not its business (see
// Storage, which pairs catalog rows with blobs). Thread-safe.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "amalgam/v1/amalgam.pb.h"

namespace amalgam::server {

// A resumable upload's row: its header, and the artifact it made once
// finished (empty before).
struct UploadRow {
  v1::UploadHeader header;
  std::string artifact_id;
};

// (owner, upload id).
using UploadKey = std::pair<std::string, std::string>;

// What bounds a submission, counted over the whole catalog.
struct JobLimits {
  // Jobs waiting to run.
  int max_queued = 64;
  // Queued plus running jobs of one organisation.
  int max_active_per_org = 16;
};

// A task of a running job: one shard of one of its output models. Claimed
// by a worker of any process as jobs are (a lease it renews, an attempt
// that fences its writes), and written once, as a blob.
struct JobTask {
  std::string job_id;
  int task = 0;
  std::string runner;  // empty while nobody holds it
  int attempt = 0;
  // Runs that stopped holding it (lease expired); a released run is not one.
  int stops = 0;
  // Claimable again once this passes (milliseconds since the epoch).
  int64_t lease_until_ms = 0;
  int64_t tensors_done = 0;
  int64_t bytes_done = 0;
  // Done: the shard's blob.
  bool done = false;
  std::string sha256;
  int64_t size_bytes = 0;
  // A run that failed: its status (the job then fails with it).
  int error_code = 0;
  std::string error_message;
};

// The files of an artifact: its `files`, or, for an artifact stored before
// models had files, one model.safetensors holding its content.
std::vector<v1::ModelFile> ArtifactFiles(const v1::Artifact& artifact);

// The artifacts a job reads.
std::vector<std::string> JobInputs(const v1::Job& job);

// True for SUCCEEDED, FAILED and CANCELLED.
bool IsFinal(v1::JobState state);

// Puts an artifact's content in place (a blob), inside the transaction that
// inserts its row.
using PlaceContent = std::function<absl::Status(const v1::Artifact&)>;

class Catalog {
 public:
  virtual ~Catalog() = default;

  // OK while the database answers; UNAVAILABLE while it does not.
  virtual absl::Status Ping() = 0;

  // Content locks. The transactions that put a blob in place with the row
  // that references it (InsertArtifact, PublishResults) and those that
  // remove a blob no row references (DeleteArtifact,
  // RemoveUnreferencedContent) hold a lock on its sha256, across every
  // process on the catalog: a blob is never removed while a row that
  // references it is being committed.

  // Inserts a new artifact under a fresh id and the current time, both set
  // in `artifact` (a colliding id is drawn again, never overwritten).
  // `place` runs first, under the content lock; its error is returned and
  // nothing is inserted.
  virtual absl::Status InsertArtifact(v1::Artifact* artifact,
                                      const PlaceContent& place) = 0;
  // NOT_FOUND naming the id; DATA_LOSS for a corrupt row.
  virtual absl::StatusOr<v1::Artifact> GetArtifact(const std::string& id) = 0;
  // As GetArtifact, once no transaction is changing the row: a delete in
  // progress is waited for (and the artifact is then NOT_FOUND).
  virtual absl::StatusOr<v1::Artifact> GetSettledArtifact(
      const std::string& id) = 0;
  // Every artifact, or (`organization` set) those it owns or that are
  // shared with it, through indexed columns; in insertion order.
  virtual absl::StatusOr<std::vector<v1::Artifact>> ListArtifacts(
      const std::string& organization) = 0;
  // Artifacts catalogued, and the bytes of their distinct contents.
  virtual absl::StatusOr<std::pair<int64_t, int64_t>> Stats() = 0;
  // Reads artifact `id`, applies `change` and writes it back: concurrent
  // changes are never lost, and an artifact deleted meanwhile is NOT_FOUND,
  // never recreated. An error from `change` is returned, nothing written.
  virtual absl::StatusOr<v1::Artifact> ModifyArtifact(
      const std::string& id,
      const std::function<absl::Status(v1::Artifact&)>& change) = 0;
  // Deletes the artifact unless a queued or running job reads it: then
  // FAILED_PRECONDITION, naming the job to its owner. In one transaction
  // that holds the artifact's row: `remove_content` (told the contents of
  // its files that no other artifact has) runs before the rows go, so that
  // a submission never sees the row of a blob already removed. NOT_FOUND if
  // it is gone.
  virtual absl::Status DeleteArtifact(
      const v1::Artifact& artifact,
      const std::function<absl::Status(
          const std::vector<std::string>& sole_contents)>& remove_content) = 0;
  // Bytes `owner` holds: its artifacts' distinct contents and the declared
  // sizes of its unfinished uploads, except the upload `except_upload`.
  virtual absl::StatusOr<int64_t> OrgBytes(
      const std::string& owner, const std::string& except_upload) = 0;
  // Inserts each of `results` as InsertArtifact does (`place` for each),
  // sets their ids as `job`'s result_ids and writes `job` (SUCCEEDED), all
  // or nothing, fenced by the run's attempt. Returns the job.
  virtual absl::StatusOr<v1::Job> PublishResults(
      v1::Job job, std::vector<v1::Artifact>* results,
      const PlaceContent& place) = 0;
  // Under the content lock of `sha256`: runs `remove` if no artifact and no
  // task has that content. Returns whether it ran.
  virtual absl::StatusOr<bool> RemoveUnreferencedContent(
      const std::string& sha256,
      const std::function<absl::Status()>& remove) = 0;

  // Housekeeping (expiry of uploads, removal of unreferenced blobs) runs in
  // one process at a time: the one holding the housekeeping lease. Takes or
  // renews it for `holder` for `lease`; false while another holder's lease
  // runs.
  virtual absl::StatusOr<bool> TryHousekeeping(const std::string& holder,
                                               absl::Duration lease) = 0;

  // Resumable uploads, keyed by (owner, upload id). NOT_FOUND when none.
  virtual absl::StatusOr<UploadRow> FindUpload(
      const std::string& owner, const std::string& upload_id) = 0;
  // Registers (or replaces) an unfinished upload, touched now.
  virtual absl::Status PutUpload(const std::string& owner,
                                 const v1::UploadHeader& header) = 0;
  virtual absl::Status CompleteUpload(const std::string& owner,
                                      const std::string& upload_id,
                                      const std::string& artifact_id) = 0;
  virtual absl::Status TouchUpload(const std::string& owner,
                                   const std::string& upload_id) = 0;
  virtual absl::Status DeleteUpload(const std::string& owner,
                                    const std::string& upload_id) = 0;
  // Whether the upload exists, untouched since `cutoff_unix_seconds`.
  virtual absl::StatusOr<bool> UploadIsStale(const std::string& owner,
                                             const std::string& upload_id,
                                             int64_t cutoff_unix_seconds) = 0;
  virtual absl::StatusOr<std::vector<UploadKey>> StaleUploads(
      int64_t cutoff_unix_seconds) = 0;
  // Uploads not finished yet (they have a file).
  virtual absl::StatusOr<std::vector<UploadKey>> UnfinishedUploads() = 0;

  // Upload streams open, across every process on the catalog: each holds a
  // row under a lease that its process renews (RenewStreams), so that the
  // per-organisation limit holds cluster-wide and one upload id is received
  // by one stream at a time. A stream whose process stopped renewing is
  // gone once its lease runs out.

  // Opens stream `stream` of `owner`, held by `holder`, receiving the
  // resumable upload `upload_id` ("" for a one-shot upload): RESOURCE_
  // EXHAUSTED, naming the organisation, when it has `max_per_org` open;
  // ABORTED when another stream receives `upload_id`, which is asked to
  // stop (its holder cancels it at its next renewal).
  virtual absl::Status OpenStream(const std::string& stream,
                                  const std::string& owner,
                                  const std::string& upload_id,
                                  const std::string& holder,
                                  absl::Duration lease, int max_per_org) = 0;
  virtual absl::Status CloseStream(const std::string& stream) = 0;
  // At start: the streams of an earlier run under the same name are gone.
  virtual absl::Status CloseStreamsOf(const std::string& holder) = 0;
  // Renews the leases of `holder`'s streams; returns those asked to stop.
  virtual absl::StatusOr<std::vector<std::string>> RenewStreams(
      const std::string& holder, absl::Duration lease) = 0;

  // Jobs. The catalog is the job queue: any process on it may claim a
  // queued job, and holds it by a lease it renews; every write of a run is
  // fenced by its attempt number, so a run that lost its lease can change
  // nothing (FAILED_PRECONDITION).

  // Queues `job` (QUEUED) reading the artifacts `inputs`, in one
  // transaction that checks they all still exist (NOT_FOUND naming one that
  // does not) and the limits (RESOURCE_EXHAUSTED naming the one reached).
  // ALREADY_EXISTS if the job's id is taken.
  virtual absl::Status SubmitJob(const v1::Job& job,
                                 const std::vector<std::string>& inputs,
                                 const JobLimits& limits) = 0;
  // Claims the oldest job that is QUEUED, or RUNNING with a lease that
  // expired (its runner stopped), past its backoff, and whose numeric
  // configuration is unset or `config`: it becomes RUNNING by `runner`
  // under the next attempt with a lease of `lease`, and records `config`.
  // A job whose runners stopped `max_attempts` times fails instead. Returns
  // the claimed job (its attempt set), or nullopt when there is none.
  virtual absl::StatusOr<std::optional<v1::Job>> ClaimJob(
      const std::string& runner, const std::string& config,
      absl::Duration lease, int max_attempts) = 0;
  // Renews the lease of the run `job.attempt()` of `job`; returns whether a
  // cancel was requested.
  virtual absl::StatusOr<bool> RenewLease(const v1::Job& job,
                                          absl::Duration lease) = 0;
  // Writes the record of a job being run (progress) or that the run ended
  // (FAILED, CANCELLED), fenced by its attempt.
  virtual absl::Status UpdateRun(const v1::Job& job) = 0;
  // The run gives its job back (shutdown): QUEUED again, claimable at once.
  virtual absl::Status ReleaseRun(const v1::Job& job) = 0;
  // A QUEUED job becomes CANCELLED; a RUNNING one is marked, and its runner
  // stops it at its next lease renewal. Returns the job; NOT_FOUND unless
  // `owner` owns it. A finished job is returned unchanged.
  virtual absl::StatusOr<v1::Job> CancelJob(const std::string& id,
                                            const std::string& owner) = 0;
  // At start: RUNNING jobs of `runner` (every RUNNING job when `every`, as
  // where one process owns the catalog) become QUEUED again, with their
  // progress cleared, and the tasks it held (every task when `every`) are
  // claimable again. Returns the jobs it requeued.
  virtual absl::StatusOr<std::vector<v1::Job>> RequeueRunsOf(
      const std::string& runner, bool every) = 0;
  // Tasks. A job's run adds its tasks and publishes its results once every
  // one is done; workers of every process on the catalog claim them. A job
  // that ends (however it ends) drops its tasks; a task's writes are fenced
  // by its attempt and runner (a job's rows exist until it ends).

  // Adds tasks 0..count-1 that the job lacks, fenced by the run
  // `job.attempt()`: those of an earlier run with the same `layout` (the
  // shards planned) stay, done or held; those of another are replaced.
  virtual absl::Status AddTasks(const v1::Job& job, int count,
                                const std::string& layout) = 0;
  // Claims a task not done and not held (or whose lease expired: one more
  // stop, of at most `max_attempts`), of a RUNNING job not asked to cancel,
  // none of whose tasks failed, whose numeric configuration is `config`
  // (only of job `job_id` unless empty), oldest job first: held by `runner`
  // under the next attempt for `lease`, progress cleared. Returns it, and
  // its job in `*job`; nullopt when there is none.
  virtual absl::StatusOr<std::optional<JobTask>> ClaimTask(
      const std::string& runner, const std::string& config,
      const std::string& job_id, absl::Duration lease, int max_attempts,
      v1::Job* job) = 0;
  // Renews the task's lease; returns whether it should stop (its job is
  // asked to cancel, or another of its tasks failed). FAILED_PRECONDITION
  // when the run lost the task (or its job ended).
  virtual absl::StatusOr<bool> RenewTask(const JobTask& task,
                                         absl::Duration lease) = 0;
  // Writes the task's progress, or its failure (error_code set), fenced.
  virtual absl::Status UpdateTask(const JobTask& task) = 0;
  // Marks the task done with its blob (`task.sha256`, `size_bytes`), which
  // `place` puts in place under the content lock, fenced.
  virtual absl::Status CompleteTask(
      const JobTask& task, const std::function<absl::Status()>& place) = 0;
  // The run gives its task back (shutdown): claimable at once.
  virtual absl::Status ReleaseTask(const JobTask& task) = 0;
  // The tasks of a job, by number.
  virtual absl::StatusOr<std::vector<JobTask>> ListTasks(
      const std::string& job_id) = 0;

  // Ends a job outside any run (its inputs no longer validate).
  virtual absl::Status FailJob(const v1::Job& job) = 0;
  // NOT_FOUND naming the id.
  virtual absl::StatusOr<v1::Job> GetJob(const std::string& id) = 0;
  // The jobs of `owner` (every job when empty), in submission order.
  virtual absl::StatusOr<std::vector<v1::Job>> ListJobs(
      const std::string& owner) = 0;
  // Queued and running jobs.
  virtual absl::StatusOr<std::pair<int64_t, int64_t>> JobCounts() = 0;
  // Output bytes of `owner`'s queued and running jobs.
  virtual absl::StatusOr<int64_t> PendingOutputBytes(
      const std::string& owner) = 0;
};

// A random id with the given prefix, e.g. "art_3f9c0a7b21d4e5f6", from the
// kernel's CSPRNG (getrandom).
std::string NewId(const std::string& prefix);

// Opens the catalog named by `uri` and brings its schema up to date (numbered
// migrations, one transaction each, under a lock): "sqlite" is catalog.db in
// `data_dir`; "postgresql://..." (or "postgres://...") a PostgreSQL database
// by libpq URI. INVALID_ARGUMENT for any other URI.
absl::StatusOr<std::unique_ptr<Catalog>> OpenCatalog(
    const std::string& uri, const std::string& data_dir);

}  // namespace amalgam::server
