// amalgam: command-line client of amalgamd.
//
// Exit status: 0 on success, 1 when the server (or the local file system)
// reports an error or a job fails, 2 on a usage error.

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/cpp/client.h"

namespace amalgam::client {
namespace {

namespace v1 = ::amalgam::v1;

constexpr char kDefaultServer[] = "127.0.0.1:50051";

// The usage of one command ("amalgam NAME SYNOPSIS"), empty if unknown, and
// the whole help text; both made from the command table below.
std::string CommandUsage(const std::string& command);
std::string UsageText();

int UsageError(const std::string& command, absl::string_view message) {
  std::cerr << "amalgam: " << message << "\n";
  if (const std::string usage = CommandUsage(command); !usage.empty()) {
    std::cerr << "usage: " << usage << "\n";
  } else {
    std::cerr << "usage: amalgam [--server ADDR] [--token T] COMMAND [ARGS] "
                 "(see `amalgam help`)\n";
  }
  return 2;
}

int Fail(const absl::Status& status) {
  std::cerr << "amalgam: error: " << absl::StatusCodeToString(status.code())
            << ": " << status.message() << "\n";
  return 1;
}

// ---------------------------------------------------------------------------
// Argument parsing
// ---------------------------------------------------------------------------

struct OptionSpec {
  std::set<std::string> with_value;  // --opt V or --opt=V
  std::set<std::string> flags;       // --opt
  std::set<std::string> repeated;    // may appear more than once
};

struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::vector<std::string>> options;
  bool help = false;

  bool Has(const std::string& option) const {
    return options.count(option) > 0;
  }
  std::string Value(const std::string& option,
                    const std::string& fallback = "") const {
    auto it = options.find(option);
    return it == options.end() ? fallback : it->second.back();
  }
  std::vector<std::string> Values(const std::string& option) const {
    auto it = options.find(option);
    return it == options.end() ? std::vector<std::string>() : it->second;
  }
};

// INVALID_ARGUMENT (a usage error) for unknown options, missing values and
// options repeated that may appear once. `--` ends the options.
absl::StatusOr<Args> ParseArgs(const std::vector<std::string>& argv,
                               const OptionSpec& spec) {
  Args args;
  bool options_done = false;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& arg = argv[i];
    if (options_done || arg.size() < 2 || arg[0] != '-') {
      args.positional.push_back(arg);
      continue;
    }
    if (arg == "--") {
      options_done = true;
      continue;
    }
    if (arg == "-h" || arg == "--help") {
      args.help = true;
      continue;
    }
    std::string name = arg;
    std::string value;
    bool has_inline_value = false;
    if (const size_t eq = arg.find('='); eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
      has_inline_value = true;
    }
    if (spec.flags.count(name) > 0) {
      if (has_inline_value) {
        return absl::InvalidArgumentError(
            absl::StrCat("option ", name, " takes no value"));
      }
    } else if (spec.with_value.count(name) > 0) {
      if (!has_inline_value) {
        if (i + 1 >= argv.size()) {
          return absl::InvalidArgumentError(
              absl::StrCat("option ", name, " needs a value"));
        }
        value = argv[++i];
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown option ", name));
    }
    if (args.Has(name) && spec.repeated.count(name) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("option ", name, " given more than once"));
    }
    args.options[name].push_back(value);
  }
  return args;
}

// ---------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------

std::string FormatBytes(int64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024 && unit < 4) {
    value /= 1024;
    ++unit;
  }
  if (unit == 0) return absl::StrCat(bytes, " B");
  return absl::StrFormat("%.1f %s", value, kUnits[unit]);
}

std::string FormatTime(int64_t unix_seconds) {
  if (unix_seconds <= 0) return "-";
  return absl::FormatTime("%Y-%m-%d %H:%M:%S",
                          absl::FromUnixSeconds(unix_seconds),
                          absl::UTCTimeZone());
}

std::string KindName(v1::ArtifactKind kind) {
  switch (kind) {
    case v1::ARTIFACT_KIND_WEIGHTS:
      return "weights";
    case v1::ARTIFACT_KIND_GRAM:
      return "gram";
    case v1::ARTIFACT_KIND_FISHER:
      return "fisher";
    default:
      return "?";
  }
}

std::string StateName(v1::JobState state) {
  switch (state) {
    case v1::JOB_STATE_QUEUED:
      return "queued";
    case v1::JOB_STATE_RUNNING:
      return "running";
    case v1::JOB_STATE_SUCCEEDED:
      return "succeeded";
    case v1::JOB_STATE_FAILED:
      return "failed";
    case v1::JOB_STATE_CANCELLED:
      return "cancelled";
    default:
      return "?";
  }
}

// "regmean" for MERGE_METHOD_REGMEAN, and so on.
std::string MethodName(v1::MergeMethod method) {
  if (method == v1::MERGE_METHOD_UNSPECIFIED ||
      !v1::MergeMethod_IsValid(method)) {
    return "?";
  }
  return absl::AsciiStrToLower(
      absl::StripPrefix(v1::MergeMethod_Name(method), "MERGE_METHOD_"));
}

std::string JobKind(const v1::Job& job) {
  switch (job.spec_case()) {
    case v1::Job::kMerge:
      return absl::StrCat("merge/", MethodName(job.merge().method()));
    case v1::Job::kGrow:
      return absl::StrCat("grow/", job.grow().layout());
    case v1::Job::kSweep:
      return "sweep";
    default:
      return "?";
  }
}

std::string DTypeName(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_F16:
      return "F16";
    case v1::DTYPE_BF16:
      return "BF16";
    case v1::DTYPE_F32:
      return "F32";
    case v1::DTYPE_F64:
      return "F64";
    default:
      return "?";
  }
}

std::string ProgressText(const v1::Progress& progress) {
  if (progress.tensors_total() <= 0) return "-";
  std::string text = absl::StrCat(progress.tensors_done(), "/",
                                  progress.tensors_total(), " tensors");
  if (progress.bytes_total() > 0) {
    absl::StrAppend(&text, ", ", FormatBytes(progress.bytes_done()), "/",
                    FormatBytes(progress.bytes_total()));
  }
  return text;
}

// Prints rows as left-aligned columns separated by two spaces.
void PrintTable(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) {
      widths[i] = std::max(widths[i], row[i].size());
    }
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      if (i + 1 == row.size()) {
        absl::StrAppend(&line, row[i]);
      } else {
        absl::StrAppend(&line, row[i],
                        std::string(widths[i] - row[i].size() + 2, ' '));
      }
    }
    std::cout << line << "\n";
  }
}

// A self-overwriting status line on stderr, shown only when stderr is a
// terminal. Updates are throttled to ten per second.
class StatusLine {
 public:
  StatusLine() : enabled_(::isatty(STDERR_FILENO) == 1) {}
  ~StatusLine() { Done(); }

  bool enabled() const { return enabled_; }

  void Show(const std::string& text, bool force = false) {
    if (!enabled_) return;
    const absl::Time now = absl::Now();
    if (!force && now - last_ < absl::Milliseconds(100)) return;
    last_ = now;
    std::cerr << "\r" << text << "\033[K" << std::flush;
    shown_ = true;
  }

  // Ends the line, if one was shown.
  void Done() {
    if (shown_) std::cerr << "\n" << std::flush;
    shown_ = false;
  }

  ProgressCallback Transfer(const std::string& label) {
    return [this, label](int64_t done, int64_t total) {
      Show(absl::StrCat(
               label, " ", FormatBytes(done), " / ", FormatBytes(total),
               total > 0 ? absl::StrFormat(" (%.0f%%)", 100.0 * done / total)
                         : std::string()),
           done == total);
    };
  }

 private:
  const bool enabled_;
  absl::Time last_ = absl::InfinitePast();
  bool shown_ = false;
};

// Follows a job, showing progress on stderr (a live line on a terminal,
// otherwise one line per state change). Returns the final job.
absl::StatusOr<v1::Job> WatchWithProgress(Client& client,
                                          const std::string& job_id) {
  StatusLine line;
  v1::JobState last_state = v1::JOB_STATE_UNSPECIFIED;
  auto result = client.WatchJob(job_id, [&](const v1::JobEvent& event) {
    const v1::Job& job = event.job();
    const bool changed = job.state() != last_state;
    last_state = job.state();
    if (line.enabled()) {
      std::string text =
          absl::StrCat("job ", job.id(), ": ", StateName(job.state()));
      if (job.progress().tensors_total() > 0) {
        absl::StrAppend(&text, ", ", ProgressText(job.progress()));
      }
      line.Show(text, changed || client::IsFinal(job.state()));
    } else if (changed) {
      std::cerr << "job " << job.id() << ": " << StateName(job.state()) << "\n";
    }
  });
  line.Done();
  return result;
}

// Exit status for a finished job: 0 when it succeeded, otherwise 1 after
// printing its error.
int CheckJob(const v1::Job& job) {
  if (job.state() == v1::JOB_STATE_SUCCEEDED) return 0;
  if (job.state() == v1::JOB_STATE_CANCELLED) {
    return Fail(absl::CancelledError(
        job.error_message().empty()
            ? absl::StrCat("job ", job.id(), " was cancelled")
            : job.error_message()));
  }
  const absl::StatusCode code =
      job.error_code() == 0 ? absl::StatusCode::kUnknown
                            : static_cast<absl::StatusCode>(job.error_code());
  std::string message = job.error_message();
  if (message.empty()) message = absl::StrCat("job ", job.id(), " failed");
  return Fail(absl::Status(code, message));
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

struct Context {
  ClientOptions options;
  std::unique_ptr<Client> client;
};

// The file or directory name of `path`, also of "dir/" and "dir/.".
std::string LastComponent(const std::string& path) {
  std::filesystem::path normal = std::filesystem::path(path).lexically_normal();
  if (!normal.has_filename()) normal = normal.parent_path();
  return normal.filename().string();
}

int RunUpload(Context& ctx, const Args& args) {
  if (args.positional.size() != 2) {
    return UsageError("upload", "upload takes a kind and a path");
  }
  const std::string& kind_name = args.positional[0];
  v1::ArtifactKind kind;
  if (kind_name == "weights") {
    kind = v1::ARTIFACT_KIND_WEIGHTS;
  } else if (kind_name == "gram") {
    kind = v1::ARTIFACT_KIND_GRAM;
  } else if (kind_name == "fisher") {
    kind = v1::ARTIFACT_KIND_FISHER;
  } else {
    return UsageError("upload", absl::StrCat("unknown kind '", kind_name,
                                             "' (weights, gram or fisher)"));
  }
  if (kind == v1::ARTIFACT_KIND_WEIGHTS && args.Has("--for")) {
    return UsageError("upload", "--for applies to gram and fisher uploads");
  }
  const std::string& path = args.positional[1];
  const std::string name = args.Value("--name", LastComponent(path));
  StatusLine line;
  auto artifact = ctx.client->Upload(kind, path, name, args.Value("--for"),
                                     line.Transfer("upload " + name), "",
                                     args.Has("--dedup"));
  line.Done();
  if (!artifact.ok()) return Fail(artifact.status());
  std::cout << artifact->id() << std::endl;
  return 0;
}

int RunLs(Context& ctx, const Args& args) {
  if (!args.positional.empty())
    return UsageError("ls", "ls takes no arguments");
  auto response = ctx.client->ListArtifacts();
  if (!response.ok()) return Fail(response.status());
  std::vector<std::vector<std::string>> rows = {
      {"ID", "KIND", "NAME", "SIZE", "SHA256"}};
  for (const v1::Artifact& artifact : response->artifacts()) {
    rows.push_back({artifact.id(), KindName(artifact.kind()), artifact.name(),
                    absl::StrCat(artifact.size_bytes()),
                    artifact.sha256().substr(0, 12)});
  }
  PrintTable(rows);
  return 0;
}

int RunShow(Context& ctx, const Args& args) {
  if (args.positional.size() != 1)
    return UsageError("show", "show takes one ID");
  auto artifact = ctx.client->GetArtifact(args.positional[0]);
  if (!artifact.ok()) return Fail(artifact.status());
  std::vector<std::vector<std::string>> rows = {
      {"id:", artifact->id()},
      {"kind:", KindName(artifact->kind())},
      {"name:", artifact->name()},
      {"owner:", artifact->owner()},
      {"size:", absl::StrCat(artifact->size_bytes(), " bytes (",
                             FormatBytes(artifact->size_bytes()), ")")},
      {"sha256:", artifact->sha256()},
      {"created:", FormatTime(artifact->created_at())},
      {"parameters:", absl::StrCat(artifact->parameter_count())},
      {"dtypes:", absl::StrJoin(artifact->dtypes(), ", ")},
  };
  if (!artifact->describes().empty()) {
    rows.push_back({"describes:", artifact->describes()});
  }
  if (!artifact->produced_by_job().empty()) {
    rows.push_back({"produced by:", artifact->produced_by_job()});
  }
  PrintTable(rows);
  std::cout << "files: " << artifact->files_size() << "\n";
  std::vector<std::vector<std::string>> files;
  for (const v1::ModelFile& file : artifact->files()) {
    files.push_back({"  " + file.name(), absl::StrCat(file.size_bytes()),
                     file.sha256().substr(0, 12)});
  }
  PrintTable(files);
  // Sorted: protobuf maps have no order.
  std::map<std::string, std::string> metadata(artifact->metadata().begin(),
                                              artifact->metadata().end());
  std::cout << "metadata:" << (metadata.empty() ? " (none)" : "") << "\n";
  for (const auto& [key, value] : metadata) {
    std::cout << "  " << key << ": " << value << "\n";
  }
  const int64_t count = artifact->tensor_count() > 0 ? artifact->tensor_count()
                                                     : artifact->tensors_size();
  std::cout << "tensors: " << count << "\n";
  std::vector<std::vector<std::string>> tensors;
  for (const v1::TensorInfo& tensor : artifact->tensors()) {
    tensors.push_back(
        {"  " + tensor.name(), DTypeName(tensor.dtype()),
         absl::StrCat("[", absl::StrJoin(tensor.shape(), ", "), "]")});
  }
  PrintTable(tensors);
  return 0;
}

// Parses "ID", "ID:W" or "ID:W:D" (W may be empty: "ID::D") into `model`.
absl::Status ParseModel(const std::string& text, v1::MergeModel* model) {
  const std::vector<std::string> parts = absl::StrSplit(text, ':');
  if (parts.size() > 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("too many ':' in --model ", text, " (want ID[:W[:D]])"));
  }
  model->set_weights_id(parts[0]);
  if (model->weights_id().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("empty id in --model ", text));
  }
  if (parts.size() > 1 && !parts[1].empty()) {
    double coefficient;
    if (!absl::SimpleAtod(parts[1], &coefficient) ||
        !std::isfinite(coefficient) || coefficient <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad weight '", parts[1], "' in --model ", text,
                       " (want a positive number)"));
    }
    model->set_coefficient(coefficient);
  }
  if (parts.size() > 2) {
    double density;
    if (!absl::SimpleAtod(parts[2], &density) || !(density > 0) ||
        density > 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad density '", parts[2], "' in --model ", text,
                       " (want a number in (0, 1])"));
    }
    model->set_density(density);
  }
  return absl::OkStatus();
}

// The value of flag `flag` as a finite number, if given.
absl::StatusOr<std::optional<double>> NumberFlag(const Args& args,
                                                 const std::string& flag) {
  if (!args.Has(flag)) return std::nullopt;
  double value;
  if (!absl::SimpleAtod(args.Value(flag), &value) || !std::isfinite(value)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad ", flag, " '", args.Value(flag), "'"));
  }
  return value;
}

// A size as the Hub writes them: bytes, or a number with KB, MB, GB, TB
// (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024).
absl::StatusOr<int64_t> ParseSize(absl::string_view text) {
  static const std::vector<std::pair<std::string, double>> kUnits = {
      {"KiB", 1024.0},
      {"MiB", 1024.0 * 1024},
      {"GiB", 1024.0 * 1024 * 1024},
      {"TiB", 1024.0 * 1024 * 1024 * 1024},
      {"KB", 1e3},
      {"MB", 1e6},
      {"GB", 1e9},
      {"TB", 1e12},
      {"B", 1.0}};
  double scale = 1.0;
  absl::string_view number = text;
  for (const auto& [unit, factor] : kUnits) {
    if (absl::EndsWithIgnoreCase(text, unit)) {
      number = text.substr(0, text.size() - unit.size());
      scale = factor;
      break;
    }
  }
  double value = 0;
  if (!absl::SimpleAtod(number, &value) || !std::isfinite(value) ||
      value * scale < 1 || value * scale > 9e18) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad size '", text,
                     "' (bytes, or a number with KB, MB, GB, KiB, ...)"));
  }
  return static_cast<int64_t>(value * scale);
}

// Sets the output options of a job from --shard-size, --config-from and
// --out-dtype; a usage error's message otherwise.
absl::Status SetOutputOptions(const Args& args, v1::OutputOptions* output) {
  if (args.Has("--shard-size")) {
    absl::StatusOr<int64_t> bytes = ParseSize(args.Value("--shard-size"));
    if (!bytes.ok()) return bytes.status();
    output->set_shard_size_bytes(*bytes);
  }
  if (args.Has("--config-from")) {
    int32_t index;
    if (!absl::SimpleAtoi(args.Value("--config-from"), &index)) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad --config-from '", args.Value("--config-from"),
                       "' (want an input number, from 0)"));
    }
    output->set_config_from(index);
  }
  if (args.Has("--out-dtype")) {
    static const std::map<std::string, v1::DType> kDTypes = {
        {"float16", v1::DTYPE_F16},
        {"bfloat16", v1::DTYPE_BF16},
        {"float32", v1::DTYPE_F32},
        {"float64", v1::DTYPE_F64}};
    auto found = kDTypes.find(args.Value("--out-dtype"));
    if (found == kDTypes.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown --out-dtype '", args.Value("--out-dtype"),
                       "' (float16, bfloat16, float32 or float64)"));
    }
    output->set_out_dtype(found->second);
  }
  return absl::OkStatus();
}

// Submits the job, prints its id (the last line scripts capture) and follows
// it to the end with progress on stderr. 0 and the final job in `*done` if
// it succeeded; the exit code otherwise (the failure already printed).
int SubmitAndFollow(Context& ctx, const v1::SubmitJobRequest& request,
                    v1::Job* done) {
  auto job = ctx.client->SubmitJob(request);
  if (!job.ok()) return Fail(job.status());
  std::cout << job->id() << std::endl;
  auto final_job = WatchWithProgress(*ctx.client, job->id());
  if (!final_job.ok()) return Fail(final_job.status());
  if (const int code = CheckJob(*final_job); code != 0) return code;
  *done = *std::move(final_job);
  return 0;
}

// Downloads artifact `id` with progress: its one .safetensors file to
// `path` where that ends in .safetensors, else the model directory into
// `path`; 0 or the exit code.
int DownloadTo(Context& ctx, const std::string& id, const std::string& path) {
  StatusLine line;
  absl::StatusOr<int64_t> bytes;
  if (absl::EndsWith(path, ".safetensors")) {
    auto downloaded =
        ctx.client->Download(id, path, line.Transfer("download " + id));
    bytes = downloaded.ok() ? absl::StatusOr<int64_t>(downloaded->size_bytes())
                            : downloaded.status();
  } else {
    auto downloaded =
        ctx.client->DownloadModel(id, path, line.Transfer("download " + id));
    bytes = downloaded.ok() ? absl::StatusOr<int64_t>(downloaded->size_bytes())
                            : downloaded.status();
  }
  line.Done();
  if (!bytes.ok()) return Fail(bytes.status());
  std::cerr << "wrote " << path << " (" << FormatBytes(*bytes) << ", artifact "
            << id << ")\n";
  return 0;
}

int RunMerge(Context& ctx, const Args& args) {
  if (!args.positional.empty()) {
    return UsageError("merge", absl::StrCat("unexpected argument '",
                                            args.positional[0], "'"));
  }
  v1::SubmitJobRequest request;
  v1::MergeSpec* spec = request.mutable_merge();
  const std::string method = args.Value("--method");
  v1::MergeMethod parsed;
  if (method.empty()) return UsageError("merge", "merge needs --method");
  if (!v1::MergeMethod_Parse("MERGE_METHOD_" + absl::AsciiStrToUpper(method),
                             &parsed) ||
      parsed == v1::MERGE_METHOD_UNSPECIFIED || method != MethodName(parsed)) {
    return UsageError("merge", absl::StrCat("unknown method '", method, "'"));
  }
  spec->set_method(parsed);
  // Parameters of the methods (alpha RegMean's, the rest the task-vector
  // methods'); the server refuses those the method does not use.
  spec->set_base_id(args.Value("--base"));
  using Setter = void (v1::MergeSpec::*)(double);
  const std::pair<const char*, Setter> numbers[] = {
      {"--alpha", &v1::MergeSpec::set_alpha},
      {"--lambda", &v1::MergeSpec::set_lambda},
      {"--density", &v1::MergeSpec::set_density},
      {"--t", &v1::MergeSpec::set_t}};
  for (const auto& [flag, set] : numbers) {
    absl::StatusOr<std::optional<double>> value = NumberFlag(args, flag);
    if (!value.ok()) return UsageError("merge", value.status().message());
    if (value->has_value()) (spec->*set)(**value);
  }
  if (args.Has("--seed")) {
    uint64_t seed;
    if (!absl::SimpleAtoi(args.Value("--seed"), &seed)) {
      return UsageError("merge",
                        absl::StrCat("bad --seed '", args.Value("--seed"),
                                     "' (want an integer >= 0)"));
    }
    spec->set_seed(seed);
  }
  spec->set_no_normalize(args.Has("--no-normalize"));
  if (args.Has("--rescale")) {
    const std::string rescale = args.Value("--rescale");
    if (rescale == "inverse-density") {
      spec->set_rescale(v1::DARE_RESCALE_INVERSE_DENSITY);
    } else if (rescale == "l1") {
      spec->set_rescale(v1::DARE_RESCALE_L1);
    } else {
      return UsageError("merge", absl::StrCat("unknown --rescale '", rescale,
                                              "' (inverse-density or l1)"));
    }
  }
  if (args.Has("--precision")) {
    const std::string precision = args.Value("--precision");
    if (precision == "float64") {
      spec->set_precision(v1::PRECISION_FLOAT64);
    } else if (precision == "float32") {
      spec->set_precision(v1::PRECISION_FLOAT32);
    } else {
      return UsageError("merge",
                        absl::StrCat("unknown --precision '", precision,
                                     "' (float64 or float32)"));
    }
  }
  const std::vector<std::string> models = args.Values("--model");
  const std::vector<std::string> grams = args.Values("--gram");
  const std::vector<std::string> fishers = args.Values("--fisher");
  if (models.empty()) return UsageError("merge", "merge needs --model");
  if (grams.size() > models.size() || fishers.size() > models.size()) {
    return UsageError("merge",
                      "more --gram or --fisher than --model (the i-th "
                      "statistic belongs to the i-th model)");
  }
  for (size_t i = 0; i < models.size(); ++i) {
    v1::MergeModel* model = spec->add_models();
    if (absl::Status status = ParseModel(models[i], model); !status.ok()) {
      return UsageError("merge", status.message());
    }
    if (i < grams.size()) model->set_gram_id(grams[i]);
    if (i < fishers.size()) model->set_fisher_id(fishers[i]);
  }
  for (const std::string& pattern : args.Values("--exclude")) {
    spec->add_exclude(pattern);
  }
  if (args.Has("--take-excluded-from")) {
    int32_t index;
    if (!absl::SimpleAtoi(args.Value("--take-excluded-from"), &index) ||
        index < 0) {
      return UsageError("merge",
                        absl::StrCat("bad --take-excluded-from '",
                                     args.Value("--take-excluded-from"),
                                     "' (want a model number, 1-based)"));
    }
    spec->set_take_excluded_from(index);
  }
  if (args.Has("--gram-normalization")) {
    const std::string normalization = args.Value("--gram-normalization");
    if (normalization == "as-uploaded") {
      spec->set_gram_normalization(v1::GRAM_NORMALIZATION_AS_UPLOADED);
    } else if (normalization == "mean") {
      spec->set_gram_normalization(v1::GRAM_NORMALIZATION_MEAN);
    } else {
      return UsageError("merge", absl::StrCat("unknown --gram-normalization '",
                                              normalization, "'"));
    }
  }
  spec->set_result_name(args.Value("--name"));
  if (absl::Status output = SetOutputOptions(args, spec->mutable_output());
      !output.ok()) {
    return UsageError("merge", std::string(output.message()));
  }
  const bool has_out = args.Has("--out");
  const std::string out = args.Value("--out");
  if (has_out && out.empty()) return UsageError("merge", "empty --out");

  auto job = ctx.client->SubmitJob(request);
  if (!job.ok()) return Fail(job.status());
  std::cout << job->id() << std::endl;
  if (!args.Has("--watch") && !has_out) return 0;

  auto final_job = WatchWithProgress(*ctx.client, job->id());
  if (!final_job.ok()) return Fail(final_job.status());
  if (const int code = CheckJob(*final_job); code != 0) return code;
  if (!has_out) return 0;
  if (final_job->result_ids().empty()) {
    return Fail(absl::InternalError(
        absl::StrCat("job ", job->id(), " succeeded without a result")));
  }
  return DownloadTo(ctx, final_job->result_ids(0), out);
}

int RunGrow(Context& ctx, const Args& args) {
  if (!args.positional.empty()) {
    return UsageError(
        "grow", absl::StrCat("unexpected argument '", args.positional[0], "'"));
  }
  v1::SubmitJobRequest request;
  v1::GrowSpec* spec = request.mutable_grow();
  spec->set_a_id(args.Value("--a"));
  spec->set_b_id(args.Value("--b"));
  spec->set_layout(args.Value("--layout"));
  spec->set_result_name(args.Value("--name"));
  const std::string out = args.Value("--out");
  if (spec->a_id().empty() || spec->layout().empty() || out.empty()) {
    return UsageError("grow", "grow needs --a ID, --layout L and --out DIR");
  }
  if (absl::Status output = SetOutputOptions(args, spec->mutable_output());
      !output.ok()) {
    return UsageError("grow", std::string(output.message()));
  }
  if (args.Has("--noise")) {
    double noise = 0;
    if (!absl::SimpleAtod(args.Value("--noise"), &noise)) {
      return UsageError("grow", "--noise must be a number");
    }
    spec->set_noise_scale(noise);
  }
  if (args.Has("--rules")) {
    std::ifstream in(args.Value("--rules"));
    if (!in) {
      return Fail(absl::NotFoundError(
          absl::StrCat("cannot read --rules ", args.Value("--rules"))));
    }
    spec->set_rules(std::string(std::istreambuf_iterator<char>(in), {}));
  }
  v1::Job done;
  if (const int code = SubmitAndFollow(ctx, request, &done); code != 0) {
    return code;
  }
  if (const int code = DownloadTo(ctx, done.result_ids(0), out); code != 0) {
    return code;
  }
  std::cerr << "report: " << done.report_json() << "\n";
  return 0;
}

// `name` if it is one plain file name (no '/', no control character, not
// "." or "..", at most 200 bytes), else `fallback`.
std::string SafeFileName(const std::string& name, const std::string& fallback) {
  bool safe =
      !name.empty() && name.size() <= 200 && name != "." && name != "..";
  for (char c : name) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f || c == '/' || c == '\\') safe = false;
  }
  return safe ? name : fallback;
}

int RunSweep(Context& ctx, const Args& args) {
  if (!args.positional.empty()) {
    return UsageError("sweep", absl::StrCat("unexpected argument '",
                                            args.positional[0], "'"));
  }
  v1::SubmitJobRequest request;
  v1::SweepSpec* spec = request.mutable_sweep();
  spec->set_a_id(args.Value("--a"));
  spec->set_b_id(args.Value("--b"));
  spec->set_result_name(args.Value("--name"));
  const std::string out = args.Value("--out");
  if (spec->a_id().empty() || spec->b_id().empty() || out.empty()) {
    return UsageError("sweep", "sweep needs --a ID, --b ID and --out DIR");
  }
  int steps = 0;
  if (!absl::SimpleAtoi(args.Value("--steps"), &steps)) {
    return UsageError("sweep", "--steps must be an integer");
  }
  spec->set_steps(steps);
  if (absl::Status output = SetOutputOptions(args, spec->mutable_output());
      !output.ok()) {
    return UsageError("sweep", std::string(output.message()));
  }
  std::error_code error;
  std::filesystem::create_directories(out, error);
  if (error) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("cannot create --out ", out, ": ", error.message())));
  }
  v1::Job done;
  if (const int code = SubmitAndFollow(ctx, request, &done); code != 0) {
    return code;
  }
  for (const std::string& id : done.result_ids()) {
    auto artifact = ctx.client->GetArtifact(id);
    if (!artifact.ok()) return Fail(artifact.status());
    // The name comes from the server: a directory name inside --out, or
    // the id.
    const std::string path =
        (std::filesystem::path(out) / SafeFileName(artifact->name(), id))
            .string();
    if (const int code = DownloadTo(ctx, id, path); code != 0) return code;
  }
  return 0;
}

int RunHealth(Context& ctx, const Args& args) {
  if (!args.positional.empty()) {
    return UsageError("health", "health takes no arguments");
  }
  auto status = ctx.client->CheckHealth(args.Value("--service"));
  if (!status.ok()) return Fail(status.status());
  std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(
                   *status)
            << "\n";
  return *status == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

int RunJobs(Context& ctx, const Args& args) {
  if (!args.positional.empty()) {
    return UsageError("jobs", "jobs takes no arguments");
  }
  auto response = ctx.client->ListJobs();
  if (!response.ok()) return Fail(response.status());
  std::vector<std::vector<std::string>> rows = {
      {"ID", "KIND", "STATE", "PROGRESS", "RUNNER", "ATTEMPT", "CREATED",
       "RESULT"}};
  for (const v1::Job& job : response->jobs()) {
    rows.push_back({job.id(), JobKind(job), StateName(job.state()),
                    ProgressText(job.progress()),
                    job.runner().empty() ? "-" : job.runner(),
                    job.attempt() > 0 ? std::to_string(job.attempt()) : "-",
                    FormatTime(job.created_at()),
                    job.result_ids().empty()
                        ? "-"
                        : absl::StrJoin(job.result_ids(), ",")});
  }
  PrintTable(rows);
  return 0;
}

int RunWatch(Context& ctx, const Args& args) {
  if (args.positional.size() != 1) {
    return UsageError("watch", "watch takes one job id");
  }
  auto job = WatchWithProgress(*ctx.client, args.positional[0]);
  if (!job.ok()) return Fail(job.status());
  if (const int code = CheckJob(*job); code != 0) return code;
  for (const std::string& id : job->result_ids()) std::cout << id << "\n";
  return 0;
}

int RunCancel(Context& ctx, const Args& args) {
  if (args.positional.size() != 1) {
    return UsageError("cancel", "cancel takes one job id");
  }
  auto job = ctx.client->CancelJob(args.positional[0]);
  if (!job.ok()) return Fail(job.status());
  std::cout << job->id() << " " << StateName(job->state()) << "\n";
  return 0;
}

int RunDownload(Context& ctx, const Args& args) {
  if (args.positional.size() != 1) {
    return UsageError("download", "download takes one artifact id");
  }
  const std::string out = args.Value("--out");
  if (out.empty()) {
    return UsageError("download",
                      "download needs --out DIR (or FILE.safetensors)");
  }
  return DownloadTo(ctx, args.positional[0], out);
}

int RunRm(Context& ctx, const Args& args) {
  if (args.positional.size() != 1) {
    return UsageError("rm", "rm takes one artifact id");
  }
  v1::DeleteArtifactRequest request;
  request.set_id(args.positional[0]);
  auto deleted = ctx.client->DeleteArtifact(request);
  if (!deleted.ok()) return Fail(deleted.status());
  std::cout << "deleted " << request.id() << "\n";
  return 0;
}

int RunShare(Context& ctx, const Args& args) {
  if (args.positional.size() != 1) {
    return UsageError("share", "share takes one artifact id");
  }
  v1::ShareArtifactRequest request;
  request.set_id(args.positional[0]);
  request.set_organization(args.Value("--with"));
  request.set_revoke(args.Has("--revoke"));
  if (request.organization().empty()) {
    return UsageError("share", "share needs --with ORG");
  }
  auto shared = ctx.client->ShareArtifact(request);
  if (!shared.ok()) return Fail(shared.status());
  std::cout << (request.revoke() ? "revoked " : "shared ") << request.id()
            << (request.revoke() ? " from " : " with ")
            << request.organization() << "\n";
  return 0;
}

int RunHelp(Context&, const Args&) {
  std::cout << UsageText();
  return 0;
}

// Every command: its usage, what it does, how it runs and its options. The
// help text and each command's usage line are made from this one table.
struct Command {
  std::string name;
  // The arguments after the command's name; "\n" breaks the line.
  std::string synopsis;
  // What it does; "\n" breaks the line.
  std::string summary;
  int (*run)(Context&, const Args&);
  OptionSpec options;
};

const std::vector<Command>& Commands() {
  static const auto* commands = new std::vector<Command>{
      {"upload",
       "weights|gram|fisher PATH [--name N] [--for ID] [--dedup]",
       "upload a safetensors file or a model directory (shards,\n"
       "index, config and tokenizer files), reading it once; prints\n"
       "the artifact id. --dedup hashes it first, so that the same\n"
       "content under the same name (from any path or process)\n"
       "resumes or reuses one upload (always done under 64 MiB)",
       RunUpload,
       {{"--name", "--for"}, {"--dedup"}, {}}},
      {"ls", "", "list artifacts", RunLs, {}},
      {"show", "ID", "show an artifact: metadata and tensors", RunShow, {}},
      {"rm",
       "ID",
       "delete an artifact you own (refused while a job uses it)",
       RunRm,
       {}},
      {"share",
       "ID --with ORG [--revoke]",
       "grant (or revoke) another organisation read access",
       RunShare,
       {{"--with"}, {"--revoke"}, {}}},
      {"merge",
       "--method average|weighted|fisher|regmean|task_arithmetic|ties|\n"
       "dare_linear|dare_ties|slerp|model_stock --model ID[:W[:D]]...\n"
       "[--gram ID]... [--fisher ID]... [--alpha A] [--exclude REGEX]...\n"
       "[--take-excluded-from K] [--gram-normalization as-uploaded|mean]\n"
       "[--base ID] [--lambda L] [--density D] [--seed S] [--t T]\n"
       "[--no-normalize] [--rescale inverse-density|l1]\n"
       "[--precision float64|float32] [--name N] [--shard-size SIZE]\n"
       "[--config-from K]\n"
       "[--out-dtype float16|bfloat16|float32|float64]\n"
       "[--watch] [--out DIR|FILE.safetensors]",
       "submit a merge job; prints the job id. The i-th --gram and\n"
       "--fisher belong to the i-th --model. The task-vector methods\n"
       "merge the models' differences to --base (slerp: two models, or\n"
       "one and --base); W weights a model, D is its density (ties,\n"
       "dare_*). The result is a Hugging Face model directory in shards\n"
       "of --shard-size (default 5GB) with the side files of model K\n"
       "(--config-from, default the base or the first). RegMean's\n"
       "--precision float32 is about 2x faster, output error <= 1e-5.\n"
       "--watch waits\n"
       "for the job; --out waits and downloads the result",
       RunMerge,
       {{"--method",
         "--model",
         "--gram",
         "--fisher",
         "--alpha",
         "--exclude",
         "--take-excluded-from",
         "--gram-normalization",
         "--name",
         "--out",
         "--base",
         "--lambda",
         "--density",
         "--seed",
         "--t",
         "--rescale",
         "--shard-size",
         "--config-from",
         "--out-dtype",
         "--precision"},
        {"--watch", "--no-normalize"},
        {"--model", "--gram", "--fisher", "--exclude"}}},
      {"grow",
       "--a ID [--b ID] --layout mlp|bert|gpt2|rules [--rules FILE]\n"
       "[--noise S] [--name N] [--shard-size SIZE] [--config-from 0|1]\n"
       "[--out-dtype D] --out DIR|FILE.safetensors",
       "grow a wider model from A and B (or A alone) by Deep Fusion;\n"
       "prints the job id, waits, writes the model (its config.json\n"
       "with the grown widths) and the report (new config, properties\n"
       "that hold) to stderr",
       RunGrow,
       {{"--a", "--b", "--layout", "--rules", "--noise", "--name", "--out",
         "--shard-size", "--config-from", "--out-dtype"},
        {},
        {}}},
      {"sweep",
       "--a ID --b ID --steps K --out DIR [--name N] [--shard-size SIZE]\n"
       "[--config-from 0|1] [--out-dtype D]",
       "submit an interpolation sweep: the K models (1-t)A + tB,\n"
       "t = 0, 1/(K-1), ..., 1; prints the job id, waits, and\n"
       "writes each model directory to DIR/NAME-tT",
       RunSweep,
       {{"--a", "--b", "--steps", "--out", "--name", "--shard-size",
         "--config-from", "--out-dtype"},
        {},
        {}}},
      {"jobs", "", "list jobs", RunJobs, {}},
      {"watch",
       "JOB",
       "follow a job until it ends; prints its result ids",
       RunWatch,
       {}},
      {"cancel", "JOB", "cancel a job", RunCancel, {}},
      {"download",
       "ID --out DIR|FILE.safetensors",
       "download a model directory (or its one .safetensors file)",
       RunDownload,
       {{"--out"}, {}, {}}},
      {"health",
       "[--service S]",
       "check the server's grpc.health.v1 status; exit 0 when\n"
       "SERVING (for container health checks)",
       RunHealth,
       {{"--service"}, {}, {}}},
      {"help", "", "show this text", RunHelp, {}},
  };
  return *commands;
}

const Command* FindCommand(const std::string& name) {
  for (const Command& command : Commands()) {
    if (command.name == name) return &command;
  }
  return nullptr;
}

std::string CommandUsage(const std::string& name) {
  const Command* command = FindCommand(name);
  if (command == nullptr) return "";
  std::string synopsis = command->synopsis;
  for (char& c : synopsis) {
    if (c == '\n') c = ' ';
  }
  return absl::StrCat("amalgam ", name, synopsis.empty() ? "" : " ", synopsis);
}

std::string UsageText() {
  std::string text =
      "usage: amalgam [--server ADDR] [--token T] COMMAND [ARGS]\n\n"
      "Options (before COMMAND):\n"
      "  --server ADDR   amalgamd address (default $AMALGAM_SERVER, else "
      "127.0.0.1:50051)\n"
      "  --token T       bearer token (default $AMALGAM_TOKEN)\n"
      "  --tls-ca F      TLS: PEM of the server's CA (default "
      "$AMALGAM_TLS_CA)\n"
      "  --tls-cert F --tls-key F\n"
      "                  mutual TLS: this client's certificate and key\n"
      "                  (default $AMALGAM_TLS_CERT, $AMALGAM_TLS_KEY)\n\n"
      "Commands:\n";
  constexpr size_t kColumn = 18;
  for (const Command& command : Commands()) {
    const std::string first = absl::StrCat("  ", command.name);
    const std::string indent(first.size() + 1, ' ');
    std::vector<std::string> synopsis =
        absl::StrSplit(command.synopsis, '\n', absl::SkipEmpty());
    std::string head = first;
    for (size_t i = 0; i < synopsis.size(); ++i) {
      absl::StrAppend(&head, i == 0 ? " " : absl::StrCat("\n", indent),
                      synopsis[i]);
    }
    std::vector<std::string> summary = absl::StrSplit(command.summary, '\n');
    size_t line = 0;
    if (synopsis.size() <= 1 && head.size() < kColumn) {
      // A short command shares its first line with the summary.
      absl::StrAppend(&text, head, std::string(kColumn - head.size(), ' '),
                      summary[line++], "\n");
    } else {
      absl::StrAppend(&text, head, "\n");
    }
    for (; line < summary.size(); ++line) {
      absl::StrAppend(&text, std::string(kColumn, ' '), summary[line], "\n");
    }
  }
  return text;
}

std::string EnvOr(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' ? std::string(value) : fallback;
}

int Main(int argc, char** argv) {
  ClientOptions options;
  options.address = EnvOr("AMALGAM_SERVER", kDefaultServer);
  options.token = EnvOr("AMALGAM_TOKEN", "");
  options.tls_ca = EnvOr("AMALGAM_TLS_CA", "");
  options.tls_cert = EnvOr("AMALGAM_TLS_CERT", "");
  options.tls_key = EnvOr("AMALGAM_TLS_KEY", "");

  std::vector<std::string> rest(argv + 1, argv + argc);
  // Global options, up to the command.
  size_t i = 0;
  for (; i < rest.size() && !rest[i].empty() && rest[i][0] == '-'; ++i) {
    const std::string& arg = rest[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << UsageText();
      return 0;
    }
    std::string name = arg;
    std::string value;
    if (const size_t eq = arg.find('='); eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    } else if (arg == "--server" || arg == "--token" || arg == "--tls-ca" ||
               arg == "--tls-cert" || arg == "--tls-key") {
      if (i + 1 >= rest.size()) {
        return UsageError("", absl::StrCat("option ", arg, " needs a value"));
      }
      value = rest[++i];
    }
    if (name == "--server") {
      options.address = value;
    } else if (name == "--token") {
      options.token = value;
    } else if (name == "--tls-ca") {
      options.tls_ca = value;
    } else if (name == "--tls-cert") {
      options.tls_cert = value;
    } else if (name == "--tls-key") {
      options.tls_key = value;
    } else {
      return UsageError("", absl::StrCat("unknown option ", name));
    }
  }
  if (i >= rest.size()) return UsageError("", "no command given");
  const std::string command = rest[i];
  const std::vector<std::string> command_args(rest.begin() + i + 1, rest.end());
  const Command* found = FindCommand(command);
  if (found == nullptr) {
    return UsageError("", absl::StrCat("unknown command '", command, "'"));
  }
  auto args = ParseArgs(command_args, found->options);
  if (!args.ok()) return UsageError(command, args.status().message());
  if (args->help) {
    std::cout << "usage: " << CommandUsage(command) << "\n";
    return 0;
  }
  if (options.address.empty()) return UsageError("", "empty --server");

  Context ctx;
  ctx.options = options;
  if (found->run != RunHelp) {
    auto client = Client::Create(options);
    if (!client.ok()) return Fail(client.status());
    ctx.client = std::move(*client);
  }
  return found->run(ctx, *args);
}

}  // namespace
}  // namespace amalgam::client

int main(int argc, char** argv) { return amalgam::client::Main(argc, argv); }
