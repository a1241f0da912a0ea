#include "core/merge.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <re2/re2.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <iterator>
#include <map>
#include <memory>
#include <new>
#include <system_error>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "core/cpu_cache.h"
#include "core/regmean.h"
#include "core/runtime.h"
#include "core/statistics.h"
#include "core/status_macros.h"
#include "core/torch_util.h"

namespace amalgam::core {
namespace {

// ---------------------------------------------------------------------------
// Naming helpers for error messages.

std::string ModelName(const std::vector<MergeInput>& inputs, size_t i) {
  if (!inputs[i].label.empty()) return inputs[i].label;
  return absl::StrCat("#", i);
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

const char* MethodName(MergeMethod method) {
  switch (method) {
    case MergeMethod::kAverage:
      return "average";
    case MergeMethod::kWeighted:
      return "weighted";
    case MergeMethod::kFisher:
      return "fisher";
    case MergeMethod::kRegMean:
      return "regmean";
    case MergeMethod::kTaskArithmetic:
      return "task_arithmetic";
    case MergeMethod::kTies:
      return "ties";
    case MergeMethod::kDareLinear:
      return "dare_linear";
    case MergeMethod::kDareTies:
      return "dare_ties";
    case MergeMethod::kSlerp:
      return "slerp";
    case MergeMethod::kModelStock:
      return "model_stock";
  }
  return "unknown";
}

bool UsesLambda(MergeMethod m) {
  return m == MergeMethod::kTaskArithmetic || m == MergeMethod::kTies ||
         m == MergeMethod::kDareLinear || m == MergeMethod::kDareTies;
}
bool UsesDensity(MergeMethod m) {
  return m == MergeMethod::kTies || m == MergeMethod::kDareLinear ||
         m == MergeMethod::kDareTies;
}
bool IsDare(MergeMethod m) {
  return m == MergeMethod::kDareLinear || m == MergeMethod::kDareTies;
}
bool UsesNormalize(MergeMethod m) {
  return m == MergeMethod::kTies || m == MergeMethod::kDareTies;
}

// The task-vector methods' models, base and parameters. INVALID_ARGUMENT
// naming what is wrong: a parameter the method does not use (or one out of
// its range), a missing base, too few or too many models.
absl::Status CheckTaskVectorOptions(const std::vector<MergeInput>& inputs,
                                    const MergeOptions& options) {
  const MergeMethod m = options.method;
  const TaskVectorOptions& task = options.task;
  const std::string method = MethodName(m);
  auto unused = [&](const char* what) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " is not a parameter of ", method));
  };
  if (options.precision != RegMeanPrecision::kFloat64 &&
      m != MergeMethod::kRegMean) {
    return unused("precision float32");
  }
  if (!IsTaskVectorMethod(m)) {
    if (options.base.weights != nullptr) return unused("a base model");
    if (task.lambda || task.density || task.seed || task.t ||
        task.no_normalize || task.rescale) {
      return absl::InvalidArgumentError(absl::StrCat(
          "lambda, density, seed, t, no_normalize and rescale are parameters "
          "of the task-vector methods, not of ",
          method));
    }
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (inputs[i].density != 0) return unused("a model's density");
    }
    return absl::OkStatus();
  }
  const bool has_base = options.base.weights != nullptr;
  const size_t n = inputs.size();
  if (m == MergeMethod::kSlerp) {
    if (!(n == 2 && !has_base) && !(n == 1 && has_base)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "slerp interpolates two models, or a model and the base; got ", n,
          " model(s)", has_base ? " and a base" : ""));
    }
    if (!task.t.has_value()) {
      return absl::InvalidArgumentError("slerp needs t, in [0, 1]");
    }
    if (!(*task.t >= 0 && *task.t <= 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("t must be in [0, 1], got ", *task.t));
    }
  } else {
    if (!has_base) {
      return absl::InvalidArgumentError(
          absl::StrCat(method,
                       " needs a base model (the task vectors are the "
                       "models' differences to it)"));
    }
    const size_t least = m == MergeMethod::kModelStock ? 2 : 1;
    if (n < least) {
      return absl::InvalidArgumentError(absl::StrCat(method, " needs at least ",
                                                     least,
                                                     " model(s) besides "
                                                     "the base, got ",
                                                     n));
    }
    if (task.t) return unused("t");
  }
  if (task.lambda && !UsesLambda(m)) return unused("lambda");
  if (task.lambda && !std::isfinite(*task.lambda)) {
    return absl::InvalidArgumentError(
        absl::StrCat("lambda must be finite, got ", *task.lambda));
  }
  if (task.seed && !IsDare(m)) return unused("seed");
  if (task.rescale && !IsDare(m)) return unused("rescale");
  if (task.no_normalize && !UsesNormalize(m)) return unused("no_normalize");
  auto check_density = [&](double d, const std::string& what) -> absl::Status {
    if (!UsesDensity(m)) return unused(what.c_str());
    if (!(d > 0 && d <= 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " must be in (0, 1], got ", d));
    }
    return absl::OkStatus();
  };
  if (task.density) {
    AMALGAM_RETURN_IF_ERROR(check_density(*task.density, "density"));
  }
  for (size_t i = 0; i < n; ++i) {
    if (inputs[i].density != 0) {
      AMALGAM_RETURN_IF_ERROR(check_density(
          inputs[i].density,
          absl::StrCat("the density of model ", ModelName(inputs, i))));
    }
    if (inputs[i].coefficient != 0 && !UsesLambda(m)) {
      return unused("a model's weight");
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Plan helpers.

struct GramInfo {
  bool is_mean = false;
  int64_t num_examples = 0;  // 0 when absent
};

absl::StatusOr<GramInfo> ReadGramMetadata(const std::vector<MergeInput>& inputs,
                                          size_t i) {
  GramInfo info;
  const auto& metadata = inputs[i].gram->metadata();
  auto it = metadata.find("reduction");
  if (it != metadata.end()) {
    if (it->second == "mean") {
      info.is_mean = true;
    } else if (it->second != "sum") {
      return absl::FailedPreconditionError(absl::StrCat(
          "the Grams of model ", ModelName(inputs, i), " have reduction \"",
          it->second, "\"; expected \"sum\" or \"mean\""));
    }
  }
  it = metadata.find("num_examples");
  if (it != metadata.end()) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(it->second, &n) || n <= 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the Grams of model ", ModelName(inputs, i), " have num_examples \"",
          it->second, "\"; expected a positive integer"));
    }
    info.num_examples = n;
  }
  return info;
}

absl::Status CheckOptions(const std::vector<MergeInput>& inputs,
                          const MergeOptions& options) {
  AMALGAM_RETURN_IF_ERROR(CheckTaskVectorOptions(inputs, options));
  if (inputs.empty() ||
      (inputs.size() < 2 && !IsTaskVectorMethod(options.method))) {
    return absl::InvalidArgumentError(
        absl::StrCat("a merge needs at least two models, got ", inputs.size()));
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].weights == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("model ", ModelName(inputs, i), " has no weights"));
    }
    double c = inputs[i].coefficient;
    if (!std::isfinite(c) || c < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("the coefficient of model ", ModelName(inputs, i),
                       " is ", c, "; coefficients must be finite and >= 0"));
    }
  }
  if (!(options.alpha >= 0.0 && options.alpha <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("alpha must be in [0, 1], got ", options.alpha));
  }
  if (!(options.fisher_floor >= 0.0) || !std::isfinite(options.fisher_floor)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "fisher_floor must be finite and >= 0, got ", options.fisher_floor));
  }
  if (options.take_excluded_from < -1 ||
      options.take_excluded_from >= static_cast<int>(inputs.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "take_excluded_from is ", options.take_excluded_from, " but there are ",
        inputs.size(), " models (use -1 to drop them)"));
  }
  return absl::OkStatus();
}

std::vector<double> NormalizeCoefficients(
    const std::vector<MergeInput>& inputs) {
  const size_t n = inputs.size();
  double max = 0.0;
  for (const auto& input : inputs) max = std::max(max, input.coefficient);
  std::vector<double> c(n, 1.0 / static_cast<double>(n));
  if (max == 0.0) return c;
  // Divide by the largest first so the sum cannot overflow.
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) {
    c[i] = inputs[i].coefficient / max;
    sum += c[i];
  }
  for (double& x : c) x /= sum;
  return c;
}

// Checks that tensor `name` of model `i` has the dtype and shape of model 0.
// FAILED_PRECONDITION unless `other` (in `other_where`, e.g. "model m1")
// has the dtype and shape of `ref` (in `ref_where`).
absl::Status CheckSameTensor(const TensorInfo& ref,
                             const std::string& ref_where,
                             const TensorInfo& other,
                             const std::string& other_where) {
  if (ref.dtype != other.dtype) {
    return absl::FailedPreconditionError(absl::StrCat(
        "tensor \"", ref.name, "\" has dtype ", DTypeName(ref.dtype), " in ",
        ref_where, " but ", DTypeName(other.dtype), " in ", other_where));
  }
  if (ref.shape != other.shape) {
    return absl::FailedPreconditionError(absl::StrCat(
        "tensor \"", ref.name, "\" has shape ", ShapeString(ref.shape), " in ",
        ref_where, " but ", ShapeString(other.shape), " in ", other_where));
  }
  return absl::OkStatus();
}

// Task vectors: every merged tensor computed with the base's (same dtype and
// shape), the weights as given (0 meaning 1) and each model's density.
absl::Status PlanTaskVectors(const std::vector<MergeInput>& inputs,
                             const MergeOptions& options,
                             std::vector<PlannedTensor>& merged,
                             MergePlan& plan) {
  plan.coefficients.clear();
  plan.densities.clear();
  for (const MergeInput& input : inputs) {
    plan.coefficients.push_back(input.coefficient == 0 ? 1.0
                                                       : input.coefficient);
    plan.densities.push_back(input.density != 0
                                 ? input.density
                                 : options.task.density.value_or(0.2));
  }
  const SafetensorsReader* base = options.base.weights;
  const std::string label =
      options.base.label.empty() ? "base" : options.base.label;
  for (PlannedTensor& t : merged) {
    t.rule = TensorRule::kTaskVector;
    if (base == nullptr) continue;  // slerp of two models
    const TensorInfo* own = base->Find(t.info.name);
    if (own == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "tensor \"", t.info.name, "\" is in model ", ModelName(inputs, 0),
          " but missing from the base model ", label));
    }
    AMALGAM_RETURN_IF_ERROR(CheckSameTensor(t.info,
                                            "model " + ModelName(inputs, 0),
                                            *own, "the base model " + label));
  }
  return absl::OkStatus();
}

// Fisher: for every merged tensor, a Fisher in every model or in none.
absl::Status PlanFisher(const std::vector<MergeInput>& inputs,
                        std::vector<PlannedTensor>& merged) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].fisher == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("a fisher merge needs Fisher statistics for every "
                       "model; model ",
                       ModelName(inputs, i), " has none"));
    }
  }
  for (PlannedTensor& t : merged) {
    int present = -1;
    int absent = -1;
    for (size_t i = 0; i < inputs.size(); ++i) {
      const TensorInfo* f = inputs[i].fisher->Find(t.info.name);
      if (f == nullptr) {
        if (absent < 0) absent = static_cast<int>(i);
        continue;
      }
      if (present < 0) present = static_cast<int>(i);
      if (f->shape != t.info.shape) {
        return absl::FailedPreconditionError(absl::StrCat(
            "Fisher for tensor \"", t.info.name, "\" has shape ",
            ShapeString(f->shape), " in model ", ModelName(inputs, i),
            " but the weight has shape ", ShapeString(t.info.shape)));
      }
    }
    if (present >= 0 && absent >= 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "Fisher for tensor \"", t.info.name, "\" is in model ",
          ModelName(inputs, present), " but missing from model ",
          ModelName(inputs, absent), "; give it for every model or for none"));
    }
    t.rule = present >= 0 ? TensorRule::kFisher : TensorRule::kAverage;
  }
  return absl::OkStatus();
}

// RegMean: Grams square, `in x in` for a 2-D merged weight, present in every
// model or in none; reductions consistent with the normalisation.
absl::Status PlanRegMean(const std::vector<MergeInput>& inputs,
                         const MergeOptions& options,
                         const std::vector<std::unique_ptr<RE2>>& exclude,
                         std::vector<PlannedTensor>& merged,
                         std::vector<double>& gram_scale) {
  const size_t n = inputs.size();
  std::vector<GramInfo> grams(n);
  for (size_t i = 0; i < n; ++i) {
    if (inputs[i].gram == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("a regmean merge needs Gram statistics for every "
                       "model; model ",
                       ModelName(inputs, i), " has none"));
    }
    AMALGAM_ASSIGN_OR_RETURN(grams[i], ReadGramMetadata(inputs, i));
  }
  for (size_t i = 0; i < n; ++i) {
    if (options.gram_normalization == GramNormalization::kAsUploaded) {
      if (grams[i].is_mean != grams[0].is_mean) {
        return absl::FailedPreconditionError(absl::StrCat(
            "the Grams of model ", ModelName(inputs, 0), " are a ",
            grams[0].is_mean ? "mean" : "sum", " but those of model ",
            ModelName(inputs, i), " are a ", grams[i].is_mean ? "mean" : "sum",
            "; choose a normalisation (normalise each Gram to a mean)"));
      }
      gram_scale[i] = 1.0;
    } else if (grams[i].is_mean) {
      gram_scale[i] = 1.0;
    } else {
      if (grams[i].num_examples <= 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "the Grams of model ", ModelName(inputs, i),
            " are a sum without num_examples in their metadata, so they "
            "cannot be normalised to a mean"));
      }
      gram_scale[i] = 1.0 / static_cast<double>(grams[i].num_examples);
    }
  }

  // Every Gram must belong to a 2-D merged weight.
  std::map<std::string, PlannedTensor*> by_name;
  for (PlannedTensor& t : merged) by_name[t.info.name] = &t;
  for (size_t i = 0; i < n; ++i) {
    if (absl::Status aliases = CheckGramAliases(*inputs[i].gram);
        !aliases.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("the Grams of model ",
                                                     ModelName(inputs, i), ": ",
                                                     aliases.message()));
    }
    for (const std::string& name : GramNames(*inputs[i].gram)) {
      bool excluded = false;
      for (const auto& re : exclude) {
        if (RE2::FullMatch(name, *re)) {
          excluded = true;
          break;
        }
      }
      if (excluded) continue;
      auto it = by_name.find(name);
      if (it == by_name.end()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "the Grams of model ", ModelName(inputs, i), " have \"", name,
            "\", which is not a tensor of the weights"));
      }
      if (it->second->info.shape.size() != 2) {
        return absl::FailedPreconditionError(absl::StrCat(
            "the Grams of model ", ModelName(inputs, i), " have \"", name,
            "\", but that weight has shape ",
            ShapeString(it->second->info.shape), ", not [out, in]"));
      }
    }
  }

  for (PlannedTensor& t : merged) {
    if (t.info.shape.size() != 2) continue;
    int present = -1;
    int absent = -1;
    const int64_t in = t.info.shape[1];
    std::vector<std::string> tensors(n);
    for (size_t i = 0; i < n; ++i) {
      const TensorInfo* g = FindGram(*inputs[i].gram, t.info.name);
      if (g == nullptr) {
        if (absent < 0) absent = static_cast<int>(i);
        continue;
      }
      if (present < 0) present = static_cast<int>(i);
      const auto same = inputs[i].gram_identical.find(g->name);
      tensors[i] =
          same == inputs[i].gram_identical.end() ? g->name : same->second;
      if (g->shape.size() != 2 || g->shape[0] != in || g->shape[1] != in) {
        return absl::FailedPreconditionError(absl::StrCat(
            "Gram for tensor \"", t.info.name, "\" has shape ",
            ShapeString(g->shape), " in model ", ModelName(inputs, i),
            " but the weight ", ShapeString(t.info.shape), " needs [", in, ", ",
            in, "]"));
      }
    }
    if (present >= 0 && absent >= 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "Gram for tensor \"", t.info.name, "\" is in model ",
          ModelName(inputs, present), " but missing from model ",
          ModelName(inputs, absent), "; give it for every model or for none"));
    }
    if (present >= 0) {
      t.rule = TensorRule::kRegMean;
      t.grams = std::move(tensors);
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Execution helpers.

// Looks `name` up in `reader` and checks it still matches what was planned.
absl::StatusOr<const TensorInfo*> FindPlanned(const SafetensorsReader& reader,
                                              const std::string& name,
                                              const char* what,
                                              const std::string& model) {
  const TensorInfo* info = reader.Find(name);
  if (info == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " of model ", model, " has no tensor \"", name,
                     "\" (the inputs changed since the merge was planned)"));
  }
  return info;
}

// Writes tensors on a thread of its own while the caller computes the next
// ones: at most `depth` tensors wait, so memory stays bounded; depth 0
// writes in the caller, in order. One producer.
class PipelinedWriter {
 public:
  PipelinedWriter(ModelWriter* writer, size_t depth)
      : writer_(writer), depth_(depth) {
    if (depth_ == 0) return;
    try {
      thread_ = std::thread([this] { Loop(); });
    } catch (const std::system_error&) {
      depth_ = 0;  // no thread to be had: write in the caller
    }
  }
  ~PipelinedWriter() { Close().IgnoreError(); }

  // Queues `bytes` (kept alive by `owner`, may be undefined when the bytes
  // are mapped input) and runs `after` once they are written. Returns the
  // first write error so far.
  absl::Status Push(absl::Span<const uint8_t> bytes, at::Tensor owner,
                    std::function<void()> after) {
    if (depth_ == 0) {
      absl::Status status;
      if (!bytes.empty()) status = writer_->Append(bytes);
      if (after) after();
      return status;
    }
    absl::MutexLock lock(&mu_);
    auto room = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return queue_.size() < depth_ || !status_.ok();
    };
    mu_.Await(absl::Condition(&room));
    if (!status_.ok()) return status_;
    queue_.push_back({bytes, std::move(owner), std::move(after)});
    return absl::OkStatus();
  }

  // Writes what is queued and stops the thread; the first error, if any.
  absl::Status Close() {
    {
      absl::MutexLock lock(&mu_);
      closing_ = true;
    }
    if (thread_.joinable()) thread_.join();
    absl::MutexLock lock(&mu_);
    return status_;
  }

 private:
  struct Item {
    absl::Span<const uint8_t> bytes;
    at::Tensor owner;
    std::function<void()> after;
  };

  void Loop() {
    while (true) {
      Item item;
      {
        absl::MutexLock lock(&mu_);
        auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return !queue_.empty() || closing_;
        };
        mu_.Await(absl::Condition(&ready));
        if (queue_.empty()) return;
        item = std::move(queue_.front());
        queue_.pop_front();
      }
      absl::Status status;
      if (!item.bytes.empty()) status = writer_->Append(item.bytes);
      if (item.after) item.after();
      absl::MutexLock lock(&mu_);
      if (status_.ok()) status_ = status;
    }
  }

  ModelWriter* const writer_;
  size_t depth_;
  absl::Mutex mu_;
  std::deque<Item> queue_ ABSL_GUARDED_BY(mu_);
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

// The factorisations of RegMean weights whose Grams are the same tensors
// (PlannedTensor::grams, joined), kept until the last of them is solved.
struct SharedFactors {
  int64_t waiting = 0;  // weights still to solve
  RegMeanFactors factors;
};
using SharedSystems = std::map<std::string, SharedFactors>;

std::string SystemKey(const PlannedTensor& t) {
  return absl::StrJoin(t.grams, std::string(1, '\0'));
}

// The systems of `plan` that more than one weight solves.
SharedSystems FindSharedSystems(const MergePlan& plan) {
  SharedSystems systems;
  for (const PlannedTensor& t : plan.tensors) {
    if (t.rule == TensorRule::kRegMean) ++systems[SystemKey(t)].waiting;
  }
  for (auto it = systems.begin(); it != systems.end();) {
    it = it->second.waiting < 2 ? systems.erase(it) : std::next(it);
  }
  return systems;
}

struct ExecContext {
  const MergePlan* plan;
  const std::vector<MergeInput>* inputs;
  const MergeOptions* options;
  at::Device device;
  MergeProgress* state;  // solve counts
  SharedSystems* shared;
};

// out[j] = sum_i c[i] x[i][j] over `models` (up to kGroup) inputs, summed
// in float64 in model order; `first` says whether out starts from 0 (else
// from its own value).
constexpr size_t kGroup = 4;

template <typename T, size_t N>
void SumGroup(const T* const* x, const double* c, double* out, int64_t size,
              bool first) {
  for (int64_t j = 0; j < size; ++j) {
    double sum = first ? 0.0 : out[j];
    for (size_t i = 0; i < N; ++i) sum += c[i] * static_cast<double>(x[i][j]);
    out[j] = sum;
  }
}

// Weighted average sum c_i W_i, accumulated in model order in float64 and
// rounded once to T, in one pass over the inputs, chunk by chunk so the
// partial sums stay in cache: memory traffic is the inputs read once and the
// output written once.
template <typename T>
void WeightedSum(const std::vector<at::Tensor>& in,
                 const std::vector<double>& c, at::Tensor& out) {
  std::vector<const T*> sources;
  for (const at::Tensor& t : in) sources.push_back(t.data_ptr<T>());
  T* target = out.data_ptr<T>();
  constexpr int64_t kChunk = 1 << 13;  // 64 KiB of double
  using Group =
      void (*)(const T* const*, const double*, double*, int64_t, bool);
  constexpr Group kGroups[kGroup] = {SumGroup<T, 1>, SumGroup<T, 2>,
                                     SumGroup<T, 3>, SumGroup<T, 4>};
  at::parallel_for(0, out.numel(), kChunk, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(kChunk);
    std::vector<const T*> x(sources.size());
    for (int64_t start = begin; start < end; start += kChunk) {
      const int64_t size = std::min(end, start + kChunk) - start;
      for (size_t i = 0; i < sources.size(); ++i) x[i] = sources[i] + start;
      for (size_t i = 0; i < sources.size(); i += kGroup) {
        const size_t n = std::min(kGroup, sources.size() - i);
        kGroups[n - 1](&x[i], &c[i], sum.data(), size, i == 0);
      }
      for (int64_t j = 0; j < size; ++j) {
        target[start + j] = static_cast<T>(sum[j]);
      }
    }
  });
}

// The tensors `infos` of each model's `file`, as mapped, for a fused CPU
// pass; empty where none applies (not the CPU, a compute type other than
// float32 or float64, or a tensor stored in another type: the bytes are
// used as they are, with no conversion).
std::vector<at::Tensor> MappedForFusedPass(
    const ExecContext& ctx, const SafetensorsReader* MergeInput::*file,
    const std::vector<const TensorInfo*>& infos, at::ScalarType compute) {
  if (!ctx.device.is_cpu() ||
      (compute != at::kFloat && compute != at::kDouble)) {
    return {};
  }
  for (const TensorInfo* info : infos) {
    if (ScalarTypeOf(info->dtype) != compute) return {};
  }
  std::vector<at::Tensor> mapped;
  for (size_t i = 0; i < infos.size(); ++i) {
    mapped.push_back(
        Load(*((*ctx.inputs)[i].*file), *infos[i], compute, ctx.device)
            .contiguous());
  }
  return mapped;
}

at::Tensor MergeAverage(const ExecContext& ctx,
                        const std::vector<const TensorInfo*>& weights,
                        at::ScalarType compute) {
  const auto& inputs = *ctx.inputs;
  const auto& c = ctx.plan->coefficients;
  if (const std::vector<at::Tensor> in =
          MappedForFusedPass(ctx, &MergeInput::weights, weights, compute);
      !in.empty()) {
    // No conversion, one pass.
    at::Tensor out = at::empty(in[0].sizes(), at::TensorOptions(compute));
    if (compute == at::kFloat) {
      WeightedSum<float>(in, c, out);
    } else {
      WeightedSum<double>(in, c, out);
    }
    return out;
  }
  // In float64 like the fused pass, rounded once to the output dtype;
  // 16-bit inputs in float32 (exact enough for their 8 or 11 bits, and half
  // the memory).
  const DType dtype = weights[0]->dtype;
  const at::ScalarType sum_type =
      dtype == DType::kF16 || dtype == DType::kBF16 ? at::kFloat : at::kDouble;
  at::Tensor acc;
  for (size_t i = 0; i < inputs.size(); ++i) {
    at::Tensor w = Load(*inputs[i].weights, *weights[i], sum_type, ctx.device);
    if (i == 0) {
      acc = w.mul(c[0]);
    } else {
      acc.add_(w, c[i]);
    }
  }
  return acc;
}

// Fisher merge of inputs that already hold the compute type, on the CPU, in
// two passes: the first reads every input once, chunk by chunk so the sums
// stay in cache, and leaves sum c_i F_i W_i / sum c_i F_i in `out`, the
// average and the denominator beside it; the second, once the largest
// denominator is known, takes the average where the denominator is below
// the floor. The same operations in the same order as the general path.
template <typename T>
at::Tensor FusedFisher(const std::vector<at::Tensor>& w,
                       const std::vector<at::Tensor>& f,
                       const std::vector<double>& c, double floor) {
  at::Tensor out = at::empty(w[0].sizes(), w[0].options());
  at::Tensor avg = at::empty_like(out);
  at::Tensor den = at::empty_like(out);
  T* const o = out.data_ptr<T>();
  T* const a = avg.data_ptr<T>();
  T* const d = den.data_ptr<T>();
  constexpr int64_t kChunk = 1 << 12;
  absl::Mutex mu;
  T largest = 0;
  at::parallel_for(0, out.numel(), kChunk, [&](int64_t begin, int64_t end) {
    T local = 0;
    for (int64_t start = begin; start < end; start += kChunk) {
      const int64_t stop = std::min(end, start + kChunk);
      for (size_t i = 0; i < w.size(); ++i) {
        const T ci = static_cast<T>(c[i]);
        const T* wi = w[i].data_ptr<T>();
        const T* fi = f[i].data_ptr<T>();
        if (i == 0) {
          for (int64_t j = start; j < stop; ++j) {
            const T cf = fi[j] * ci;
            o[j] = cf * wi[j];
            d[j] = cf;
            a[j] = wi[j] * ci;
          }
        } else {
          for (int64_t j = start; j < stop; ++j) {
            const T cf = fi[j] * ci;
            o[j] += cf * wi[j];
            d[j] += cf;
            a[j] += wi[j] * ci;
          }
        }
      }
      for (int64_t j = start; j < stop; ++j) {
        o[j] /= d[j];
        local = std::max(local, d[j]);
      }
    }
    absl::MutexLock lock(&mu);
    largest = std::max(largest, local);
  });
  const T threshold = largest * static_cast<T>(floor);
  at::parallel_for(0, out.numel(), kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (d[j] <= 0 || d[j] < threshold) o[j] = a[j];
    }
  });
  return out;
}

// sum c_i F_i W_i / sum c_i F_i, the average where the denominator is below
// the floor.
at::Tensor MergeFisher(const ExecContext& ctx,
                       const std::vector<const TensorInfo*>& weights,
                       const std::vector<const TensorInfo*>& fishers,
                       at::ScalarType compute) {
  const auto& inputs = *ctx.inputs;
  const auto& c = ctx.plan->coefficients;
  const std::vector<at::Tensor> w =
      MappedForFusedPass(ctx, &MergeInput::weights, weights, compute);
  const std::vector<at::Tensor> f =
      w.empty()
          ? std::vector<at::Tensor>()
          : MappedForFusedPass(ctx, &MergeInput::fisher, fishers, compute);
  if (!f.empty()) {
    const double floor = ctx.options->fisher_floor;
    return compute == at::kFloat ? FusedFisher<float>(w, f, c, floor)
                                 : FusedFisher<double>(w, f, c, floor);
  }
  at::Tensor num, den, avg;
  for (size_t i = 0; i < inputs.size(); ++i) {
    at::Tensor w = Load(*inputs[i].weights, *weights[i], compute, ctx.device);
    at::Tensor f = Load(*inputs[i].fisher, *fishers[i], compute, ctx.device);
    at::Tensor cf = f.mul(c[i]);
    if (i == 0) {
      num = cf.mul(w);
      den = cf;
      avg = w.mul(c[0]);
    } else {
      num.addcmul_(cf, w);
      den.add_(cf);
      avg.add_(w, c[i]);
    }
  }
  if (den.numel() == 0) return avg;
  at::Tensor threshold = den.max().mul(ctx.options->fisher_floor);
  at::Tensor use_average = den.le(0).logical_or_(den.lt(threshold));
  return at::where(use_average, avg, num.div(den));
}

absl::StatusOr<at::Tensor> MergeRegMean(
    const ExecContext& ctx, const PlannedTensor& t,
    const std::vector<const TensorInfo*>& weights,
    const std::vector<const TensorInfo*>& grams) {
  const auto& inputs = *ctx.inputs;
  RegMeanSystem system;
  system.name = t.info.name;
  system.coefficients = ctx.plan->coefficients;
  for (size_t i = 0; i < inputs.size(); ++i) {
    system.scales.push_back(ctx.plan->coefficients[i] *
                            ctx.plan->gram_scale[i]);
  }
  system.alpha = ctx.options->alpha;
  system.load = [&](size_t i, bool gram, at::ScalarType type, bool writable) {
    const SafetensorsReader& reader =
        gram ? *inputs[i].gram : *inputs[i].weights;
    const TensorInfo& info = gram ? *grams[i] : *weights[i];
    at::Tensor t = Load(reader, info, type, ctx.device);
    if (writable &&
        t.data_ptr() == static_cast<const void*>(reader.Data(info).data())) {
      t = t.clone();  // it aliases the read-only mapping
    }
    return t;
  };
  const auto shared = ctx.shared->find(SystemKey(t));
  if (shared == ctx.shared->end()) {
    return SolveRegMean(system, *ctx.options, ctx.device, ctx.state, nullptr);
  }
  absl::StatusOr<at::Tensor> w = SolveRegMean(
      system, *ctx.options, ctx.device, ctx.state, &shared->second.factors);
  if (--shared->second.waiting == 0) ctx.shared->erase(shared);
  return w;
}

// One tensor of a task-vector method, in float64 on the CPU (so that the
// result does not depend on the device or thread count).
absl::StatusOr<at::Tensor> MergeTaskVectors(
    const ExecContext& ctx, const PlannedTensor& t,
    const std::vector<const TensorInfo*>& weights) {
  const auto& inputs = *ctx.inputs;
  const MergeOptions& options = *ctx.options;
  const MergePlan& plan = *ctx.plan;
  std::vector<at::Tensor> models;
  for (size_t i = 0; i < inputs.size(); ++i) {
    models.push_back(Load(*inputs[i].weights, *weights[i], at::kDouble,
                          at::Device(at::kCPU)));
  }
  at::Tensor base;
  if (options.base.weights != nullptr) {
    AMALGAM_ASSIGN_OR_RETURN(
        const TensorInfo* info,
        FindPlanned(*options.base.weights, t.info.name, "the weights",
                    options.base.label.empty() ? "base" : options.base.label));
    if (info->dtype != t.info.dtype || info->shape != t.info.shape) {
      return absl::FailedPreconditionError(
          absl::StrCat("tensor \"", t.info.name,
                       "\" of the base model no longer matches the plan"));
    }
    base =
        Load(*options.base.weights, *info, at::kDouble, at::Device(at::kCPU));
  }
  const TaskVectorOptions& task = options.task;
  const double lambda = task.lambda.value_or(1.0);
  const bool normalize = !task.no_normalize;
  return GuardTorch(t.info.name, [&]() -> absl::StatusOr<at::Tensor> {
    switch (options.method) {
      case MergeMethod::kTaskArithmetic:
        return TaskArithmetic(base, models, plan.coefficients, lambda);
      case MergeMethod::kTies:
        return Ties(base, models, plan.coefficients, plan.densities, lambda,
                    normalize);
      case MergeMethod::kDareLinear:
      case MergeMethod::kDareTies:
        return Dare(base, models, plan.coefficients, plan.densities, lambda,
                    options.method == MergeMethod::kDareTies, normalize,
                    task.rescale.value_or(DareRescale::kInverseDensity),
                    task.seed.value_or(0), t.info.name);
      case MergeMethod::kSlerp:
        return base.defined() ? Slerp(base, models[0], *task.t)
                              : Slerp(models[0], models[1], *task.t);
      case MergeMethod::kModelStock:
        return ModelStock(base, models);
      default:
        return absl::InternalError("not a task-vector method");
    }
  });
}

absl::StatusOr<at::Tensor> MergeOne(const ExecContext& ctx,
                                    const PlannedTensor& t) {
  const auto& inputs = *ctx.inputs;
  const size_t n = inputs.size();
  std::vector<const TensorInfo*> weights(n), stats(n);
  for (size_t i = 0; i < n; ++i) {
    AMALGAM_ASSIGN_OR_RETURN(
        weights[i], FindPlanned(*inputs[i].weights, t.info.name, "the weights",
                                ModelName(inputs, i)));
    if (weights[i]->dtype != t.info.dtype ||
        weights[i]->shape != t.info.shape) {
      return absl::FailedPreconditionError(
          absl::StrCat("tensor \"", t.info.name, "\" of model ",
                       ModelName(inputs, i), " no longer matches the plan"));
    }
    if (t.rule == TensorRule::kFisher) {
      if (inputs[i].fisher == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat(
            "model ", ModelName(inputs, i), " has no Fisher statistics"));
      }
      AMALGAM_ASSIGN_OR_RETURN(
          stats[i], FindPlanned(*inputs[i].fisher, t.info.name, "the Fisher",
                                ModelName(inputs, i)));
    } else if (t.rule == TensorRule::kRegMean) {
      if (inputs[i].gram == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat(
            "model ", ModelName(inputs, i), " has no Gram statistics"));
      }
      if (t.grams.size() != n) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the plan names no Grams of tensor \"", t.info.name, "\""));
      }
      AMALGAM_ASSIGN_OR_RETURN(
          stats[i], FindPlanned(*inputs[i].gram, t.grams[i], "the Grams",
                                ModelName(inputs, i)));
    }
  }
  const at::ScalarType compute =
      t.info.dtype == DType::kF64 ? at::kDouble : at::kFloat;
  at::Tensor merged;
  if (t.rule == TensorRule::kTaskVector) {
    AMALGAM_ASSIGN_OR_RETURN(merged, MergeTaskVectors(ctx, t, weights));
    return merged.to(ScalarTypeOf(t.out_dtype)).contiguous();
  }
  switch (t.rule) {
    case TensorRule::kAverage:
      merged = MergeAverage(ctx, weights, compute);
      break;
    case TensorRule::kFisher:
      merged = MergeFisher(ctx, weights, stats, compute);
      break;
    case TensorRule::kRegMean: {
      AMALGAM_ASSIGN_OR_RETURN(merged, MergeRegMean(ctx, t, weights, stats));
      break;
    }
    case TensorRule::kCopy:
    case TensorRule::kTaskVector:
      return absl::InternalError("not computed here");
  }
  // Written as raw row-major bytes: contiguous whatever layout the merge
  // produced (to() alone may hand back a transposed view unchanged).
  return merged.to(at::kCPU, ScalarTypeOf(t.out_dtype)).contiguous();
}

}  // namespace

bool IsTaskVectorMethod(MergeMethod method) {
  switch (method) {
    case MergeMethod::kTaskArithmetic:
    case MergeMethod::kTies:
    case MergeMethod::kDareLinear:
    case MergeMethod::kDareTies:
    case MergeMethod::kSlerp:
    case MergeMethod::kModelStock:
      return true;
    default:
      return false;
  }
}

absl::StatusOr<MergePlan> PlanMerge(const std::vector<MergeInput>& inputs,
                                    const MergeOptions& options) {
  AMALGAM_RETURN_IF_ERROR(CheckOptions(inputs, options));
  const size_t n = inputs.size();

  std::vector<std::unique_ptr<RE2>> exclude;
  for (const std::string& pattern : options.exclude) {
    auto re = std::make_unique<RE2>(pattern, RE2::Quiet);
    if (!re->ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "invalid exclusion pattern \"", pattern, "\": ", re->error()));
    }
    exclude.push_back(std::move(re));
  }
  auto is_excluded = [&exclude](const std::string& name) {
    for (const auto& re : exclude) {
      if (RE2::FullMatch(name, *re)) return true;
    }
    return false;
  };

  MergePlan plan;
  plan.coefficients = NormalizeCoefficients(inputs);
  plan.gram_scale.assign(n, 1.0);

  // Merged tensors: the same names, dtypes and shapes in every model.
  std::vector<PlannedTensor> merged;
  for (const TensorInfo& ref : inputs[0].weights->tensors()) {
    if (is_excluded(ref.name)) continue;
    for (size_t i = 1; i < n; ++i) {
      const TensorInfo* other = inputs[i].weights->Find(ref.name);
      if (other == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat(
            "tensor \"", ref.name, "\" is in model ", ModelName(inputs, 0),
            " but missing from model ", ModelName(inputs, i)));
      }
      AMALGAM_RETURN_IF_ERROR(
          CheckSameTensor(ref, "model " + ModelName(inputs, 0), *other,
                          "model " + ModelName(inputs, i)));
    }
    PlannedTensor t;
    t.info = ref;
    merged.push_back(std::move(t));
  }
  for (size_t i = 1; i < n; ++i) {
    for (const TensorInfo& other : inputs[i].weights->tensors()) {
      if (is_excluded(other.name)) continue;
      if (inputs[0].weights->Find(other.name) == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat(
            "tensor \"", other.name, "\" is in model ", ModelName(inputs, i),
            " but missing from model ", ModelName(inputs, 0)));
      }
    }
  }

  if (IsTaskVectorMethod(options.method)) {
    AMALGAM_RETURN_IF_ERROR(PlanTaskVectors(inputs, options, merged, plan));
  } else if (options.method == MergeMethod::kFisher) {
    AMALGAM_RETURN_IF_ERROR(PlanFisher(inputs, merged));
  } else if (options.method == MergeMethod::kRegMean) {
    AMALGAM_RETURN_IF_ERROR(
        PlanRegMean(inputs, options, exclude, merged, plan.gram_scale));
  }

  plan.tensors = std::move(merged);
  if (options.take_excluded_from >= 0) {
    const auto& source = *inputs[options.take_excluded_from].weights;
    for (const TensorInfo& info : source.tensors()) {
      if (!is_excluded(info.name)) continue;
      PlannedTensor t;
      t.info = info;
      t.rule = TensorRule::kCopy;
      t.copy_from = options.take_excluded_from;
      plan.tensors.push_back(std::move(t));
    }
  }
  std::sort(plan.tensors.begin(), plan.tensors.end(),
            [](const PlannedTensor& x, const PlannedTensor& y) {
              return x.info.name < y.info.name;
            });
  for (PlannedTensor& t : plan.tensors) {
    t.out_dtype = options.out_dtype.value_or(t.info.dtype);
    t.out_nbytes = static_cast<uint64_t>(t.info.numel) * DTypeSize(t.out_dtype);
    plan.output_bytes += t.out_nbytes;
  }
  return plan;
}

std::vector<TensorSpec> TensorSpecs(const MergePlan& plan) {
  std::vector<TensorSpec> specs;
  specs.reserve(plan.tensors.size());
  for (const PlannedTensor& t : plan.tensors) {
    specs.push_back(TensorSpec{t.info.name, t.out_dtype, t.info.shape});
  }
  return specs;
}

absl::Status ExecuteMerge(
    const MergePlan& plan, const std::vector<MergeInput>& inputs,
    const MergeOptions& options, const std::string& out_dir,
    const std::function<void(const MergeProgress&)>& progress,
    const std::atomic<bool>* cancelled) {
  if (plan.coefficients.size() != inputs.size() ||
      plan.gram_scale.size() != inputs.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the plan is for ", plan.coefficients.size(),
                     " models but ", inputs.size(), " were given"));
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].weights == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("model ", ModelName(inputs, i), " has no weights"));
    }
  }
  AMALGAM_ASSIGN_OR_RETURN(std::string device_name,
                           ResolveDevice(options.device));
  AMALGAM_ASSIGN_OR_RETURN(
      at::Device device,
      GuardTorch("device", [&]() -> absl::StatusOr<at::Device> {
        return at::Device(device_name);
      }));

  std::vector<TensorSpec> specs = TensorSpecs(plan);
  std::map<std::string, std::string> metadata = {
      {"format", "pt"},
      {"amalgam.method", MethodName(options.method)},
      {"amalgam.models", absl::StrCat(inputs.size())},
  };
  if (IsTaskVectorMethod(options.method)) {
    // Every parameter the result depends on.
    const TaskVectorOptions& task = options.task;
    if (options.base.weights != nullptr) {
      metadata["amalgam.base"] = options.base.label;
    }
    if (UsesLambda(options.method)) {
      metadata["amalgam.lambda"] = absl::StrCat(task.lambda.value_or(1.0));
      metadata["amalgam.weights"] = absl::StrJoin(plan.coefficients, ",");
    }
    if (UsesDensity(options.method)) {
      metadata["amalgam.densities"] = absl::StrJoin(plan.densities, ",");
    }
    if (UsesNormalize(options.method)) {
      metadata["amalgam.normalize"] = task.no_normalize ? "false" : "true";
    }
    if (IsDare(options.method)) {
      metadata["amalgam.seed"] = absl::StrCat(task.seed.value_or(0));
      metadata["amalgam.rescale"] =
          task.rescale.value_or(DareRescale::kInverseDensity) ==
                  DareRescale::kL1
              ? "l1"
              : "inverse-density";
    }
    if (options.method == MergeMethod::kSlerp) {
      metadata["amalgam.t"] = absl::StrCat(*options.task.t);
    }
  }
  if (options.method == MergeMethod::kRegMean) {
    metadata["amalgam.alpha"] = absl::StrCat(options.alpha);
    metadata["amalgam.precision"] =
        options.precision == RegMeanPrecision::kFloat32 ? "float32" : "float64";
    // The solves' last bits depend on the BLAS kernels and thread count
    // (elementwise methods' do not): say which made this result.
    const BlasInfo blas = GetBlasInfo();
    metadata["amalgam.device"] = device_name;
    metadata["amalgam.blas_core"] = blas.core.empty() ? "-" : blas.core;
    metadata["amalgam.intra_op_threads"] = absl::StrCat(at::get_num_threads());
  }
  // A shard written alone: the plan of its tensors.
  MergePlan shard_plan;
  if (options.shard != kEveryShard) {
    shard_plan = plan;
    shard_plan.tensors.clear();
    shard_plan.output_bytes = 0;
    for (const size_t i :
         ShardTensors(specs, options.shard_bytes, options.shard)) {
      shard_plan.tensors.push_back(plan.tensors[i]);
      shard_plan.output_bytes += plan.tensors[i].out_nbytes;
    }
  }
  const MergePlan& work = options.shard == kEveryShard ? plan : shard_plan;
  AMALGAM_ASSIGN_OR_RETURN(
      std::unique_ptr<ModelWriter> writer,
      ModelWriter::Create(out_dir, std::move(specs), std::move(metadata),
                          options.shard_bytes, options.shard));

  // Large buffers are reused from tensor to tensor (the output buffers once
  // the writer is done with them, the float64 work of RegMean).
  CpuCacheScope cache;
  MergeProgress state;
  SharedSystems shared = FindSharedSystems(work);
  ExecContext ctx{&work, &inputs, &options, device, &state, &shared};
  state.tensors_total = static_cast<int64_t>(work.tensors.size());
  state.bytes_total = work.output_bytes;
  // Releases tensor `name` of every input from the resident set: streaming.
  // Calls `method` (Release or Prefetch) for tensor `name` of every file.
  auto for_every_file = [&inputs, &options](const std::string& name,
                                            void (SafetensorsReader::*method)(
                                                absl::string_view) const) {
    for (const MergeInput& input : inputs) {
      for (const SafetensorsReader* reader :
           {input.weights, input.gram, input.fisher}) {
        if (reader != nullptr) (reader->*method)(name);
      }
    }
    if (options.base.weights != nullptr) {
      (options.base.weights->*method)(name);
    }
  };
  auto release = [&](const std::string& name) {
    for_every_file(name, &SafetensorsReader::Release);
  };
  auto prefetch = [&](const std::string& name) {
    for_every_file(name, &SafetensorsReader::Prefetch);
  };
  // Reading (kernel read-ahead of the next tensor), merging (this thread)
  // and writing (the pipeline's thread) overlap.
  PipelinedWriter pipeline(writer.get(), static_cast<size_t>(std::max(
                                             0, options.write_queue_depth)));
  for (size_t index = 0; index < work.tensors.size(); ++index) {
    const PlannedTensor& t = work.tensors[index];
    if (cancelled != nullptr && cancelled->load()) {
      return absl::CancelledError(
          absl::StrCat("merge cancelled after ", state.tensors_done, " of ",
                       state.tensors_total, " tensors"));
    }
    // The next tensor's pages come in on another thread meanwhile.
    std::future<void> prefetched;
    if (index + 1 < work.tensors.size()) {
      try {
        prefetched = std::async(std::launch::async, prefetch,
                                work.tensors[index + 1].info.name);
      } catch (const std::system_error&) {
        // No thread to be had: the pages fault in as the merge reads them.
      }
    }
    struct WaitForPrefetch {
      std::future<void>& future;
      ~WaitForPrefetch() {
        if (future.valid()) future.wait();
      }
    } wait_for_prefetch{prefetched};
    if (t.rule == TensorRule::kCopy) {
      if (t.copy_from < 0 || t.copy_from >= static_cast<int>(inputs.size())) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor \"", t.info.name, "\" is copied from model ",
                         t.copy_from, " of ", inputs.size()));
      }
      const std::string model = ModelName(inputs, t.copy_from);
      AMALGAM_ASSIGN_OR_RETURN(const TensorInfo* info,
                               FindPlanned(*inputs[t.copy_from].weights,
                                           t.info.name, "the weights", model));
      if (info->nbytes != t.info.nbytes) {
        return absl::FailedPreconditionError(
            absl::StrCat("tensor \"", t.info.name, "\" of model ", model,
                         " no longer matches the plan"));
      }
      if (info->dtype == t.out_dtype) {
        // Written straight from the mapping; released once written.
        AMALGAM_RETURN_IF_ERROR(pipeline.Push(
            info->nbytes > 0 ? inputs[t.copy_from].weights->Data(*info)
                             : absl::Span<const uint8_t>(),
            at::Tensor(), [&release, name = t.info.name] { release(name); }));
      } else {
        AMALGAM_ASSIGN_OR_RETURN(
            at::Tensor out,
            GuardTorch(absl::StrCat("converting tensor \"", t.info.name, "\""),
                       [&]() -> absl::StatusOr<at::Tensor> {
                         return Load(*inputs[t.copy_from].weights, *info,
                                     ScalarTypeOf(t.out_dtype),
                                     at::Device(at::kCPU))
                             .contiguous();
                       }));
        release(t.info.name);
        const absl::Span<const uint8_t> bytes(
            static_cast<const uint8_t*>(out.data_ptr()), t.out_nbytes);
        AMALGAM_RETURN_IF_ERROR(pipeline.Push(bytes, std::move(out), nullptr));
      }
    } else {
      AMALGAM_ASSIGN_OR_RETURN(
          at::Tensor out,
          GuardTorch(absl::StrCat("merging tensor \"", t.info.name, "\""),
                     [&] { return MergeOne(ctx, t); }));
      const uint64_t nbytes = out.numel() * out.element_size();
      if (nbytes != t.out_nbytes) {
        return absl::InternalError(
            absl::StrCat("merged tensor \"", t.info.name, "\" has ", nbytes,
                         " bytes, expected ", t.out_nbytes));
      }
      // The inputs are done with: keep them out of RSS (a shared Gram too,
      // which is read again, from the page cache, by its next weight).
      release(t.info.name);
      for (size_t i = 0; i < t.grams.size(); ++i) {
        if (inputs[i].gram != nullptr && t.grams[i] != t.info.name) {
          inputs[i].gram->Release(t.grams[i]);
        }
      }
      const absl::Span<const uint8_t> bytes(
          static_cast<const uint8_t*>(out.data_ptr()), nbytes);
      AMALGAM_RETURN_IF_ERROR(pipeline.Push(bytes, std::move(out), nullptr));
    }
    ++state.tensors_done;
    state.bytes_done += t.out_nbytes;
    if (progress) progress(state);
  }
  AMALGAM_RETURN_IF_ERROR(pipeline.Close());
  return writer->Finish();
}

}  // namespace amalgam::core
