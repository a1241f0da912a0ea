#include "core/grow.h"

#include <ATen/ATen.h>
#include <re2/re2.h>

#include <algorithm>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/cpu_cache.h"
#include "core/model_files.h"
#include "core/status_macros.h"
#include "core/torch_util.h"
#include "nlohmann/json.hpp"

namespace amalgam::core {
namespace {

// Built-in layouts as rules (same format as user rules). Optional model
// prefixes as Hugging Face writes them.
constexpr char kGpt2Rules[] = R"(
(?:transformer\.)?w[tp]e\.weight                         embedding
(?:transformer\.)?h\.\d+\.ln_[12]\.(?:weight|bias)       norm
(?:transformer\.)?ln_f\.(?:weight|bias)                  norm
(?:transformer\.)?h\.\d+\.attn\.c_attn\.weight           qkv      conv1d
(?:transformer\.)?h\.\d+\.attn\.c_attn\.bias             qkv_bias
(?:transformer\.)?h\.\d+\.(?:attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight  hidden  conv1d
(?:transformer\.)?h\.\d+\.(?:attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.bias    concat
(?:transformer\.)?h\.\d+\.attn\.(?:bias|masked_bias)     copy
lm_head\.weight                                          output
)";

constexpr char kBertRules[] = R"(
(?:bert\.)?embeddings\.(?:word|position|token_type)_embeddings\.weight  embedding
(?:bert\.)?embeddings\.LayerNorm\.(?:weight|bias)                       norm
(?:bert\.)?encoder\.layer\.\d+\.attention\.self\.(?:query|key|value)\.weight  hidden
(?:bert\.)?encoder\.layer\.\d+\.attention\.self\.(?:query|key|value)\.bias    concat
(?:bert\.)?encoder\.layer\.\d+\.(?:attention\.output|intermediate|output)\.dense\.weight  hidden
(?:bert\.)?encoder\.layer\.\d+\.(?:attention\.output|intermediate|output)\.dense\.bias    concat
(?:bert\.)?encoder\.layer\.\d+\.(?:attention\.)?output\.LayerNorm\.(?:weight|bias)        norm
(?:bert\.)?pooler\.dense\.weight                                        hidden
(?:bert\.)?pooler\.dense\.bias                                          concat
classifier\.weight                                                      output
classifier\.bias                                                        average
)";

struct Rule {
  std::unique_ptr<RE2> pattern;
  GrowRole role;
  bool conv1d = false;
};

absl::StatusOr<GrowRole> ParseRole(const std::string& name) {
  static const auto* roles = new std::map<std::string, GrowRole>{
      {"input", GrowRole::kInput},         {"hidden", GrowRole::kHidden},
      {"output", GrowRole::kOutput},       {"concat", GrowRole::kConcat},
      {"norm", GrowRole::kNorm},           {"average", GrowRole::kAverage},
      {"embedding", GrowRole::kEmbedding}, {"qkv", GrowRole::kQkv},
      {"qkv_bias", GrowRole::kQkvBias},    {"copy", GrowRole::kCopy},
  };
  auto it = roles->find(name);
  if (it == roles->end()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown role '", name,
        "' (input, hidden, output, concat, norm, average, embedding, qkv, "
        "qkv_bias, copy)"));
  }
  return it->second;
}

absl::StatusOr<std::vector<Rule>> ParseRules(const std::string& text) {
  std::vector<Rule> rules;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = line.substr(0, line.find('#'));
    std::vector<std::string> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.empty()) continue;
    if (fields.size() > 3 || fields.size() < 2 ||
        (fields.size() == 3 && fields[2] != "conv1d")) {
      return absl::InvalidArgumentError(
          absl::StrCat("rules line ", line_number,
                       ": expected `REGEX ROLE [conv1d]`, got '", line, "'"));
    }
    Rule rule;
    rule.pattern = std::make_unique<RE2>(fields[0], RE2::Quiet);
    if (!rule.pattern->ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("rules line ", line_number, ": bad pattern '", fields[0],
                       "': ", rule.pattern->error()));
    }
    AMALGAM_ASSIGN_OR_RETURN(rule.role, ParseRole(fields[1]));
    rule.conv1d = fields.size() == 3;
    rules.push_back(std::move(rule));
  }
  if (rules.empty()) {
    return absl::InvalidArgumentError("the grow rules are empty");
  }
  return rules;
}

// Roles of an `mlp`: Linear layers `PREFIX<i>.weight` / `.bias` in index
// order; the first is the input layer, the last the output layer.
absl::Status MlpRoles(const SafetensorsReader& a,
                      std::map<std::string, std::pair<GrowRole, bool>>* roles,
                      std::vector<int64_t>* widths) {
  static const LazyRE2 kName = {R"((.*?)(\d+)\.(weight|bias))"};
  std::map<int64_t, std::pair<const TensorInfo*, const TensorInfo*>> layers;
  std::string prefix;
  bool first = true;
  for (const TensorInfo& t : a.tensors()) {
    std::string p, index_text, kind;
    int64_t index = 0;
    if (!RE2::FullMatch(t.name, *kName, &p, &index_text, &kind) ||
        !absl::SimpleAtoi(index_text, &index)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", t.name,
          "\" does not fit the mlp layout (PREFIX<index>.weight|bias)"));
    }
    if (!first && p != prefix) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor \"", t.name, "\" has prefix \"", p,
                       "\" but others have \"", prefix, "\""));
    }
    prefix = p;
    first = false;
    auto& layer = layers[index];
    (kind == "weight" ? layer.first : layer.second) = &t;
  }
  if (layers.empty()) return absl::InvalidArgumentError("no tensors");
  int64_t position = 0;
  const int64_t count = static_cast<int64_t>(layers.size());
  for (const auto& [index, layer] : layers) {
    const TensorInfo* weight = layer.first;
    if (weight == nullptr || weight->shape.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "layer ", prefix, index, " of the mlp layout needs a 2-D weight"));
    }
    if (position == 0) widths->push_back(weight->shape[1]);
    widths->push_back(weight->shape[0]);
    GrowRole weight_role = GrowRole::kHidden, bias_role = GrowRole::kConcat;
    if (count == 1) {
      // One layer: the mean of the two is the only function-keeping choice.
      weight_role = bias_role = GrowRole::kAverage;
    } else if (position == 0) {
      weight_role = GrowRole::kInput;
    } else if (position == count - 1) {
      weight_role = GrowRole::kOutput;
      bias_role = GrowRole::kAverage;
    }
    (*roles)[weight->name] = {weight_role, false};
    if (layer.second != nullptr) {
      (*roles)[layer.second->name] = {bias_role, false};
    }
    ++position;
  }
  return absl::OkStatus();
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// The output shape for `role`, or FAILED_PRECONDITION when A's and B's
// tensors cannot combine that way. Shapes in storage orientation.
absl::StatusOr<std::vector<int64_t>> GrownShape(const std::string& name,
                                                GrowRole role, bool conv1d,
                                                std::vector<int64_t> a,
                                                std::vector<int64_t> b) {
  auto refuse = [&](absl::string_view why) {
    return absl::FailedPreconditionError(
        absl::StrCat("tensor \"", name, "\" (", ShapeText(a), " in A, ",
                     ShapeText(b), " in B) cannot be grown: ", why));
  };
  const bool matrix_role = role == GrowRole::kInput ||
                           role == GrowRole::kHidden ||
                           role == GrowRole::kOutput || role == GrowRole::kQkv;
  if (matrix_role && (a.size() != 2 || b.size() != 2)) {
    return refuse("the role needs 2-D weights");
  }
  if (matrix_role && conv1d) {
    std::swap(a[0], a[1]);
    std::swap(b[0], b[1]);
  }
  std::vector<int64_t> out;
  switch (role) {
    case GrowRole::kInput:
      if (a[1] != b[1]) return refuse("input widths differ");
      out = {a[0] + b[0], a[1]};
      break;
    case GrowRole::kHidden:
      out = {a[0] + b[0], a[1] + b[1]};
      break;
    case GrowRole::kOutput:
      if (a[0] != b[0]) return refuse("output widths differ");
      out = {a[0], a[1] + b[1]};
      break;
    case GrowRole::kQkv:
      if (a[0] % 3 != 0 || b[0] % 3 != 0) {
        return refuse("packed q, k, v need a multiple of 3 outputs");
      }
      out = {a[0] + b[0], a[1] + b[1]};
      break;
    case GrowRole::kConcat:
    case GrowRole::kNorm:
    case GrowRole::kQkvBias:
      if (a.empty() || a.size() != b.size() ||
          !std::equal(a.begin() + 1, a.end(), b.begin() + 1)) {
        return refuse("only the first axis may differ");
      }
      if (role == GrowRole::kQkvBias && (a[0] % 3 != 0 || b[0] % 3 != 0)) {
        return refuse("packed q, k, v need a multiple of 3 entries");
      }
      out = a;
      out[0] += b[0];
      break;
    case GrowRole::kEmbedding:
      if (a.empty() || a.size() != b.size() ||
          !std::equal(a.begin(), a.end() - 1, b.begin())) {
        return refuse("only the last axis (the width) may differ");
      }
      out = a;
      out.back() += b.back();
      break;
    case GrowRole::kAverage:
    case GrowRole::kCopy:
      if (a != b) return refuse("the shapes must be equal");
      out = a;
      break;
  }
  if (matrix_role && conv1d) std::swap(out[0], out[1]);
  return out;
}

// 64-bit FNV-1a: a seed per tensor name, the same on every run.
uint64_t NameSeed(const std::string& name) {
  uint64_t hash = 1469598103934665603ull;
  for (unsigned char c : name) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return hash;
}

// [[a, noise], [noise, b]] for Linear-oriented a [oA, iA] and b [oB, iB].
at::Tensor BlockDiagonal(const at::Tensor& a, const at::Tensor& b,
                         double noise_scale, std::mt19937_64* rng) {
  const int64_t oa = a.size(0), ia = a.size(1);
  const int64_t ob = b.size(0), ib = b.size(1);
  at::Tensor out = at::zeros({oa + ob, ia + ib}, a.options());
  if (noise_scale > 0) {
    std::normal_distribution<double> normal(0.0, noise_scale);
    at::Tensor noise = at::empty({oa + ob, ia + ib}, at::kDouble);
    double* data = noise.data_ptr<double>();
    for (int64_t i = 0; i < noise.numel(); ++i) data[i] = normal(*rng);
    out.copy_(noise);
  }
  out.slice(0, 0, oa).slice(1, 0, ia).copy_(a);
  out.slice(0, oa).slice(1, ia).copy_(b);
  return out;
}

at::Tensor GrowOne(GrowRole role, bool conv1d, at::Tensor a, at::Tensor b,
                   double noise_scale, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const bool matrix_role = role == GrowRole::kInput ||
                           role == GrowRole::kHidden ||
                           role == GrowRole::kOutput || role == GrowRole::kQkv;
  if (matrix_role && conv1d) {
    a = a.t();
    b = b.t();
  }
  at::Tensor out;
  switch (role) {
    case GrowRole::kInput:
      out = at::cat({a, b}, 0);
      break;
    case GrowRole::kHidden:
      out = BlockDiagonal(a, b, noise_scale, &rng);
      break;
    case GrowRole::kOutput:
      // Exact in every float format: halving only changes the exponent.
      out = at::cat({a / 2, b / 2}, 1);
      break;
    case GrowRole::kQkv: {
      std::vector<at::Tensor> qkv_a = a.chunk(3, 0), qkv_b = b.chunk(3, 0);
      out = at::cat({BlockDiagonal(qkv_a[0], qkv_b[0], noise_scale, &rng),
                     BlockDiagonal(qkv_a[1], qkv_b[1], noise_scale, &rng),
                     BlockDiagonal(qkv_a[2], qkv_b[2], noise_scale, &rng)},
                    0);
      break;
    }
    case GrowRole::kQkvBias: {
      std::vector<at::Tensor> qkv_a = a.chunk(3, 0), qkv_b = b.chunk(3, 0);
      out = at::cat(
          {qkv_a[0], qkv_b[0], qkv_a[1], qkv_b[1], qkv_a[2], qkv_b[2]}, 0);
      break;
    }
    case GrowRole::kConcat:
    case GrowRole::kNorm:
      out = at::cat({a, b}, 0);
      break;
    case GrowRole::kEmbedding:
      out = at::cat({a, b}, a.dim() - 1);
      break;
    case GrowRole::kAverage:
      out = ((a.to(at::kDouble) + b.to(at::kDouble)) / 2).to(a.scalar_type());
      break;
    case GrowRole::kCopy:
      out = a;
      break;
  }
  if (matrix_role && conv1d) out = out.t();
  return out.contiguous();
}

// Reads an integer from both models' metadata (e.g. "n_head"); 0 if absent.
int64_t MetadataSum(const SafetensorsReader& a, const SafetensorsReader& b,
                    const std::string& key) {
  int64_t x = 0, y = 0;
  auto ia = a.metadata().find(key), ib = b.metadata().find(key);
  if (ia == a.metadata().end() || ib == b.metadata().end() ||
      !absl::SimpleAtoi(ia->second, &x) || !absl::SimpleAtoi(ib->second, &y)) {
    return 0;
  }
  return x + y;
}

// The grown model's config and what holds exactly, as JSON.
std::string Report(const GrowPlan& plan, const SafetensorsReader& a,
                   const SafetensorsReader& b, const GrowOptions& options,
                   bool self_fusion, const std::vector<int64_t>& mlp_widths) {
  nlohmann::json config = nlohmann::json::object();
  std::map<GrowRole, int> count;
  std::set<std::string> layers;
  static const LazyRE2 kLayer = {R"(.*?(?:\bh|layer)\.(\d+)\..*)"};
  for (const GrowTensor& t : plan.tensors) {
    ++count[t.role];
    std::string layer;
    if (RE2::FullMatch(t.info.name, *kLayer, &layer)) layers.insert(layer);
  }
  auto width_of = [&](const std::string& suffix) -> int64_t {
    for (const GrowTensor& t : plan.tensors) {
      if (t.role == GrowRole::kEmbedding &&
          t.info.name.size() >= suffix.size() &&
          t.info.name.compare(t.info.name.size() - suffix.size(), suffix.size(),
                              suffix) == 0) {
        return t.info.shape.back();
      }
    }
    return 0;
  };
  // The width along axis `axis` of the first tensor named `*suffix`.
  auto dim_of = [&](const std::string& suffix, size_t axis) -> int64_t {
    for (const GrowTensor& t : plan.tensors) {
      if (absl::EndsWith(t.info.name, suffix) && axis < t.info.shape.size()) {
        return t.info.shape[axis];
      }
    }
    return 0;
  };
  const bool transformer = options.layout == "gpt2" || options.layout == "bert";
  if (options.layout == "mlp") {
    config["widths"] = mlp_widths;
  } else if (options.layout == "gpt2") {
    config["n_embd"] = width_of("wte.weight");
    config["n_layer"] = layers.size();
    // Conv1D: [in, out].
    config["n_inner"] = dim_of("mlp.c_fc.weight", 1);
  } else if (options.layout == "bert") {
    config["hidden_size"] = width_of("word_embeddings.weight");
    config["num_hidden_layers"] = layers.size();
    config["intermediate_size"] = dim_of("intermediate.dense.weight", 0);
  }
  if (transformer) {
    const char* key =
        options.layout == "gpt2" ? "n_head" : "num_attention_heads";
    const int64_t heads = MetadataSum(a, b, key);
    if (heads > 0) {
      config[key] = heads;
    } else {
      config[key] = nullptr;
      config["heads_rule"] =
          "A's heads plus B's heads, head size unchanged (the models' "
          "metadata did not give head counts)";
    }
  }
  const bool exact = options.noise_scale == 0.0;
  const bool has_output =
      count[GrowRole::kOutput] > 0 || mlp_widths.size() == 2;
  const bool has_norm = count[GrowRole::kNorm] > 0;
  nlohmann::json properties;
  nlohmann::json caveats = nlohmann::json::array();
  properties["output_is_mean_of_inputs"] = exact && has_output && !has_norm;
  if (has_norm) {
    properties["output_is_mean_of_inputs_without_layernorm"] =
        exact && has_output;
    caveats.push_back(
        "LayerNorm normalises over the joint width, so the grown model's "
        "statistics mix A's and B's halves: the output is not their mean "
        "(it is with LayerNorm replaced by identity)");
  }
  if (transformer && !has_output) {
    caveats.push_back(
        "no untied output layer (lm_head/classifier): the output projection "
        "tied to the embeddings sums A's and B's logits instead of averaging");
  }
  if (!exact) {
    caveats.push_back(absl::StrCat(
        "noise of scale ", options.noise_scale,
        " in the off-diagonal blocks: function preservation is approximate"));
  }
  if (options.layout == "rules") {
    caveats.push_back(
        "roles come from user rules: the properties hold only if the rules "
        "match the architecture");
  }
  if (self_fusion) properties["self_fusion"] = true;
  nlohmann::json report = {
      {"layout", options.layout},           {"self_fusion", self_fusion},
      {"noise_scale", options.noise_scale}, {"config", config},
      {"properties", properties},           {"caveats", caveats},
  };
  return report.dump();
}

}  // namespace

absl::StatusOr<GrowPlan> PlanGrow(const SafetensorsReader& a,
                                  const SafetensorsReader* b_or_null,
                                  const GrowOptions& options) {
  const SafetensorsReader& b = b_or_null != nullptr ? *b_or_null : a;
  if (options.noise_scale < 0) {
    return absl::InvalidArgumentError("noise_scale must be >= 0");
  }
  // Role (and Conv1D flag) of every tensor of A.
  std::map<std::string, std::pair<GrowRole, bool>> roles;
  std::vector<int64_t> mlp_widths;
  if (options.layout == "mlp") {
    AMALGAM_RETURN_IF_ERROR(MlpRoles(a, &roles, &mlp_widths));
  } else {
    std::string text;
    if (options.layout == "gpt2") {
      text = kGpt2Rules;
    } else if (options.layout == "bert") {
      text = kBertRules;
    } else if (options.layout == "rules") {
      text = options.rules;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown layout '", options.layout,
                       "' (mlp, bert, gpt2, or rules with a rule file)"));
    }
    AMALGAM_ASSIGN_OR_RETURN(std::vector<Rule> rules, ParseRules(text));
    for (const TensorInfo& t : a.tensors()) {
      auto rule = std::find_if(rules.begin(), rules.end(), [&](const Rule& r) {
        return RE2::FullMatch(t.name, *r.pattern);
      });
      if (rule == rules.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor \"", t.name, "\" fits no rule of the ",
                         options.layout, " layout"));
      }
      roles[t.name] = {rule->role, rule->conv1d};
    }
  }
  GrowPlan plan;
  for (const TensorInfo& ta : a.tensors()) {
    const TensorInfo* tb = b.Find(ta.name);
    if (tb == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("model B has no tensor \"", ta.name, "\""));
    }
    if (tb->dtype != ta.dtype) {
      return absl::FailedPreconditionError(
          absl::StrCat("tensor \"", ta.name, "\" is ", DTypeName(ta.dtype),
                       " in A but ", DTypeName(tb->dtype), " in B"));
    }
    const auto [role, conv1d] = roles.at(ta.name);
    GrowTensor t;
    t.role = role;
    t.conv1d = conv1d;
    t.info.name = ta.name;
    t.info.dtype = ta.dtype;
    AMALGAM_ASSIGN_OR_RETURN(
        t.info.shape, GrownShape(ta.name, role, conv1d, ta.shape, tb->shape));
    t.info.numel = 1;
    for (int64_t d : t.info.shape) t.info.numel *= d;
    t.info.nbytes = static_cast<uint64_t>(t.info.numel) * DTypeSize(ta.dtype);
    t.out_dtype = options.out_dtype.value_or(t.info.dtype);
    t.out_nbytes = static_cast<uint64_t>(t.info.numel) * DTypeSize(t.out_dtype);
    plan.output_bytes += t.out_nbytes;
    plan.tensors.push_back(std::move(t));
  }
  for (const TensorInfo& tb : b.tensors()) {
    if (a.Find(tb.name) == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("model A has no tensor \"", tb.name, "\""));
    }
  }
  if (options.layout == "mlp") {
    // Grown widths: the hidden ones add up; input and output stay.
    std::vector<int64_t> b_widths;
    std::map<std::string, std::pair<GrowRole, bool>> unused;
    AMALGAM_RETURN_IF_ERROR(MlpRoles(b, &unused, &b_widths));
    for (size_t i = 1; i + 1 < mlp_widths.size(); ++i) {
      mlp_widths[i] += b_widths[i];
    }
  }
  plan.report_json =
      Report(plan, a, b, options, b_or_null == nullptr, mlp_widths);
  return plan;
}

absl::StatusOr<std::string> GrownConfigKeys(const GrowPlan& plan,
                                            const std::string& config_a,
                                            const std::string& config_b) {
  using Json = nlohmann::json;
  const Json report = Json::parse(plan.report_json);
  const Json& config = report.at("config");
  Json keys = Json::object();
  if (report.at("layout") != "bert" && report.at("layout") != "gpt2") {
    return keys.dump();
  }
  for (auto it = config.begin(); it != config.end(); ++it) {
    if (it.value().is_number_integer() && it.value().get<int64_t>() > 0) {
      keys[it.key()] = it.value();
    }
  }
  // Heads: A's plus B's, from their configs where the weights' metadata
  // had none.
  const char* heads =
      report.at("layout") == "gpt2" ? "n_head" : "num_attention_heads";
  if (!keys.contains(heads) && !config_a.empty() && !config_b.empty()) {
    AMALGAM_RETURN_IF_ERROR(CheckConfigJson(config_a));
    AMALGAM_RETURN_IF_ERROR(CheckConfigJson(config_b));
    const Json a = Json::parse(config_a), b = Json::parse(config_b);
    if (a.contains(heads) && b.contains(heads) &&
        a[heads].is_number_integer() && b[heads].is_number_integer()) {
      keys[heads] = a[heads].get<int64_t>() + b[heads].get<int64_t>();
    }
  }
  return keys.dump();
}

std::vector<TensorSpec> TensorSpecs(const GrowPlan& plan) {
  std::vector<TensorSpec> specs;
  specs.reserve(plan.tensors.size());
  for (const GrowTensor& t : plan.tensors) {
    specs.push_back(TensorSpec{t.info.name, t.out_dtype, t.info.shape});
  }
  return specs;
}

absl::Status ExecuteGrow(
    const GrowPlan& plan, const SafetensorsReader& a,
    const SafetensorsReader* b_or_null, const GrowOptions& options,
    const std::string& out_dir,
    const std::function<void(int64_t done, int64_t total)>& progress,
    const std::atomic<bool>* cancelled) {
  const SafetensorsReader& b = b_or_null != nullptr ? *b_or_null : a;
  std::vector<TensorSpec> specs = TensorSpecs(plan);
  // The tensors written: those of options.shard when it is set.
  const std::vector<size_t> work =
      ShardTensors(specs, options.shard_bytes, options.shard);
  AMALGAM_ASSIGN_OR_RETURN(
      std::unique_ptr<ModelWriter> writer,
      ModelWriter::Create(out_dir, std::move(specs),
                          {{"format", "pt"},
                           {"amalgam.method", "grow"},
                           {"amalgam.grow.report", plan.report_json}},
                          options.shard_bytes, options.shard));
  CpuCacheScope cache;  // same-shaped layers reuse their buffers
  const int64_t total = static_cast<int64_t>(work.size());
  int64_t done = 0;
  for (const size_t index : work) {
    const GrowTensor& t = plan.tensors[index];
    if (cancelled != nullptr && cancelled->load()) {
      return absl::CancelledError(absl::StrCat("grow cancelled after ", done,
                                               " of ", total, " tensors"));
    }
    const TensorInfo* ia = a.Find(t.info.name);
    const TensorInfo* ib = b.Find(t.info.name);
    if (ia == nullptr || ib == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "tensor \"", t.info.name, "\" is gone (the inputs changed)"));
    }
    AMALGAM_ASSIGN_OR_RETURN(
        at::Tensor out,
        GuardTorch(absl::StrCat("growing tensor \"", t.info.name, "\""),
                   [&]() -> absl::StatusOr<at::Tensor> {
                     const at::ScalarType type = ScalarTypeOf(t.info.dtype);
                     return GrowOne(t.role, t.conv1d,
                                    Load(a, *ia, type, at::kCPU),
                                    Load(b, *ib, type, at::kCPU),
                                    options.noise_scale, NameSeed(t.info.name))
                         .to(ScalarTypeOf(t.out_dtype))
                         .contiguous();
                   }));
    const uint64_t nbytes = out.numel() * out.element_size();
    if (nbytes != t.out_nbytes) {
      return absl::InternalError(
          absl::StrCat("grown tensor \"", t.info.name, "\" has ", nbytes,
                       " bytes, expected ", t.out_nbytes));
    }
    if (nbytes > 0) {
      AMALGAM_RETURN_IF_ERROR(writer->Append(absl::Span<const uint8_t>(
          static_cast<const uint8_t*>(out.data_ptr()), nbytes)));
    }
    a.Release(t.info.name);
    b.Release(t.info.name);
    ++done;
    if (progress) progress(done, total);
  }
  return writer->Finish();
}

}  // namespace amalgam::core
