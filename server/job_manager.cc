#include "server/job_manager.h"

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <tuple>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "core/merge.h"
#include "core/model_files.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "core/status_macros.h"
#include "server/grpc_status.h"
#include "server/log.h"
#include "server/results.h"
#include "server/space.h"
#include "server/upload_header.h"

namespace amalgam::server {
namespace {

int64_t Now() { return static_cast<int64_t>(std::time(nullptr)); }

// "merge", "grow" or "sweep".
std::string JobKind(const v1::Job& job) {
  return job.has_grow() ? "grow" : job.has_sweep() ? "sweep" : "merge";
}

// Most models one sweep may produce.
constexpr int kMaxSweepSteps = 1000;

absl::StatusOr<core::MergeMethod> ToCoreMethod(v1::MergeMethod method) {
  switch (method) {
    case v1::MERGE_METHOD_AVERAGE:
      return core::MergeMethod::kAverage;
    case v1::MERGE_METHOD_WEIGHTED:
      return core::MergeMethod::kWeighted;
    case v1::MERGE_METHOD_FISHER:
      return core::MergeMethod::kFisher;
    case v1::MERGE_METHOD_REGMEAN:
      return core::MergeMethod::kRegMean;
    case v1::MERGE_METHOD_TASK_ARITHMETIC:
      return core::MergeMethod::kTaskArithmetic;
    case v1::MERGE_METHOD_TIES:
      return core::MergeMethod::kTies;
    case v1::MERGE_METHOD_DARE_LINEAR:
      return core::MergeMethod::kDareLinear;
    case v1::MERGE_METHOD_DARE_TIES:
      return core::MergeMethod::kDareTies;
    case v1::MERGE_METHOD_SLERP:
      return core::MergeMethod::kSlerp;
    case v1::MERGE_METHOD_MODEL_STOCK:
      return core::MergeMethod::kModelStock;
    default:
      return absl::InvalidArgumentError(
          "merge.method must be one of average, weighted, fisher, regmean, "
          "task_arithmetic, ties, dare_linear, dare_ties, slerp, model_stock");
  }
}

}  // namespace

// Open inputs and the validated plan of a job.
struct JobManager::Prepared {
  std::vector<std::unique_ptr<core::SafetensorsReader>> readers;
  std::vector<core::MergeInput> inputs;
  core::MergeOptions options;
  // For a sweep, the plan of its midpoint; every step has the same tensors.
  core::MergePlan plan;
  // Sweep: the t of each step.
  std::vector<double> sweep_ts;
  // Output models the job writes (1, or the sweep's steps), and the size of
  // each.
  int outputs = 1;
  int64_t tensors_per_output = 0;
  uint64_t bytes_per_output = 0;
  // Grow: the two models (b null for self-fusion) and the plan.
  const core::SafetensorsReader* grow_a = nullptr;
  const core::SafetensorsReader* grow_b = nullptr;
  core::GrowOptions grow_options;
  core::GrowPlan grow_plan;
  // The artifacts opened, by id.
  std::map<std::string, v1::Artifact> artifacts;
  // The input whose side files the results get, and the keys a grow sets
  // in config.json (a JSON object; empty for merges and sweeps).
  v1::Artifact config_from;
  std::string config_keys;
};

// A task this process runs (of a job run here or by another process).
struct JobManager::TaskRun {
  JobTask task;
  v1::Job job;
  // Its job is asked to cancel, it was lost, or the process stops.
  std::atomic<bool> cancelled{false};
  std::atomic<bool> lost{false};
  absl::Time persisted = absl::InfinitePast();
  absl::Time renewed = absl::Now();
};

// A job this process runs.
struct JobManager::Running {
  v1::Job job;
  std::atomic<bool> cancelled{false};
  // Cancelled by a user (not by shutdown).
  std::atomic<bool> user_cancelled{false};
  // Another process holds the job now: this run changes nothing more.
  std::atomic<bool> lost{false};
  // When progress was last written to the catalog.
  absl::Time persisted = absl::InfinitePast();
  absl::Time renewed = absl::Now();
  // Its progress is its tasks' sum: from when they are in the catalog until
  // all are written (the totals are the submission's).
  bool from_tasks = false;
};

JobManager::JobManager(Storage* storage, JobManagerOptions options)
    : storage_(storage), options_(std::move(options)) {
  for (int i = 0; i < std::max(1, options_.workers); ++i) {
    workers_.emplace_back([this] { WorkerLoop(); });
  }
  heartbeat_ = std::thread([this] { HeartbeatLoop(); });
  if (options_.job_changes != nullptr) {
    listener_ = std::thread([this] { ListenLoop(); });
  }
}

JobManager::~JobManager() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (auto& [id, run] : running_) run->cancelled = true;
    for (TaskRun* task : task_runs_) task->cancelled = true;
  }
  for (std::thread& worker : workers_) worker.join();
  heartbeat_.join();
  if (listener_.joinable()) listener_.join();
}

absl::Status JobManager::Recover() {
  AMALGAM_ASSIGN_OR_RETURN(
      std::vector<v1::Job> requeued,
      catalog()->RequeueRunsOf(options_.replica_name, options_.sole_process));
  for (v1::Job& job : requeued) {
    absl::StatusOr<std::unique_ptr<Prepared>> p = Prepare(job);
    if (!p.ok()) {
      job.set_state(v1::JOB_STATE_FAILED);
      job.set_error_code(static_cast<int>(p.status().code()));
      job.set_error_message(PublicMessage(
          absl::StrCat("after a restart the job's inputs no longer validate: ",
                       p.status().message())));
      job.set_finished_at(Now());
      AMALGAM_RETURN_IF_ERROR(catalog()->FailJob(job));
      continue;
    }
    // Results a crashed run of an earlier version stored before it died;
    // the re-run makes them again.
    DiscardResults(job.id());
  }
  AMALGAM_ASSIGN_OR_RETURN(const auto counts, catalog()->JobCounts());
  Log(LogLevel::kInfo, LogFields("recover")
                           .Add("requeued", counts.first)
                           .Add("running_elsewhere", counts.second)
                           .Add("replica", options_.replica_name));
  return absl::OkStatus();
}

absl::StatusOr<const core::SafetensorsReader*> JobManager::OpenInput(
    const v1::Job& job, const std::string& id, v1::ArtifactKind kind,
    const std::string& field, Prepared* prepared) {
  if (id.empty()) return nullptr;
  // Only artifacts the submitter may read: others are NOT_FOUND.
  AMALGAM_ASSIGN_OR_RETURN(v1::Artifact artifact,
                           storage_->GetArtifactFor(id, job.owner()));
  if (artifact.kind() != kind) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " is ", id, ", a ", v1::ArtifactKind_Name(artifact.kind()),
        " artifact; expected ", v1::ArtifactKind_Name(kind)));
  }
  absl::StatusOr<std::unique_ptr<core::SafetensorsReader>> reader =
      storage_->OpenBlob(artifact);
  if (!reader.ok()) {
    // Its blob may have gone with a delete still in progress: then the
    // artifact is not found (once the delete is done), not lost.
    AMALGAM_RETURN_IF_ERROR(catalog()->GetSettledArtifact(id).status());
    return reader.status();
  }
  prepared->readers.push_back(*std::move(reader));
  prepared->artifacts[id] = std::move(artifact);
  return prepared->readers.back().get();
}

absl::StatusOr<std::unique_ptr<JobManager::Prepared>> JobManager::Prepare(
    const v1::Job& job) {
  auto prepared = std::make_unique<Prepared>();
  prepared->options.device = options_.device;
  switch (job.spec_case()) {
    case v1::Job::kMerge:
      AMALGAM_RETURN_IF_ERROR(PrepareMerge(job, prepared.get()));
      break;
    case v1::Job::kSweep:
      AMALGAM_RETURN_IF_ERROR(PrepareSweep(job, prepared.get()));
      break;
    case v1::Job::kGrow:
      AMALGAM_RETURN_IF_ERROR(PrepareGrow(job, prepared.get()));
      return prepared;
    default:
      return absl::InvalidArgumentError(
          "the job needs a merge, grow or sweep spec");
  }
  prepared->tensors_per_output =
      static_cast<int64_t>(prepared->plan.tensors.size());
  prepared->bytes_per_output = prepared->plan.output_bytes;
  return prepared;
}

absl::Status JobManager::PrepareGrow(const v1::Job& job, Prepared* prepared) {
  const v1::GrowSpec& spec = job.grow();
  if (spec.a_id().empty()) return absl::InvalidArgumentError("grow needs a_id");
  core::GrowOptions& options = prepared->grow_options;
  options.layout = spec.layout();
  options.rules = spec.rules();
  options.noise_scale = spec.noise_scale();
  options.device = options_.device;
  if (options.layout.empty()) {
    return absl::InvalidArgumentError(
        "grow needs a layout (mlp, bert, gpt2 or rules)");
  }
  AMALGAM_ASSIGN_OR_RETURN(
      prepared->grow_a, OpenInput(job, spec.a_id(), v1::ARTIFACT_KIND_WEIGHTS,
                                  "grow.a_id", prepared));
  AMALGAM_ASSIGN_OR_RETURN(
      prepared->grow_b, OpenInput(job, spec.b_id(), v1::ARTIFACT_KIND_WEIGHTS,
                                  "grow.b_id", prepared));
  const std::string b_id = spec.b_id().empty() ? spec.a_id() : spec.b_id();
  AMALGAM_ASSIGN_OR_RETURN(const ResultOptions output,
                           PrepareOutput(spec.output(), "grow.output",
                                         {spec.a_id(), b_id}, "", prepared));
  options.shard_bytes = output.shard_bytes;
  options.out_dtype = output.out_dtype;
  AMALGAM_ASSIGN_OR_RETURN(
      prepared->grow_plan,
      core::PlanGrow(*prepared->grow_a, prepared->grow_b, options));
  AMALGAM_ASSIGN_OR_RETURN(
      const std::string config_a,
      ReadConfig(*storage_, prepared->artifacts.at(spec.a_id())));
  AMALGAM_ASSIGN_OR_RETURN(const std::string config_b,
                           ReadConfig(*storage_, prepared->artifacts.at(b_id)));
  AMALGAM_ASSIGN_OR_RETURN(
      prepared->config_keys,
      core::GrownConfigKeys(prepared->grow_plan, config_a, config_b));
  prepared->tensors_per_output =
      static_cast<int64_t>(prepared->grow_plan.tensors.size());
  prepared->bytes_per_output = prepared->grow_plan.output_bytes;
  return absl::OkStatus();
}

absl::Status JobManager::PrepareSweep(const v1::Job& job, Prepared* prepared) {
  const v1::SweepSpec& spec = job.sweep();
  if (spec.a_id().empty() || spec.b_id().empty()) {
    return absl::InvalidArgumentError("sweep needs a_id and b_id");
  }
  if (spec.steps() < 2 || spec.steps() > kMaxSweepSteps) {
    return absl::InvalidArgumentError(
        absl::StrCat("sweep.steps is ", spec.steps(), "; expected 2..",
                     kMaxSweepSteps, " (t = 0 and t = 1 included)"));
  }
  core::MergeInput a, b;
  a.label = spec.a_id();
  b.label = spec.b_id();
  a.coefficient = b.coefficient = 0.5;
  AMALGAM_ASSIGN_OR_RETURN(
      a.weights, OpenInput(job, spec.a_id(), v1::ARTIFACT_KIND_WEIGHTS,
                           "sweep.a_id", prepared));
  AMALGAM_ASSIGN_OR_RETURN(
      b.weights, OpenInput(job, spec.b_id(), v1::ARTIFACT_KIND_WEIGHTS,
                           "sweep.b_id", prepared));
  prepared->inputs = {a, b};
  prepared->options.method = core::MergeMethod::kWeighted;
  AMALGAM_ASSIGN_OR_RETURN(
      const ResultOptions output,
      PrepareOutput(spec.output(), "sweep.output", {spec.a_id(), spec.b_id()},
                    "", prepared));
  prepared->options.shard_bytes = output.shard_bytes;
  prepared->options.out_dtype = output.out_dtype;
  AMALGAM_ASSIGN_OR_RETURN(
      prepared->plan, core::PlanMerge(prepared->inputs, prepared->options));
  for (int k = 0; k < spec.steps(); ++k) {
    prepared->sweep_ts.push_back(static_cast<double>(k) / (spec.steps() - 1));
  }
  prepared->outputs = spec.steps();
  return absl::OkStatus();
}

absl::Status JobManager::PrepareMerge(const v1::Job& job, Prepared* prepared) {
  const v1::MergeSpec& spec = job.merge();
  core::MergeOptions& options = prepared->options;
  AMALGAM_ASSIGN_OR_RETURN(options.method, ToCoreMethod(spec.method()));
  if (core::IsTaskVectorMethod(options.method)) {
    // Parameters of the statistics-based methods are refused, not ignored.
    if (spec.has_alpha() || spec.has_fisher_floor() ||
        spec.gram_normalization() != v1::GRAM_NORMALIZATION_AS_UPLOADED) {
      return absl::InvalidArgumentError(
          "alpha, fisher_floor and gram_normalization are not parameters of "
          "the task-vector methods");
    }
    for (int i = 0; i < spec.models_size(); ++i) {
      if (!spec.models(i).gram_id().empty() ||
          !spec.models(i).fisher_id().empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("merge.models[", i,
                         "] has statistics; the task-vector methods use none"));
      }
    }
  }
  core::TaskVectorOptions& task = options.task;
  if (spec.has_lambda()) task.lambda = spec.lambda();
  if (spec.has_density()) task.density = spec.density();
  if (spec.has_seed()) task.seed = spec.seed();
  if (spec.has_t()) task.t = spec.t();
  task.no_normalize = spec.no_normalize();
  if (spec.rescale() != v1::DARE_RESCALE_UNSPECIFIED) {
    task.rescale = spec.rescale() == v1::DARE_RESCALE_L1
                       ? core::DareRescale::kL1
                       : core::DareRescale::kInverseDensity;
  }
  if (!spec.base_id().empty()) {
    options.base.label = spec.base_id();
    AMALGAM_ASSIGN_OR_RETURN(
        options.base.weights,
        OpenInput(job, spec.base_id(), v1::ARTIFACT_KIND_WEIGHTS,
                  "merge.base_id", prepared));
  }
  if (spec.has_alpha()) options.alpha = spec.alpha();
  switch (spec.precision()) {
    case v1::PRECISION_UNSPECIFIED:
    case v1::PRECISION_FLOAT64:
      break;
    case v1::PRECISION_FLOAT32:
      options.precision = core::RegMeanPrecision::kFloat32;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("merge.precision is ", spec.precision(),
                       "; expected PRECISION_FLOAT64 or PRECISION_FLOAT32"));
  }
  if (spec.has_fisher_floor()) options.fisher_floor = spec.fisher_floor();
  options.exclude.assign(spec.exclude().begin(), spec.exclude().end());
  if (spec.take_excluded_from() < 0 ||
      spec.take_excluded_from() > spec.models_size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("merge.take_excluded_from is ", spec.take_excluded_from(),
                     "; expected 0 (drop) or 1..", spec.models_size()));
  }
  options.take_excluded_from = spec.take_excluded_from() - 1;
  options.gram_normalization =
      spec.gram_normalization() == v1::GRAM_NORMALIZATION_MEAN
          ? core::GramNormalization::kMean
          : core::GramNormalization::kAsUploaded;
  for (int i = 0; i < spec.models_size(); ++i) {
    const v1::MergeModel& model = spec.models(i);
    if (model.weights_id().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("merge.models[", i, "].weights_id is empty"));
    }
    const std::string field = absl::StrCat("merge.models[", i, "].");
    core::MergeInput input;
    input.label = model.weights_id();
    input.coefficient = model.coefficient();
    input.density = model.density();
    AMALGAM_ASSIGN_OR_RETURN(
        input.weights,
        OpenInput(job, model.weights_id(), v1::ARTIFACT_KIND_WEIGHTS,
                  field + "weights_id", prepared));
    AMALGAM_ASSIGN_OR_RETURN(
        input.gram, OpenInput(job, model.gram_id(), v1::ARTIFACT_KIND_GRAM,
                              field + "gram_id", prepared));
    if (input.gram != nullptr) {
      const auto& identical =
          prepared->artifacts.at(model.gram_id()).identical_tensors();
      input.gram_identical.insert(identical.begin(), identical.end());
    }
    AMALGAM_ASSIGN_OR_RETURN(
        input.fisher,
        OpenInput(job, model.fisher_id(), v1::ARTIFACT_KIND_FISHER,
                  field + "fisher_id", prepared));
    prepared->inputs.push_back(std::move(input));
  }
  std::vector<std::string> models;
  for (const v1::MergeModel& model : spec.models()) {
    models.push_back(model.weights_id());
  }
  AMALGAM_ASSIGN_OR_RETURN(const ResultOptions output,
                           PrepareOutput(spec.output(), "merge.output", models,
                                         spec.base_id(), prepared));
  options.shard_bytes = output.shard_bytes;
  options.out_dtype = output.out_dtype;
  AMALGAM_ASSIGN_OR_RETURN(prepared->plan,
                           core::PlanMerge(prepared->inputs, options));
  return absl::OkStatus();
}

absl::StatusOr<ResultOptions> JobManager::PrepareOutput(
    const v1::OutputOptions& output, const std::string& field,
    const std::vector<std::string>& inputs, const std::string& fallback,
    Prepared* prepared) {
  AMALGAM_ASSIGN_OR_RETURN(const ResultOptions options,
                           ParseResultOptions(output, field));
  AMALGAM_ASSIGN_OR_RETURN(
      const std::string source,
      ConfigSource(
          output, field, inputs,
          fallback.empty() && !inputs.empty() ? inputs.front() : fallback));
  auto found = prepared->artifacts.find(source);
  if (found != prepared->artifacts.end()) prepared->config_from = found->second;
  return options;
}

absl::Status JobManager::ResolveLinkedStatistics(const std::string& owner,
                                                 v1::MergeSpec* spec) {
  const bool regmean = spec->method() == v1::MERGE_METHOD_REGMEAN;
  if (!regmean && spec->method() != v1::MERGE_METHOD_FISHER) {
    return absl::OkStatus();
  }
  const v1::ArtifactKind kind =
      regmean ? v1::ARTIFACT_KIND_GRAM : v1::ARTIFACT_KIND_FISHER;
  const char* field = regmean ? "gram_id" : "fisher_id";
  bool unnamed = false;
  for (const v1::MergeModel& model : spec->models()) {
    unnamed =
        unnamed || (regmean ? model.gram_id() : model.fisher_id()).empty();
  }
  if (!unnamed) return absl::OkStatus();
  AMALGAM_ASSIGN_OR_RETURN(std::vector<v1::Artifact> visible,
                           storage_->ListArtifacts(owner));
  for (int i = 0; i < spec->models_size(); ++i) {
    v1::MergeModel* model = spec->mutable_models(i);
    std::string* id =
        regmean ? model->mutable_gram_id() : model->mutable_fisher_id();
    if (!id->empty()) continue;  // explicit ids win
    std::vector<std::string> linked;
    for (const v1::Artifact& artifact : visible) {
      if (artifact.kind() == kind &&
          artifact.describes() == model->weights_id()) {
        linked.push_back(artifact.id());
      }
    }
    if (linked.size() > 1) {
      return absl::FailedPreconditionError(absl::StrCat(
          "model ", model->weights_id(), " has ", linked.size(), " ",
          regmean ? "Gram" : "Fisher", " artifacts uploaded for it (",
          absl::StrJoin(linked, ", "), "); name one in merge.models[", i, "].",
          field));
    }
    if (linked.size() == 1) *id = linked[0];
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Job> JobManager::Submit(const v1::SubmitJobRequest& request,
                                           const std::string& owner) {
  v1::Job job;
  job.set_id(NewId("job"));
  job.set_owner(owner);
  job.set_state(v1::JOB_STATE_QUEUED);
  job.set_created_at(Now());
  switch (request.spec_case()) {
    case v1::SubmitJobRequest::kMerge:
      *job.mutable_merge() = request.merge();
      break;
    case v1::SubmitJobRequest::kGrow:
      *job.mutable_grow() = request.grow();
      break;
    case v1::SubmitJobRequest::kSweep:
      *job.mutable_sweep() = request.sweep();
      break;
    default:
      return absl::InvalidArgumentError(
          "SubmitJobRequest needs a merge, grow or sweep spec");
  }
  const std::string& result_name = job.has_merge()  ? job.merge().result_name()
                                   : job.has_grow() ? job.grow().result_name()
                                                    : job.sweep().result_name();
  AMALGAM_RETURN_IF_ERROR(ValidateName(result_name, "result_name"));
  if (job.has_merge() &&
      job.merge().models_size() > options_.max_models_per_job) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the merge names ", job.merge().models_size(),
        " models; this server merges at most ", options_.max_models_per_job,
        " in one job (--max-models-per-job)"));
  }
  if (job.has_merge()) {
    // Recorded in the job: the statistics it reads are its inputs.
    AMALGAM_RETURN_IF_ERROR(
        ResolveLinkedStatistics(owner, job.mutable_merge()));
  }
  AMALGAM_ASSIGN_OR_RETURN(std::unique_ptr<Prepared> prepared, Prepare(job));
  job.mutable_progress()->set_tensors_total(prepared->tensors_per_output *
                                            prepared->outputs);
  job.mutable_progress()->set_bytes_total(
      static_cast<int64_t>(prepared->bytes_per_output) * prepared->outputs);
  job.set_report_json(prepared->grow_plan.report_json);
  if (prepared->bytes_per_output >
      static_cast<uint64_t>(options_.max_output_bytes)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the job's result would be ", prepared->bytes_per_output,
        " bytes; this server writes at most ", options_.max_output_bytes,
        " bytes per artifact (--max-upload-bytes)"));
  }
  const int64_t output_bytes = job.progress().bytes_total();
  const std::string what =
      absl::StrCat("a job writing ", output_bytes, " bytes");
  AMALGAM_RETURN_IF_ERROR(CheckFreeSpace(storage_->data_dir(), output_bytes,
                                         options_.disk_reserve_bytes, what));
  if (options_.quota_bytes_per_org > 0) {
    AMALGAM_ASSIGN_OR_RETURN(const int64_t stored, storage_->OrgBytes(owner));
    AMALGAM_ASSIGN_OR_RETURN(const int64_t pending,
                             catalog()->PendingOutputBytes(owner));
    AMALGAM_RETURN_IF_ERROR(CheckQuota(owner, stored + pending, output_bytes,
                                       options_.quota_bytes_per_org, what));
  }
  {
    absl::MutexLock lock(&mu_);
    if (draining_) {
      return absl::UnavailableError(
          "the server is shutting down; submit the job again when it is "
          "back");
    }
  }
  JobLimits limits;
  limits.max_queued = options_.max_queued;
  limits.max_active_per_org = options_.max_active_per_org;
  // A colliding id is never overwritten: another is drawn.
  absl::Status inserted;
  while (absl::IsAlreadyExists(
      inserted = catalog()->SubmitJob(job, JobInputs(job), limits))) {
    job.set_id(NewId("job"));
  }
  AMALGAM_RETURN_IF_ERROR(inserted);
  Log(LogLevel::kInfo, LogFields("job_state")
                           .Add("job", job.id())
                           .Add("owner", owner)
                           .Add("state", "JOB_STATE_QUEUED"));
  absl::MutexLock lock(&mu_);
  wake_ = true;
  return job;
}

absl::StatusOr<v1::Job> JobManager::Get(const std::string& id,
                                        const std::string& organization) {
  // The catalog first: once it says a job ended, nothing here says
  // otherwise (its results are listed from that moment).
  AMALGAM_ASSIGN_OR_RETURN(v1::Job job, catalog()->GetJob(id));
  if (job.owner() != organization) {
    return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  }
  absl::MutexLock lock(&mu_);
  auto it = running_.find(id);
  if (job.state() == v1::JOB_STATE_RUNNING && it != running_.end()) {
    return it->second->job;  // fresher progress than the catalog's
  }
  return job;
}

absl::Status JobManager::DeleteIfUnused(const v1::Artifact& artifact) {
  // The catalog refuses it while a queued or running job reads it, in the
  // transaction that deletes it, so a submission either comes before (and
  // the delete is refused) or sees the artifact gone.
  return storage_->DeleteArtifact(artifact);
}

std::vector<v1::Job> JobManager::List(const std::string& organization) {
  absl::StatusOr<std::vector<v1::Job>> jobs = catalog()->ListJobs(organization);
  if (!jobs.ok()) {
    Log(LogLevel::kError,
        LogFields("list_jobs_failed").Add("error", jobs.status().message()));
    return {};
  }
  absl::MutexLock lock(&mu_);
  for (v1::Job& job : *jobs) {
    auto it = running_.find(job.id());
    if (job.state() == v1::JOB_STATE_RUNNING && it != running_.end()) {
      job = it->second->job;
    }
  }
  return *std::move(jobs);
}

absl::StatusOr<v1::Job> JobManager::Cancel(const std::string& id,
                                           const std::string& organization) {
  AMALGAM_ASSIGN_OR_RETURN(v1::Job job, catalog()->CancelJob(id, organization));
  absl::MutexLock lock(&mu_);
  // Its tasks run here stop now; elsewhere at their next renewal.
  CancelTasksOf(id);
  auto it = running_.find(id);
  if (it != running_.end()) {
    // Run here: it stops now. Run elsewhere: at its runner's next renewal.
    it->second->user_cancelled = true;
    it->second->cancelled = true;
    return it->second->job;
  }
  if (job.state() == v1::JOB_STATE_RUNNING &&
      job.runner() == options_.replica_name) {
    // Claimed here, its run not registered yet: it stops once it is.
    cancelled_here_.insert(id);
    return job;
  }
  if (job.state() == v1::JOB_STATE_CANCELLED) {
    Log(LogLevel::kInfo, LogFields("job_state")
                             .Add("job", id)
                             .Add("owner", organization)
                             .Add("state", "JOB_STATE_CANCELLED"));
    Notify(job);
  }
  return job;
}

absl::StatusOr<uint64_t> JobManager::Watch(const std::string& id,
                                           const std::string& organization,
                                           Listener listener) {
  AMALGAM_ASSIGN_OR_RETURN(v1::Job job, Get(id, organization));
  absl::MutexLock lock(&mu_);
  auto it = running_.find(id);
  if (it != running_.end()) job = it->second->job;
  const uint64_t token = next_token_++;
  listener(job);
  watchers_[id].emplace(token, std::move(listener));
  announced_[id] = job.SerializeAsString();
  return token;
}

void JobManager::Unwatch(const std::string& id, uint64_t token) {
  absl::MutexLock lock(&mu_);
  auto it = watchers_.find(id);
  if (it == watchers_.end()) return;
  it->second.erase(token);
  if (it->second.empty()) {
    watchers_.erase(it);
    announced_.erase(id);
  }
}

void JobManager::Notify(const v1::Job& job) {
  auto it = watchers_.find(job.id());
  if (it == watchers_.end()) return;
  announced_[job.id()] = job.SerializeAsString();
  for (auto& [token, listener] : it->second) listener(job);
}

bool JobManager::LostIf(Running* run, const absl::Status& status) {
  if (!absl::IsFailedPrecondition(status)) return false;
  run->lost = true;
  run->cancelled = true;
  Log(LogLevel::kWarning, LogFields("job_lost")
                              .Add("job", run->job.id())
                              .Add("attempt", run->job.attempt())
                              .Add("error", status.message()));
  return true;
}

void JobManager::ListenLoop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
    }
    // Bounded, so that a stop is seen.
    absl::StatusOr<std::vector<std::string>> changed =
        options_.job_changes->Wait(absl::Milliseconds(500));
    listening_ = changed.ok();
    if (!changed.ok() || changed->empty()) continue;
    std::vector<std::string> remote;
    {
      absl::MutexLock lock(&mu_);
      wake_ = true;
      for (const std::string& id : *changed) {
        if (watchers_.count(id) > 0 && running_.count(id) == 0 &&
            std::find(remote.begin(), remote.end(), id) == remote.end()) {
          remote.push_back(id);
        }
      }
    }
    ReadRemote(remote);
  }
}

void JobManager::ReadRemote(const std::vector<std::string>& ids) {
  for (const std::string& id : ids) {
    absl::StatusOr<v1::Job> job = catalog()->GetJob(id);
    if (!job.ok()) continue;
    absl::MutexLock lock(&mu_);
    auto seen = announced_.find(id);
    if (running_.count(id) == 0 && seen != announced_.end() &&
        seen->second != job->SerializeAsString()) {
      Notify(*job);
    }
  }
}

void JobManager::HeartbeatLoop() {
  const absl::Duration renew_every = options_.job_lease / 3;
  absl::Time polled = absl::InfinitePast();
  while (true) {
    std::vector<std::pair<Running*, v1::Job>> renew;
    std::vector<std::pair<TaskRun*, JobTask>> renew_tasks;
    std::vector<std::string> with_tasks;
    std::vector<std::string> remote;
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(&stopping_), options_.poll_interval);
      if (stopping_) return;
      const absl::Time now = absl::Now();
      for (auto& [id, run] : running_) {
        if (now - run->renewed >= renew_every) {
          run->renewed = now;
          renew.emplace_back(run.get(), run->job);
        }
        if (run->from_tasks) with_tasks.push_back(id);
      }
      for (TaskRun* task : task_runs_) {
        if (now - task->renewed >= renew_every) {
          task->renewed = now;
          renew_tasks.emplace_back(task, task->task);
        }
      }
      // Polled as well while listening (a notification can be missed
      // across a reconnection), but seldom.
      if (!listening_ || now - polled >= options_.poll_interval * 10) {
        polled = now;
        for (const auto& [id, listeners] : watchers_) {
          if (running_.count(id) == 0) remote.push_back(id);
        }
      }
    }
    // Runs end only under the lock and only once their worker is done with
    // them; a run being renewed here is still in running_ (the worker waits
    // for no heartbeat, but erases under the lock after its last write,
    // and the pointer is checked again below).
    for (auto& [run, job] : renew) {
      absl::StatusOr<bool> cancel =
          catalog()->RenewLease(job, options_.job_lease);
      absl::MutexLock lock(&mu_);
      auto it = running_.find(job.id());
      if (it == running_.end() || it->second.get() != run) continue;
      if (!cancel.ok()) {
        LostIf(run, cancel.status());
      } else if (*cancel) {
        run->user_cancelled = true;
        run->cancelled = true;
        CancelTasksOf(job.id());
      }
    }
    for (auto& [task, claim] : renew_tasks) {
      absl::StatusOr<bool> stop =
          catalog()->RenewTask(claim, options_.job_lease);
      absl::MutexLock lock(&mu_);
      // The same run still (a worker's next task may have its address).
      if (task_runs_.count(task) == 0 || task->task.job_id != claim.job_id ||
          task->task.task != claim.task ||
          task->task.attempt != claim.attempt) {
        continue;
      }
      if (!stop.ok() && absl::IsFailedPrecondition(stop.status())) {
        task->lost = true;
        task->cancelled = true;
      } else if (stop.ok() && *stop) {
        task->cancelled = true;
      }
    }
    for (const std::string& id : with_tasks) RefreshProgress(id);
    ReadRemote(remote);
  }
}

void JobManager::CancelTasksOf(const std::string& job_id) {
  for (TaskRun* task : task_runs_) {
    if (task->task.job_id == job_id) task->cancelled = true;
  }
}

void JobManager::WorkerLoop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(
          absl::Condition(
              +[](JobManager* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->mu_) {
                return self->stopping_ || (!self->draining_ && self->wake_);
              },
              this),
          options_.poll_interval);
      if (stopping_) return;
      if (draining_) continue;
      wake_ = false;
    }
    // A task of a running job (of any process) comes before a new job.
    if (RunATask("", nullptr)) continue;
    absl::StatusOr<std::optional<v1::Job>> claimed =
        catalog()->ClaimJob(options_.replica_name, options_.numeric_config,
                            options_.job_lease, options_.max_attempts);
    if (!claimed.ok()) {
      Log(LogLevel::kWarning,
          LogFields("claim_failed").Add("error", claimed.status().message()));
      continue;
    }
    if (!claimed->has_value()) continue;
    auto run = std::make_unique<Running>();
    run->job = **claimed;
    Running* const raw = run.get();
    bool give_back = false;
    {
      absl::MutexLock lock(&mu_);
      // Several jobs may be waiting: the next worker looks at once.
      wake_ = true;
      give_back = stopping_ || draining_;
      if (!give_back) {
        if (cancelled_here_.erase(raw->job.id()) > 0) {
          raw->user_cancelled = true;
          raw->cancelled = true;
        }
        running_[raw->job.id()] = std::move(run);
        Notify(raw->job);
      }
    }
    if (give_back) {
      catalog()->ReleaseRun(raw->job).IgnoreError();
      continue;
    }
    Log(LogLevel::kInfo, LogFields("job_state")
                             .Add("job", raw->job.id())
                             .Add("owner", raw->job.owner())
                             .Add("state", "JOB_STATE_RUNNING")
                             .Add("attempt", raw->job.attempt())
                             .Add("runner", raw->job.runner()));
    RunClaimed(raw);
  }
}

void JobManager::RunClaimed(Running* run) {
  const absl::Time start = absl::Now();
  Outputs outputs;
  absl::Status status = RunJob(run, &outputs);
  v1::Job job;
  {
    absl::MutexLock lock(&mu_);
    job = run->job;
  }
  absl::StatusOr<v1::Job> published;
  if (status.ok() && !run->lost) {
    // The results and SUCCEEDED become visible in one transaction, fenced
    // by the run's attempt.
    v1::Job done = job;
    done.set_state(v1::JOB_STATE_SUCCEEDED);
    done.set_finished_at(Now());
    // A copy: what the transaction does not move into the blob store is
    // removed with `outputs`.
    published = storage_->PublishResults(done, outputs.files);
    status = published.status();
    if (LostIf(run, status)) published = status;
  }
  const bool shutdown = !run->user_cancelled && !run->lost &&
                        status.code() == absl::StatusCode::kCancelled;
  bool stopping = false;
  {
    absl::MutexLock lock(&mu_);
    stopping = stopping_;
  }
  if (run->lost) {
    // Another process holds the job: nothing of this run is written.
  } else if (stopping && shutdown) {
    // Interrupted by shutdown: given back, so that another process (or
    // this one, restarted) runs it at once.
    catalog()->ReleaseRun(job).IgnoreError();
  } else if (published.ok()) {
    job = *published;
  } else {
    job.set_finished_at(Now());
    if (status.code() == absl::StatusCode::kCancelled) {
      job.set_state(v1::JOB_STATE_CANCELLED);
    } else {
      job.set_state(v1::JOB_STATE_FAILED);
      job.set_error_code(static_cast<int>(status.code()));
      job.set_error_message(PublicMessage(status.message()));
    }
    LostIf(run, catalog()->UpdateRun(job));
  }
  const bool ended = !run->lost && IsFinal(job.state());
  if (ended) {
    LogFields fields("job_state");
    fields.Add("job", job.id())
        .Add("owner", job.owner())
        .Add("state", v1::JobState_Name(job.state()));
    if (!job.error_message().empty()) fields.Add("error", job.error_message());
    Log(LogLevel::kInfo, fields);
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  absl::MutexLock lock(&mu_);
  running_.erase(job.id());  // `run` is gone from here on
  if (!ended) return;
  Notify(job);
  if (options_.metrics != nullptr) {
    uint64_t output_bytes = 0;
    if (status.ok()) output_bytes = job.progress().bytes_total();
    options_.metrics->JobFinished(
        JobKind(job),
        job.has_merge()
            ? absl::AsciiStrToLower(absl::StripPrefix(
                  v1::MergeMethod_Name(job.merge().method()), "MERGE_METHOD_"))
            : "-",
        absl::AsciiStrToLower(
            absl::StripPrefix(v1::JobState_Name(job.state()), "JOB_STATE_")),
        seconds, output_bytes);
  }
}

absl::StatusOr<int64_t> JobManager::PendingOutputBytes(
    const std::string& owner) const {
  return catalog()->PendingOutputBytes(owner);
}

void JobManager::Drain(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  draining_ = true;
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return running_.empty() && task_runs_.empty();
  };
  mu_.AwaitWithTimeout(absl::Condition(&idle), timeout);
}

std::pair<int64_t, int64_t> JobManager::Counts() {
  absl::StatusOr<std::pair<int64_t, int64_t>> counts = catalog()->JobCounts();
  return counts.ok() ? *counts : std::make_pair(int64_t{0}, int64_t{0});
}

JobManager::Outputs::~Outputs() {
  std::error_code ignored;
  for (const std::string& dir : dirs) std::filesystem::remove_all(dir, ignored);
}

absl::Status JobManager::RunJob(Running* run, Outputs* outputs) {
  v1::Job job;
  {
    absl::MutexLock lock(&mu_);
    job = run->job;
  }
  // Inputs are opened again here rather than kept open from submission, so
  // queued jobs hold no file descriptors or mappings.
  AMALGAM_ASSIGN_OR_RETURN(std::unique_ptr<Prepared> prepared, Prepare(job));
  const std::vector<core::TensorSpec> specs = OutputSpecs(*prepared);
  const uint64_t shard_bytes = ShardBytes(*prepared);
  const int shards = core::CountShards(specs, shard_bytes);
  const int count = shards * prepared->outputs;
  // Tasks done by an earlier run of the job stay done (where it planned the
  // same shards).
  absl::Status added = catalog()->AddTasks(
      job, count, absl::StrCat(count, " x ", shard_bytes, " bytes"));
  LostIf(run, added);
  AMALGAM_RETURN_IF_ERROR(added);
  {
    absl::MutexLock lock(&mu_);
    run->from_tasks = true;
    wake_ = true;  // idle workers here take tasks too
  }
  std::vector<JobTask> tasks;
  while (true) {
    if (run->cancelled) {
      return absl::CancelledError(
          absl::StrCat("job ", job.id(),
                       " stopped before its shards were "
                       "written"));
    }
    // Its tasks are run here too, with the inputs already open.
    if (RunATask(job.id(), prepared.get())) continue;
    AMALGAM_ASSIGN_OR_RETURN(tasks, catalog()->ListTasks(job.id()));
    int done = 0;
    for (const JobTask& task : tasks) {
      if (task.error_code != 0) {
        return absl::Status(static_cast<absl::StatusCode>(task.error_code),
                            task.error_message);
      }
      if (task.done) {
        ++done;
      } else if (task.stops + (task.runner.empty() ? 0 : 1) >=
                     options_.max_attempts &&
                 task.lease_until_ms < absl::ToUnixMillis(absl::Now())) {
        return absl::AbortedError(
            absl::StrCat("the runners of shard ", task.task,
                         " stopped (killed, or cut off from the catalog) ",
                         options_.max_attempts,
                         " times; it is not tried again (--max-attempts)"));
      }
    }
    if (done == count && static_cast<int>(tasks.size()) == count) break;
    absl::MutexLock lock(&mu_);
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), options_.poll_interval);
  }
  {
    // Every shard is written: the job's progress is whole (and no longer
    // read from the tasks).
    absl::MutexLock lock(&mu_);
    run->from_tasks = false;
    v1::Progress* p = run->job.mutable_progress();
    p->set_tensors_done(p->tensors_total());
    p->set_bytes_done(p->bytes_total());
    Notify(run->job);
  }
  // Each output model: its shards' blobs, linked into a directory (removed
  // with `outputs`), with its index and side files.
  for (int k = 0; k < prepared->outputs; ++k) {
    const std::string dir = storage_->NewTempPath("result");
    outputs->dirs.push_back(dir);
    std::error_code error;
    std::filesystem::create_directories(dir, error);
    if (error) {
      return absl::InternalError(
          absl::StrCat("cannot create ", dir, ": ", error.message()));
    }
    for (int shard = 0; shard < shards; ++shard) {
      const std::string name = shards == 1 ? std::string(core::kSingleFileName)
                                           : core::ShardFileName(shard, shards);
      AMALGAM_RETURN_IF_ERROR(storage_->LinkBlob(
          tasks[k * shards + shard].sha256, absl::StrCat(dir, "/", name)));
    }
    AMALGAM_RETURN_IF_ERROR(core::WriteModelIndex(dir, specs, shard_bytes));
    AMALGAM_ASSIGN_OR_RETURN(
        Storage::StagedArtifact staged,
        StageResult(*storage_, job, dir, ResultName(job, *prepared, k),
                    prepared->config_from, prepared->config_keys));
    outputs->files.push_back(std::move(staged));
  }
  return absl::OkStatus();
}

void JobManager::RefreshProgress(const std::string& job_id) {
  absl::StatusOr<std::vector<JobTask>> tasks = catalog()->ListTasks(job_id);
  if (!tasks.ok()) return;
  int64_t tensors = 0, bytes = 0;
  for (const JobTask& task : *tasks) {
    tensors += task.tensors_done;
    bytes += task.bytes_done;
  }
  std::optional<v1::Job> persist;
  Running* run = nullptr;
  {
    absl::MutexLock lock(&mu_);
    auto it = running_.find(job_id);
    if (it == running_.end() || !it->second->from_tasks) return;
    run = it->second.get();
    v1::Progress* p = run->job.mutable_progress();
    if (p->tensors_done() == tensors && p->bytes_done() == bytes) return;
    p->set_tensors_done(tensors);
    p->set_bytes_done(bytes);
    Notify(run->job);
    // The catalog (for watchers elsewhere) at most four times a second.
    if (absl::Now() - run->persisted >= absl::Milliseconds(250)) {
      run->persisted = absl::Now();
      persist = run->job;
    }
  }
  if (!persist.has_value()) return;
  const absl::Status written = catalog()->UpdateRun(*persist);
  absl::MutexLock lock(&mu_);
  // The run may have ended meanwhile (and its job been written final).
  auto it = running_.find(job_id);
  if (it != running_.end() && it->second.get() == run) LostIf(run, written);
}

bool JobManager::RunATask(const std::string& job_id, const Prepared* prepared) {
  v1::Job job;
  absl::StatusOr<std::optional<JobTask>> claimed = catalog()->ClaimTask(
      options_.replica_name, options_.numeric_config, job_id,
      options_.job_lease, options_.max_attempts, &job);
  if (!claimed.ok()) {
    Log(LogLevel::kWarning,
        LogFields("claim_failed").Add("error", claimed.status().message()));
    return false;
  }
  if (!claimed->has_value()) return false;
  TaskRun run;
  run.task = **claimed;
  run.job = std::move(job);
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) run.cancelled = true;
    task_runs_.insert(&run);
    wake_ = true;  // more tasks may wait: the next worker looks at once
  }
  RunTask(&run, prepared);
  absl::MutexLock lock(&mu_);
  task_runs_.erase(&run);
  return true;
}

void JobManager::RunTask(TaskRun* run, const Prepared* prepared) {
  std::unique_ptr<Prepared> own;
  absl::Status status;
  if (prepared == nullptr) {
    absl::StatusOr<std::unique_ptr<Prepared>> opened = Prepare(run->job);
    status = opened.status();
    if (opened.ok()) {
      own = *std::move(opened);
      prepared = own.get();
    }
  }
  const std::string dir = storage_->NewTempPath("shard");
  if (status.ok()) {
    const int shards =
        core::CountShards(OutputSpecs(*prepared), ShardBytes(*prepared));
    auto report = [&](int64_t done, int64_t bytes_done) {
      std::optional<JobTask> persist;
      {
        absl::MutexLock lock(&mu_);
        run->task.tensors_done = done;
        run->task.bytes_done = bytes_done;
        // In the catalog (for its job's progress) at most four times a
        // second.
        if (absl::Now() - run->persisted >= absl::Milliseconds(250)) {
          run->persisted = absl::Now();
          persist = run->task;
        }
      }
      if (persist.has_value() &&
          absl::IsFailedPrecondition(catalog()->UpdateTask(*persist))) {
        run->lost = true;
        run->cancelled = true;
      }
      if (options_.testing_step_delay > absl::ZeroDuration()) {
        absl::SleepFor(options_.testing_step_delay);
      }
    };
    status = WriteShard(*prepared, run->job, run->task.task / shards,
                        run->task.task % shards, dir, report, &run->cancelled);
  }
  JobTask task;
  {
    absl::MutexLock lock(&mu_);
    task = run->task;
  }
  if (status.ok() && !run->lost) {
    // The one file the shard's writer made.
    std::string path;
    std::error_code error;
    for (std::filesystem::directory_iterator it(dir, error), end;
         !error && it != end; it.increment(error)) {
      path = it->path().string();
    }
    status = error ? absl::InternalError(absl::StrCat("cannot list ", dir, ": ",
                                                      error.message()))
                   : storage_->CompleteTask(task, path);
    if (absl::IsFailedPrecondition(status)) run->lost = true;  // fenced out
    if (status.ok()) {
      Log(LogLevel::kInfo, LogFields("task_done")
                               .Add("job", task.job_id)
                               .Add("task", task.task)
                               .Add("attempt", task.attempt)
                               .Add("runner", task.runner));
    }
  }
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
  bool stopping = false;
  {
    absl::MutexLock lock(&mu_);
    stopping = stopping_;
  }
  if (status.ok() || run->lost) return;
  if (run->cancelled || absl::IsUnavailable(status)) {
    // Stopped by shutdown, or cut off from the catalog: given back, so that
    // another worker takes it at once (a cancelled job drops its tasks
    // itself).
    if (stopping || absl::IsUnavailable(status)) {
      catalog()->ReleaseTask(task).IgnoreError();
    }
    return;
  }
  // The job fails with it (its runner reads the tasks).
  task.error_code = static_cast<int>(status.code());
  task.error_message = PublicMessage(status.message());
  catalog()->UpdateTask(task).IgnoreError();
}

std::vector<core::TensorSpec> JobManager::OutputSpecs(
    const Prepared& prepared) {
  return prepared.grow_a != nullptr ? core::TensorSpecs(prepared.grow_plan)
                                    : core::TensorSpecs(prepared.plan);
}

uint64_t JobManager::ShardBytes(const Prepared& prepared) {
  return prepared.grow_a != nullptr ? prepared.grow_options.shard_bytes
                                    : prepared.options.shard_bytes;
}

std::string JobManager::ResultName(const v1::Job& job, const Prepared& prepared,
                                   int output) {
  if (job.has_sweep()) {
    return absl::StrCat(
        job.sweep().result_name().empty() ? absl::StrCat("sweep-", job.id())
                                          : job.sweep().result_name(),
        "-t", absl::StrFormat("%.4f", prepared.sweep_ts[output]));
  }
  if (job.has_grow()) {
    return job.grow().result_name().empty() ? absl::StrCat("grow-", job.id())
                                            : job.grow().result_name();
  }
  return job.merge().result_name().empty() ? absl::StrCat("merge-", job.id())
                                           : job.merge().result_name();
}

absl::Status JobManager::WriteShard(
    const Prepared& prepared, const v1::Job& job, int output, int shard,
    const std::string& dir, const std::function<void(int64_t, int64_t)>& report,
    const std::atomic<bool>* cancelled) {
  if (job.has_sweep()) {
    return WriteSweepStep(prepared, prepared.sweep_ts[output], shard, dir,
                          report, cancelled);
  }
  if (job.has_grow()) {
    core::GrowOptions options = prepared.grow_options;
    options.shard = shard;
    // The bytes of the shard's tensors, in order.
    std::vector<uint64_t> sizes;
    for (const size_t i : core::ShardTensors(OutputSpecs(prepared),
                                             options.shard_bytes, shard)) {
      sizes.push_back(prepared.grow_plan.tensors[i].out_nbytes);
    }
    int64_t counted = 0;
    uint64_t bytes_done = 0;
    return core::ExecuteGrow(
        prepared.grow_plan, *prepared.grow_a, prepared.grow_b, options, dir,
        [&](int64_t done, int64_t) {
          while (counted < done) bytes_done += sizes[counted++];
          report(done, static_cast<int64_t>(bytes_done));
        },
        cancelled);
  }
  core::MergeOptions options = prepared.options;
  options.shard = shard;
  return core::ExecuteMerge(
      prepared.plan, prepared.inputs, options, dir,
      [&](const core::MergeProgress& progress) {
        report(progress.tensors_done,
               static_cast<int64_t>(progress.bytes_done));
      },
      cancelled);
}

absl::Status JobManager::WriteSweepStep(
    const Prepared& prepared, double t, int shard, const std::string& out_path,
    const std::function<void(int64_t, int64_t)>& progress,
    const std::atomic<bool>* cancelled) {
  std::vector<core::MergeInput> inputs = prepared.inputs;
  inputs[0].coefficient = 1.0 - t;
  inputs[1].coefficient = t;
  core::MergeOptions options = prepared.options;
  options.shard = shard;
  AMALGAM_ASSIGN_OR_RETURN(core::MergePlan plan,
                           core::PlanMerge(inputs, options));
  if (t == 0.0 || t == 1.0) {
    // The endpoints are A's and B's tensors, bit for bit (the arithmetic
    // would turn -0 into +0).
    for (core::PlannedTensor& tensor : plan.tensors) {
      tensor.rule = core::TensorRule::kCopy;
      tensor.copy_from = t == 0.0 ? 0 : 1;
    }
  }
  return core::ExecuteMerge(
      plan, inputs, options, out_path,
      [&](const core::MergeProgress& p) {
        progress(p.tensors_done, static_cast<int64_t>(p.bytes_done));
      },
      cancelled);
}

void JobManager::DiscardResults(const std::string& job_id) {
  // Listed before the job is read: a result that a run elsewhere published
  // meanwhile (having taken the requeued job over) is either not listed, or
  // one of the job's results.
  absl::StatusOr<std::vector<v1::Artifact>> artifacts =
      storage_->ListArtifacts();
  if (!artifacts.ok()) return;
  absl::StatusOr<v1::Job> job = catalog()->GetJob(job_id);
  if (!job.ok()) return;
  const std::set<std::string> results(job->result_ids().begin(),
                                      job->result_ids().end());
  for (const v1::Artifact& artifact : *artifacts) {
    if (artifact.produced_by_job() == job_id &&
        results.count(artifact.id()) == 0) {
      // Not while another job reads it (then it stays, as a stray result).
      DeleteIfUnused(artifact).IgnoreError();
    }
  }
}

}  // namespace amalgam::server
