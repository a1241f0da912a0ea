// A merge in a process of its own, for merge_test's reproducibility test.
//
//   merge_child METHOD OUT THREADS QUEUE_DEPTH MODEL...
//
// METHOD is weighted, fisher or regmean; each MODEL is
// WEIGHTS,COEFFICIENT[,STATISTICS] with the Fisher or Gram file for those
// methods. Exits 0 once OUT is written, else prints the status and exits 1.

#include <ATen/Parallel.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "core/merge.h"
#include "core/safetensors.h"

namespace {

using amalgam::core::MergeInput;
using amalgam::core::MergeMethod;
using amalgam::core::MergeOptions;
using amalgam::core::SafetensorsReader;

int Fail(const std::string& message) {
  std::fprintf(stderr, "merge_child: %s\n", message.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 7) {
    return Fail("usage: METHOD OUT THREADS QUEUE_DEPTH MODEL MODEL...");
  }
  const std::string method = argv[1], out = argv[2];
  MergeOptions options;
  if (method == "weighted") {
    options.method = MergeMethod::kWeighted;
  } else if (method == "fisher") {
    options.method = MergeMethod::kFisher;
  } else if (method == "regmean") {
    options.method = MergeMethod::kRegMean;
  } else {
    return Fail("unknown method " + method);
  }
  int threads = 0;
  if (!absl::SimpleAtoi(argv[3], &threads) ||
      !absl::SimpleAtoi(argv[4], &options.write_queue_depth) || threads < 1) {
    return Fail("THREADS and QUEUE_DEPTH are integers");
  }
  at::set_num_threads(threads);

  std::vector<std::unique_ptr<SafetensorsReader>> readers;
  auto open = [&](const std::string& path) -> const SafetensorsReader* {
    auto reader = SafetensorsReader::Open(path);
    if (!reader.ok()) return nullptr;
    readers.push_back(std::move(reader).value());
    return readers.back().get();
  };
  std::vector<MergeInput> inputs;
  for (int i = 5; i < argc; ++i) {
    const std::vector<std::string> parts = absl::StrSplit(argv[i], ',');
    MergeInput input;
    input.label = parts[0];
    input.weights = open(parts[0]);
    if (parts.size() < 2 || input.weights == nullptr ||
        !absl::SimpleAtod(parts[1], &input.coefficient)) {
      return Fail(std::string("bad model ") + argv[i]);
    }
    if (parts.size() > 2) {
      const SafetensorsReader* statistics = open(parts[2]);
      if (statistics == nullptr) return Fail("cannot open " + parts[2]);
      (options.method == MergeMethod::kFisher ? input.fisher : input.gram) =
          statistics;
    }
    inputs.push_back(input);
  }
  auto plan = amalgam::core::PlanMerge(inputs, options);
  if (!plan.ok()) return Fail(plan.status().ToString());
  const absl::Status status = amalgam::core::ExecuteMerge(
      *plan, inputs, options, out, nullptr, nullptr);
  if (!status.ok()) return Fail(status.ToString());
  return 0;
}
