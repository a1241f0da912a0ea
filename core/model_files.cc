#include "core/model_files.h"

#include <algorithm>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace amalgam::core {
namespace {

constexpr size_t kMaxFileNameBytes = 256;

bool IsPlainFileName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxFileNameBytes || name == "." ||
      name == "..") {
    return false;
  }
  return std::none_of(name.begin(), name.end(), [](char c) {
    const auto byte = static_cast<unsigned char>(c);
    return c == '/' || c == '\\' || byte < 0x20 || byte == 0x7f;
  });
}

}  // namespace

const std::vector<std::string>& SideFileNames() {
  static const auto* names =
      new std::vector<std::string>{"added_tokens.json",
                                   "chat_template.jinja",
                                   "config.json",
                                   "generation_config.json",
                                   "merges.txt",
                                   "preprocessor_config.json",
                                   "special_tokens_map.json",
                                   "tokenizer.json",
                                   "tokenizer.model",
                                   "tokenizer_config.json",
                                   "vocab.json",
                                   "vocab.txt"};
  return *names;
}

bool IsSideFile(absl::string_view name) {
  const std::vector<std::string>& names = SideFileNames();
  return std::find(names.begin(), names.end(), name) != names.end();
}

absl::StatusOr<ModelLayout> CheckModelFiles(
    const std::vector<std::string>& names) {
  ModelLayout layout;
  std::set<std::string> seen;
  bool indexed = false;
  for (const std::string& name : names) {
    if (!IsPlainFileName(name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "file name \"", absl::CHexEscape(name.substr(0, kMaxFileNameBytes)),
          "\" is not a plain file name of at most ", kMaxFileNameBytes,
          " bytes"));
    }
    if (!seen.insert(name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("file \"", name, "\" is listed twice"));
    }
    if (name == kIndexFileName) {
      indexed = true;
    } else if (absl::EndsWith(name, ".safetensors")) {
      layout.tensor_files.push_back(name);
    } else if (IsSideFile(name)) {
      layout.side_files.push_back(name);
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "file \"", name,
          "\" is not part of a Hugging Face model directory; accepted are "
          ".safetensors files, ",
          kIndexFileName, " and ", absl::StrJoin(SideFileNames(), ", ")));
    }
  }
  std::sort(layout.tensor_files.begin(), layout.tensor_files.end());
  std::sort(layout.side_files.begin(), layout.side_files.end());
  if (indexed) {
    layout.entry = kIndexFileName;
  } else if (layout.tensor_files.size() == 1) {
    layout.entry = layout.tensor_files.front();
  } else if (layout.tensor_files.empty()) {
    return absl::InvalidArgumentError("the model has no .safetensors file");
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "the model has several .safetensors files (",
        absl::StrJoin(layout.tensor_files, ", "), ") but no ", kIndexFileName));
  }
  return layout;
}

std::string ShardFileName(int index, int count) {
  return absl::StrFormat("model-%05d-of-%05d.safetensors", index + 1, count);
}

absl::Status CheckConfigJson(const std::string& text) {
  if (text.size() > kMaxConfigBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json has ", text.size(), " bytes; at most ",
                     kMaxConfigBytes, " are accepted"));
  }
  AMALGAM_RETURN_IF_ERROR(CheckJsonDepth(text, 16, "config.json"));
  const nlohmann::json root =
      nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!root.is_object()) {
    return absl::InvalidArgumentError("config.json is not a JSON object");
  }
  return absl::OkStatus();
}

const char* TorchDTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return "float16";
    case DType::kBF16:
      return "bfloat16";
    case DType::kF32:
      return "float32";
    case DType::kF64:
      return "float64";
  }
  return "float32";
}

absl::StatusOr<std::string> ResultConfig(const std::string& config,
                                         absl::string_view torch_dtype,
                                         const std::string& overrides) {
  using Json = nlohmann::json;
  AMALGAM_RETURN_IF_ERROR(CheckConfigJson(config));
  // A JSON object: CheckConfigJson said so.
  Json root = Json::parse(config, nullptr, /*allow_exceptions=*/false);
  const Json before = root;
  if (!torch_dtype.empty()) root["torch_dtype"] = std::string(torch_dtype);
  if (!overrides.empty()) {
    const Json changes =
        Json::parse(overrides, nullptr, /*allow_exceptions=*/false);
    if (!changes.is_object()) {
      return absl::InternalError("the config overrides are not a JSON object");
    }
    for (auto it = changes.begin(); it != changes.end(); ++it) {
      root[it.key()] = it.value();
    }
  }
  if (root == before) return config;
  return root.dump(2) + "\n";
}

}  // namespace amalgam::core
