#pragma once

// The model directories jobs write: options from the request, and what a
// directory of tensors gets before it is published.

#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "amalgam/v1/amalgam.pb.h"
#include "core/dtype.h"
#include "server/storage.h"

namespace amalgam::server {

// The options of a result: the largest shard and the dtype written.
struct ResultOptions {
  uint64_t shard_bytes = 0;
  std::optional<core::DType> out_dtype;
};

// Reads `output` (named `field` in errors): INVALID_ARGUMENT for a negative
// shard size or an unknown dtype.
absl::StatusOr<ResultOptions> ParseResultOptions(
    const v1::OutputOptions& output, const std::string& field);

// The input whose side files a result gets: `output.config_from` (an index
// into `inputs`, INVALID_ARGUMENT naming `field` when out of range), else
// `fallback`.
absl::StatusOr<std::string> ConfigSource(const v1::OutputOptions& output,
                                         const std::string& field,
                                         const std::vector<std::string>& inputs,
                                         const std::string& fallback);

// The text of `artifact`'s config.json; empty when it has none.
absl::StatusOr<std::string> ReadConfig(const Storage& storage,
                                       const v1::Artifact& artifact);

// Completes the model directory `dir` that a job wrote its tensors into:
// copies the side files of `config_from`, config.json with torch_dtype set
// to the tensors' dtype (where they share one) and the keys of the JSON
// object `config_keys` (unless empty); checks every tensor finite
// (FAILED_PRECONDITION naming the first that is not); and describes it as
// the weights artifact `name` of `job`'s owner, with its files' paths.
absl::StatusOr<Storage::StagedArtifact> StageResult(
    const Storage& storage, const v1::Job& job, const std::string& dir,
    const std::string& name, const v1::Artifact& config_from,
    const std::string& config_keys);

}  // namespace amalgam::server
