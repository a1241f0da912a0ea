#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/dtype.h"
#include "core/model_writer.h"
#include "core/safetensors.h"
#include "core/task_vectors.h"

namespace amalgam::core {

enum class MergeMethod {
  kAverage,
  kWeighted,
  kFisher,
  kRegMean,
  // The task-vector family (core/task_vectors.h), relative to a base model.
  kTaskArithmetic,
  kTies,
  kDareLinear,
  kDareTies,
  kSlerp,
  kModelStock,
};

// Whether `method` merges task vectors (differences to a base model).
bool IsTaskVectorMethod(MergeMethod method);

// How Gram matrices enter a RegMean merge.
enum class GramNormalization {
  // As uploaded; the Grams must all be `sum` or all `mean`.
  kAsUploaded,
  // Each `sum` Gram is divided by its `num_examples`.
  kMean,
};

// One model of a merge. The readers are owned by the caller and must outlive
// the plan and its execution.
struct MergeInput {
  const SafetensorsReader* weights = nullptr;
  // Required for kRegMean: per-linear-weight Gram matrices (with their
  // aliases, see core/statistics.h).
  const SafetensorsReader* gram = nullptr;
  // Gram tensors whose bytes equal another's (found at upload, see
  // IdenticalTensors): name -> the tensor it equals. Weights whose Grams are
  // the same tensor in every model share one factorisation.
  std::map<std::string, std::string> gram_identical;
  // Required for kFisher: diagonal Fisher, same names and shapes as weights.
  const SafetensorsReader* fisher = nullptr;
  // Relative weight (>= 0); all zero means equal weights. Normalised to sum 1
  // (task-vector methods: used as given, 0 meaning 1).
  double coefficient = 0.0;
  // TIES and DARE: this model's density in (0, 1]; 0 means the merge's.
  double density = 0.0;
  // How error messages name this model (an artifact id, a file name).
  std::string label;
};

// How RegMean computes.
enum class RegMeanPrecision {
  // Precise: the sums, factorisation and solve in float64 (regmean_solve
  // says how the system is solved).
  kFloat64,
  // Fast: all in float32, with each weight's output error estimated in
  // float64; a weight whose estimate is over fast_output_tolerance (or whose
  // float32 factorisation fails) is redone in float64.
  kFloat32,
};

// The precise mode's solve. The sums are formed in float64 either way.
enum class RegMeanSolve {
  kAuto,     // float32 on CUDA, float64 on the CPU
  kFloat32,  // float32 Cholesky refined in float64; float64 when it does not
             // converge (ill-conditioned)
  kFloat64,  // float64 Cholesky, then LU
};

// Parameters of the task-vector methods; unset ones take their defaults,
// and a set one that the method does not use is refused.
struct TaskVectorOptions {
  std::optional<double> lambda;        // scale of the merged task vector; 1
  std::optional<double> density;       // ties, dare_*: in (0, 1]; 0.2
  std::optional<uint64_t> seed;        // dare_*: 0
  std::optional<double> t;             // slerp (required): in [0, 1]
  bool no_normalize = false;           // ties, dare_ties: no disjoint mean
  std::optional<DareRescale> rescale;  // dare_*: inverse density
};

struct MergeOptions {
  MergeMethod method = MergeMethod::kAverage;
  // The base model of the task-vector methods (required, except for slerp of
  // two models); its `weights` and `label` are used.
  MergeInput base;
  TaskVectorOptions task;
  // RegMean non-diagonal scaling in [0, 1].
  double alpha = 0.9;
  // RE2 full-match patterns of tensor names left out of the merge.
  std::vector<std::string> exclude;
  // Index of the model excluded tensors are copied from; -1 drops them.
  int take_excluded_from = -1;
  GramNormalization gram_normalization = GramNormalization::kAsUploaded;
  // Fisher: where sum c_i F_i < fisher_floor * max(sum c_i F_i), the weighted
  // average is used instead.
  double fisher_floor = 1e-12;
  // "cpu", "cuda", "cuda:N" or "auto".
  std::string device = "cpu";
  RegMeanPrecision precision = RegMeanPrecision::kFloat64;
  // The largest output error (||(W - W*) L||_F / ||W* L||_F on the pooled
  // inputs, sum G~ = L L^T, W* the exact solution) the fast mode keeps.
  double fast_output_tolerance = 1e-5;
  RegMeanSolve regmean_solve = RegMeanSolve::kAuto;
  // Merged tensors waiting for the writer thread; 0 writes each tensor
  // before merging the next (no overlap: the baseline of bench/merge_rss).
  int write_queue_depth = 2;
  // The dtype of the result's tensors; unset: each input tensor's own. The
  // arithmetic stays in float32 or better either way.
  std::optional<DType> out_dtype;
  // Largest shard of the result, in bytes of tensor data (see ModelWriter).
  uint64_t shard_bytes = kDefaultShardBytes;
  // The shard of the result written (from 0): its tensors alone, into its
  // file, bitwise as in the whole result; no index (see WriteModelIndex).
  // kEveryShard: the whole model directory.
  int shard = kEveryShard;
};

// How one output tensor is produced.
enum class TensorRule {
  kAverage,     // sum c_i W_i (also used for average/weighted)
  kFisher,      // sum c_i F_i W_i / sum c_i F_i
  kRegMean,     // closed-form solve from the Grams
  kCopy,        // excluded tensor copied from one model
  kTaskVector,  // one of the task-vector methods, with the base's tensor
};

struct PlannedTensor {
  TensorInfo info;  // name, dtype and shape of the inputs (from model 0)
  TensorRule rule = TensorRule::kAverage;
  int copy_from = -1;  // for kCopy
  // kRegMean: per model, the Gram tensor of the file that holds this
  // weight's Gram (aliases and identical tensors resolved).
  std::vector<std::string> grams;
  // The dtype written (MergeOptions::out_dtype, else info's) and its bytes.
  DType out_dtype = DType::kF32;
  uint64_t out_nbytes = 0;
};

// The validated recipe of a merge: the output tensors in write order and the
// normalised coefficients.
struct MergePlan {
  std::vector<PlannedTensor> tensors;
  // Normalised (task-vector methods: the weights w_i as given).
  std::vector<double> coefficients;
  // Task-vector methods: per model density (ties, dare_*).
  std::vector<double> densities;
  // Per model: scale applied to its Grams (1 or 1/num_examples).
  std::vector<double> gram_scale;
  uint64_t output_bytes = 0;
};

// The tensors the merge writes, in order (name, output dtype, shape).
std::vector<TensorSpec> TensorSpecs(const MergePlan& plan);

// Validates a merge in full without reading tensor data (beyond metadata):
// at least two models; coefficients >= 0 and not all zero unless all are
// zero; alpha in [0,1]; statistics present for the method; the same tensor
// names, dtypes and shapes in every model unless excluded; Grams square and
// `in x in` for their weight, present for every model or for none; Fisher
// shapes equal to their weight. INVALID_ARGUMENT for a malformed request,
// FAILED_PRECONDITION for inputs that do not fit together; the message names
// the tensor, the models and both shapes.
absl::StatusOr<MergePlan> PlanMerge(const std::vector<MergeInput>& inputs,
                                    const MergeOptions& options);

struct MergeProgress {
  int64_t tensors_done = 0;
  int64_t tensors_total = 0;
  uint64_t bytes_done = 0;
  uint64_t bytes_total = 0;
  // RegMean systems solved so far in refined float32 and in float64.
  int64_t float32_solves = 0;
  int64_t float64_solves = 0;
  // Weights the fast mode solved in float32, and those it redid in float64
  // (counted in float64_solves too).
  int64_t fast_solves = 0;
  int64_t fast_fallbacks = 0;
  // The largest estimated output error of the weights the fast mode kept.
  double fast_output_error = 0;
  // RegMean weights solved with the factorisation of an earlier weight with
  // the same Grams (PlannedTensor::grams).
  int64_t shared_factorisations = 0;
};

// Runs `plan` tensor by tensor (those of `options.shard` only, when set),
// streaming the result into the model
// directory `out_dir`, sharded by `options.shard_bytes` (see ModelWriter;
// each file written atomically). Peak memory is O(N x largest tensor).
// Output dtype = options.out_dtype, else the input's; arithmetic in float32
// or better (float64 for the RegMean solve). `progress` (may be empty) is
// called after each tensor. Returns CANCELLED when `*cancelled` becomes true,
// FAILED_PRECONDITION when a RegMean system is singular (naming the tensor),
// RESOURCE_EXHAUSTED when out of memory. Same inputs give bitwise the same
// output on CPU, whether written whole or a shard at a time.
absl::Status ExecuteMerge(
    const MergePlan& plan, const std::vector<MergeInput>& inputs,
    const MergeOptions& options, const std::string& out_dir,
    const std::function<void(const MergeProgress&)>& progress,
    const std::atomic<bool>* cancelled);

}  // namespace amalgam::core
