#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "amalgam/v1/amalgam.pb.h"
#include "core/grow.h"
#include "core/merge.h"
#include "server/metrics.h"
#include "server/results.h"
#include "server/sql.h"
#include "server/storage.h"

namespace amalgam::server {

struct JobManagerOptions {
  // Jobs and tasks (shards of jobs of any process) run concurrently.
  int workers = 1;
  // Jobs waiting to run; a submission past it is RESOURCE_EXHAUSTED.
  int max_queued = 64;
  // Queued plus running jobs one organisation may have; a submission past
  // it is RESOURCE_EXHAUSTED.
  int max_active_per_org = 16;
  // Tests only: a pause after each merged tensor, so a test can act while a
  // job runs (kill the server mid-merge). Zero in production.
  absl::Duration testing_step_delay = absl::ZeroDuration();
  // Where finished jobs are counted; may be null.
  Metrics* metrics = nullptr;
  // Resolved device ("cpu", "cuda:0").
  std::string device = "cpu";
  // Most models one merge may name (each is an open file with its statistics).
  int max_models_per_job = 64;
  // Largest result artifact a job may write (as --max-upload-bytes bounds an
  // upload); a submission past it is RESOURCE_EXHAUSTED.
  int64_t max_output_bytes = int64_t{64} << 30;
  // Bytes one organisation may hold (artifacts, partial uploads, outputs of
  // its queued and running jobs); 0: unlimited.
  int64_t quota_bytes_per_org = 0;
  // Bytes kept free on the data volume: a job whose outputs would eat into
  // them is refused at submission.
  int64_t disk_reserve_bytes = 0;
  // The name jobs run under (Job.runner): unique among the processes on one
  // catalog, and the same after a restart where it can be.
  std::string replica_name = "amalgamd";
  // Whether this process is the catalog's only one (the embedded SQLite
  // catalog): at start, every job left running was its own.
  bool sole_process = true;
  // A runner's hold on its job, renewed every third of it; a job whose
  // runner stops renewing is taken over once it expires.
  absl::Duration job_lease = absl::Seconds(30);
  // Runs of a job whose runner stopped, after which it fails.
  int max_attempts = 3;
  // The numeric configuration (BLAS core, threads, device kind) that decides
  // a result's last bits: a job runs under the one of its first run.
  std::string numeric_config;
  // How often an idle worker looks for a job in the catalog, and a watch of
  // a job run by another process reads it (while `job_changes` is not
  // listening; every 10 intervals while it is).
  absl::Duration poll_interval = absl::Milliseconds(200);
  // Changes of jobs made by other processes on the catalog (null: none
  // tell, as with the embedded catalog): they wake idle workers and the
  // watches of those jobs at once.
  JobChanges* job_changes = nullptr;
};

// Validates and queues jobs in the catalog, and runs them on a pool of worker
// threads, off the RPC threads. The catalog is the queue: the workers of
// every process on it claim jobs there and hold them by a lease (see
// Catalog::ClaimJob), so any process can run, watch or cancel any job. Every
// state change is persisted before it is announced. No lock is held across
// catalog or file I/O. Thread-safe.
class JobManager {
 public:
  using Listener = std::function<void(const v1::Job&)>;

  JobManager(Storage* storage, JobManagerOptions options);
  // Cancels running jobs and joins the workers.
  ~JobManager();
  JobManager(const JobManager&) = delete;
  JobManager& operator=(const JobManager&) = delete;

  // Output bytes of `owner`'s queued and running jobs (counted against its
  // quota until they are results).
  absl::StatusOr<int64_t> PendingOutputBytes(const std::string& owner) const;

  // Re-queues the jobs this process was running when it stopped (every
  // running job where it is the catalog's only process), failing those whose
  // inputs no longer validate. Call once, before Submit.
  absl::Status Recover();

  // Validates the whole job (artifacts exist and are of the right kinds,
  // tensors agree) and queues it. INVALID_ARGUMENT, NOT_FOUND,
  // FAILED_PRECONDITION as the request deserves; RESOURCE_EXHAUSTED when the
  // queue is full or the owner has max_active_per_org unfinished jobs.
  absl::StatusOr<v1::Job> Submit(const v1::SubmitJobRequest& request,
                                 const std::string& owner);
  // Jobs are visible to their owner only: another organisation's job id is
  // NOT_FOUND, like an unknown one.
  absl::StatusOr<v1::Job> Get(const std::string& id,
                              const std::string& organization);
  std::vector<v1::Job> List(const std::string& organization);
  // Cancels a queued or running job; a finished job is returned unchanged.
  absl::StatusOr<v1::Job> Cancel(const std::string& id,
                                 const std::string& organization);
  // Deletes the artifact from storage unless a queued or running job reads
  // it (FAILED_PRECONDITION naming the job). Atomic with Submit.
  absl::Status DeleteIfUnused(const v1::Artifact& artifact);

  // Graceful shutdown: refuses new jobs (UNAVAILABLE), starts no queued
  // one, and waits up to `timeout` for the running ones to finish. Those
  // still running afterwards are stopped by the destructor and re-run on the
  // next start.
  void Drain(absl::Duration timeout);
  // Queued and running jobs now, in the catalog.
  std::pair<int64_t, int64_t> Counts();

  // Calls `listener` with the job now and after every change until Unwatch
  // (a job run by another process: as its catalog row changes, read every
  // poll_interval). The listener runs under the manager's lock: it must not
  // block or call back into the manager. Returns a token for Unwatch;
  // NOT_FOUND.
  absl::StatusOr<uint64_t> Watch(const std::string& id,
                                 const std::string& organization,
                                 Listener listener);
  void Unwatch(const std::string& id, uint64_t token);

 private:
  struct Prepared;
  struct Running;
  struct TaskRun;

  // Fills in, for a RegMean (Fisher) merge, the gram_id (fisher_id) of each
  // model that names none: the one statistics artifact of that kind,
  // visible to `owner`, that describes the model. FAILED_PRECONDITION
  // listing them where there are several; left empty where there is none.
  absl::Status ResolveLinkedStatistics(const std::string& owner,
                                       v1::MergeSpec* spec);
  // Opens the inputs and plans the job: what Submit validates and Run runs.
  absl::StatusOr<std::unique_ptr<Prepared>> Prepare(const v1::Job& job);
  absl::Status PrepareMerge(const v1::Job& job, Prepared* prepared);
  absl::Status PrepareSweep(const v1::Job& job, Prepared* prepared);
  absl::Status PrepareGrow(const v1::Job& job, Prepared* prepared);
  // The result options of `output` (named `field`); sets the input whose
  // side files the results get (`output.config_from` of `inputs`, else
  // `fallback`, else the first input).
  absl::StatusOr<ResultOptions> PrepareOutput(
      const v1::OutputOptions& output, const std::string& field,
      const std::vector<std::string>& inputs, const std::string& fallback,
      Prepared* prepared);
  // Opens artifact `id` (empty: nullptr) of `kind` for the job's owner,
  // keeping the reader in `prepared`; `field` names it in errors.
  absl::StatusOr<const core::SafetensorsReader*> OpenInput(
      const v1::Job& job, const std::string& id, v1::ArtifactKind kind,
      const std::string& field, Prepared* prepared);
  void WorkerLoop();
  // Renews the leases of this process's runs, and reads the jobs watched
  // here that other processes run.
  void HeartbeatLoop();
  // Runs a claimed job to its end (or until it is lost or given back).
  void RunClaimed(Running* run);
  // Wakes workers and watches on the changes options_.job_changes tells of.
  void ListenLoop();
  // Reads the jobs `ids` that another process runs and tells their watchers
  // here of any change.
  void ReadRemote(const std::vector<std::string>& ids);
  // Tells the watchers of job `job.id()` about it.
  void Notify(const v1::Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks `run` lost (another process holds its job now) when `status`
  // says so; true then.
  bool LostIf(Running* run, const absl::Status& status);
  // The outputs of a job, model directories written under tmp/ and
  // described, not yet visible; removes the directories when destroyed.
  struct Outputs {
    std::vector<std::string> dirs;
    std::vector<Storage::StagedArtifact> files;
    Outputs() = default;
    Outputs(const Outputs&) = delete;
    Outputs& operator=(const Outputs&) = delete;
    ~Outputs();
  };
  // Writes the job's outputs into `outputs`: adds its tasks (a shard of an
  // output model each) to the catalog, runs them with the workers of every
  // process, then links each model's shards into a directory with its index
  // and side files.
  absl::Status RunJob(Running* run, Outputs* outputs);
  // Stops the runs here of job `job_id`'s tasks.
  void CancelTasksOf(const std::string& job_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sets the progress of job `job_id`, run here, to its tasks' sum.
  void RefreshProgress(const std::string& job_id);
  // Claims a task (of job `job_id` only, unless empty) and runs it; false
  // when there was none. `prepared`: the job's open inputs, or null.
  bool RunATask(const std::string& job_id, const Prepared* prepared);
  // Writes the task's shard and records it done (or failed) in the catalog.
  void RunTask(TaskRun* run, const Prepared* prepared);
  // Writes shard `shard` of output model `output` of `job` into `dir`.
  static absl::Status WriteShard(
      const Prepared& prepared, const v1::Job& job, int output, int shard,
      const std::string& dir,
      const std::function<void(int64_t, int64_t)>& report,
      const std::atomic<bool>* cancelled);
  // The tensors every output model of `prepared` holds, and their shard size.
  static std::vector<core::TensorSpec> OutputSpecs(const Prepared& prepared);
  static uint64_t ShardBytes(const Prepared& prepared);
  // The name of output model `output`.
  static std::string ResultName(const v1::Job& job, const Prepared& prepared,
                                int output);
  // Shard `shard` of one model of a sweep, (1 - t) A + t B; the endpoints
  // hold A's and B's tensors.
  static absl::Status WriteSweepStep(
      const Prepared& prepared, double t, int shard,
      const std::string& out_path,
      const std::function<void(int64_t, int64_t)>& progress,
      const std::atomic<bool>* cancelled);
  // Deletes results that a job of an earlier version of amalgamd stored
  // before it was re-run (results are now published with SUCCEEDED), never
  // those the job was published with.
  void DiscardResults(const std::string& job_id);
  Storage* const storage_;
  const JobManagerOptions options_;

  Catalog* catalog() const { return storage_->catalog(); }

  mutable absl::Mutex mu_;
  // The jobs this process runs, and the tasks.
  std::map<std::string, std::unique_ptr<Running>> running_ ABSL_GUARDED_BY(mu_);
  std::set<TaskRun*> task_runs_ ABSL_GUARDED_BY(mu_);
  // Jobs cancelled here between their claim and their run's start.
  std::set<std::string> cancelled_here_ ABSL_GUARDED_BY(mu_);
  // Listeners by job id, and the last state each job was announced in.
  std::map<std::string, std::map<uint64_t, Listener>> watchers_
      ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> announced_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  // A job was submitted here: a worker looks at once.
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_token_ ABSL_GUARDED_BY(mu_) = 1;
  // Whether options_.job_changes is listening now.
  std::atomic<bool> listening_{false};
  std::vector<std::thread> workers_;
  std::thread heartbeat_;
  std::thread listener_;
};

}  // namespace amalgam::server
