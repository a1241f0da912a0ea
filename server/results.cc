#include "server/results.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model_files.h"
#include "core/model_writer.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "core/status_macros.h"
#include "server/blob_store.h"
#include "server/catalog.h"

namespace amalgam::server {
namespace {

namespace fs = std::filesystem;

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in) return absl::DataLossError("cannot read a side file of the input");
  return text.str();
}

absl::Status WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.flush();
  if (!out)
    return absl::InternalError("cannot write a side file of the result");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ResultOptions> ParseResultOptions(
    const v1::OutputOptions& output, const std::string& field) {
  ResultOptions options;
  if (output.shard_size_bytes() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".shard_size_bytes is ", output.shard_size_bytes(),
                     "; must be positive (0: 5 GB)"));
  }
  options.shard_bytes = output.shard_size_bytes() == 0
                            ? core::kDefaultShardBytes
                            : static_cast<uint64_t>(output.shard_size_bytes());
  switch (output.out_dtype()) {
    case v1::DTYPE_UNSPECIFIED:
      break;
    case v1::DTYPE_F16:
      options.out_dtype = core::DType::kF16;
      break;
    case v1::DTYPE_BF16:
      options.out_dtype = core::DType::kBF16;
      break;
    case v1::DTYPE_F32:
      options.out_dtype = core::DType::kF32;
      break;
    case v1::DTYPE_F64:
      options.out_dtype = core::DType::kF64;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".out_dtype is ", output.out_dtype(),
                       "; expected float16, bfloat16, float32 or float64"));
  }
  return options;
}

absl::StatusOr<std::string> ConfigSource(const v1::OutputOptions& output,
                                         const std::string& field,
                                         const std::vector<std::string>& inputs,
                                         const std::string& fallback) {
  if (!output.has_config_from()) return fallback;
  const int k = output.config_from();
  if (k < 0 || k >= static_cast<int>(inputs.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".config_from is ", k, "; expected 0..",
        static_cast<int>(inputs.size()) - 1, " (an input of the job)"));
  }
  return inputs[k];
}

absl::StatusOr<std::string> ReadConfig(const Storage& storage,
                                       const v1::Artifact& artifact) {
  for (const v1::ModelFile& file : artifact.files()) {
    if (file.name() == "config.json") {
      return ReadFile(storage.BlobPath(file.sha256()));
    }
  }
  return std::string();
}

absl::StatusOr<Storage::StagedArtifact> StageResult(
    const Storage& storage, const v1::Job& job, const std::string& dir,
    const std::string& name, const v1::Artifact& config_from,
    const std::string& config_keys) {
  AMALGAM_ASSIGN_OR_RETURN(auto reader, core::SafetensorsReader::Open(dir));
  if (absl::Status finite = core::CheckAllFinite(*reader); !finite.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the result is not finite, so it is not published: ",
                     finite.message()));
  }
  std::set<core::DType> dtypes;
  for (const core::TensorInfo& tensor : reader->tensors()) {
    dtypes.insert(tensor.dtype);
  }
  const std::string torch_dtype =
      dtypes.size() == 1 ? core::TorchDTypeName(*dtypes.begin()) : "";
  for (const v1::ModelFile& file : config_from.files()) {
    if (!core::IsSideFile(file.name())) continue;
    const std::string from = storage.BlobPath(file.sha256());
    const std::string to = (fs::path(dir) / file.name()).string();
    if (file.name() == "config.json") {
      AMALGAM_ASSIGN_OR_RETURN(const std::string config, ReadFile(from));
      AMALGAM_ASSIGN_OR_RETURN(
          const std::string result,
          core::ResultConfig(config, torch_dtype, config_keys));
      AMALGAM_RETURN_IF_ERROR(WriteFile(to, result));
    } else {
      std::error_code error;
      fs::copy_file(from, to, error);
      if (error) {
        return absl::DataLossError(
            absl::StrCat("cannot copy ", file.name(), " of artifact ",
                         config_from.id(), ": ", error.message()));
      }
    }
    AMALGAM_RETURN_IF_ERROR(SyncFileAndDir(to));
  }
  v1::Artifact artifact;
  artifact.set_kind(v1::ARTIFACT_KIND_WEIGHTS);
  artifact.set_owner(job.owner());
  artifact.set_name(name);
  artifact.set_produced_by_job(job.id());
  DescribeTensors(*reader, &artifact);
  reader.reset();
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) {
    names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  std::vector<std::string> paths;
  for (const std::string& file_name : names) {
    paths.push_back((fs::path(dir) / file_name).string());
  }
  // As an upload of the directory has it: the digest of the files one
  // after the other (of the one file, for a model of one).
  std::vector<std::string> digests;
  AMALGAM_ASSIGN_OR_RETURN(const std::string sha256,
                           core::Sha256Files(paths, &digests));
  artifact.set_sha256(sha256);
  int64_t size = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    v1::ModelFile* file = artifact.add_files();
    file->set_name(names[i]);
    file->set_sha256(digests[i]);
    std::error_code error;
    file->set_size_bytes(static_cast<int64_t>(fs::file_size(paths[i], error)));
    size += file->size_bytes();
  }
  artifact.set_size_bytes(size);
  return Storage::StagedArtifact(std::move(paths), std::move(artifact));
}

}  // namespace amalgam::server
