// A result written a shard at a time (core/model_writer, core/merge,
// core/grow): each shard written alone, in any order, into one directory,
// with WriteModelIndex, gives bitwise the files of the whole result written
// at once.
#include <ATen/ATen.h>

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/grow.h"
#include "core/merge.h"
#include "core/model_files.h"
#include "core/model_writer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/tensor_files.h"

namespace amalgam::core {
namespace {

using ::testing::HasSubstr;
using namespace testutil;  // NOLINT(build/namespaces)

// Every file of a directory, by name, as bytes.
std::map<std::string, std::string> Files(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    files[entry.path().filename().string()] = ReadFile(entry.path().string());
  }
  return files;
}

class ShardTest : public TensorFilesTest {
 protected:
  static constexpr int kModels = 3, kLayers = 5;
  static constexpr int64_t kIn = 9, kOut = 6;
  // About two layers a shard: 5 layers of 6 x 9 + 6 floats.
  static constexpr uint64_t kShardBytes = 500;

  // Models of `kLayers` linear layers l<j> (weight and bias) with their Grams
  // (X^T X of random inputs) and Fisher.
  void MakeModels() {
    for (int i = 0; i < kModels; ++i) {
      Tensors weights, grams, fishers;
      for (int j = 0; j < kLayers; ++j) {
        const std::string l = absl::StrCat("l", j, ".");
        const uint64_t seed = 100 * i + 10 * j;
        weights.push_back(
            {l + "weight", Randn({kOut, kIn}, seed).to(at::kFloat)});
        weights.push_back({l + "bias", Randn({kOut}, seed + 1).to(at::kFloat)});
        const at::Tensor x = Randn({20 + i, kIn}, seed + 2);
        grams.push_back({l + "weight", x.t().matmul(x).to(at::kFloat)});
        fishers.push_back(
            {l + "weight", Rand({kOut, kIn}, seed + 3).to(at::kFloat)});
        fishers.push_back({l + "bias", Rand({kOut}, seed + 4).to(at::kFloat)});
      }
      MergeInput input;
      input.weights = Write(absl::StrCat("w", i), weights);
      input.gram = Write(absl::StrCat("g", i), grams);
      input.fisher = Write(absl::StrCat("f", i), fishers);
      input.coefficient = 1.0 + i;
      input.label = absl::StrCat("model ", i);
      inputs_.push_back(input);
    }
  }

  // The merge written whole into `whole`, and a shard at a time (the last
  // first) into `sharded`, sharded by `options.shard_bytes`; returns the
  // shard count.
  int MergeBothWays(MergeOptions options, const std::string& whole,
                    const std::string& sharded) {
    absl::StatusOr<MergePlan> plan = PlanMerge(inputs_, options);
    EXPECT_TRUE(plan.ok()) << plan.status();
    if (!plan.ok()) return 0;
    absl::Status s =
        ExecuteMerge(*plan, inputs_, options, whole, nullptr, nullptr);
    EXPECT_TRUE(s.ok()) << s;
    std::vector<TensorSpec> specs;
    for (const PlannedTensor& t : plan->tensors) {
      specs.push_back(TensorSpec{t.info.name, t.out_dtype, t.info.shape});
    }
    const int shards = CountShards(specs, options.shard_bytes);
    for (int shard = shards; shard-- > 0;) {
      options.shard = shard;
      MergeProgress last;
      s = ExecuteMerge(
          *plan, inputs_, options, sharded,
          [&](const MergeProgress& p) { last = p; }, nullptr);
      EXPECT_TRUE(s.ok()) << "shard " << shard << ": " << s;
      // Progress counts the shard's own tensors.
      EXPECT_EQ(last.tensors_done, last.tensors_total);
      EXPECT_LT(last.tensors_total, static_cast<int64_t>(specs.size()));
      EXPECT_EQ(last.bytes_done, last.bytes_total);
    }
    s = WriteModelIndex(sharded, specs, options.shard_bytes);
    EXPECT_TRUE(s.ok()) << s;
    return shards;
  }

  std::vector<MergeInput> inputs_;
};

TEST_F(ShardTest, ShardsMergedAloneInAnyOrderAreTheWholeMergeBitwise) {
  MakeModels();
  MergeOptions regmean;
  regmean.method = MergeMethod::kRegMean;
  MergeOptions fisher;
  fisher.method = MergeMethod::kFisher;
  MergeOptions dare;
  dare.method = MergeMethod::kDareTies;
  dare.base.weights = inputs_[0].weights;
  dare.base.label = "base";
  dare.task.density = 0.5;
  dare.task.seed = 7;
  MergeOptions excluded;
  excluded.exclude = {"l3\\..*"};
  excluded.take_excluded_from = 2;
  excluded.out_dtype = DType::kBF16;
  excluded.shard_bytes = kShardBytes / 2;  // bfloat16: half the bytes
  int method = 0;
  for (MergeOptions options : {regmean, fisher, dare, excluded}) {
    if (options.shard_bytes == kDefaultShardBytes) {
      options.shard_bytes = kShardBytes;
    }
    SCOPED_TRACE(absl::StrCat("method ", method));
    const std::string whole = Path(absl::StrCat("whole", method));
    const std::string sharded = Path(absl::StrCat("sharded", method++));
    const int shards = MergeBothWays(options, whole, sharded);
    EXPECT_GE(shards, 3);
    const std::map<std::string, std::string> want = Files(whole);
    EXPECT_EQ(want.size(), static_cast<size_t>(shards) + 1);  // and the index
    EXPECT_TRUE(want.count(std::string(kIndexFileName)));
    EXPECT_TRUE(Files(sharded) == want);
  }
}

TEST_F(ShardTest, GrownShardsAloneAreTheWholeGrowthBitwise) {
  Tensors a, b;
  for (int j : {0, 2, 4}) {
    const std::string l = absl::StrCat("net.", j, ".");
    const int64_t in = j == 0 ? 4 : 8, out = j == 4 ? 3 : 8;
    a.push_back({l + "weight", Randn({out, in}, j).to(at::kFloat)});
    a.push_back({l + "bias", Randn({out}, j + 1).to(at::kFloat)});
    b.push_back({l + "weight", Randn({out, in}, j + 50).to(at::kFloat)});
    b.push_back({l + "bias", Randn({out}, j + 51).to(at::kFloat)});
  }
  const SafetensorsReader* ra = Write("a", a);
  const SafetensorsReader* rb = Write("b", b);
  GrowOptions options;
  options.layout = "mlp";
  options.noise_scale = 0.01;
  options.shard_bytes = 600;
  absl::StatusOr<GrowPlan> plan = PlanGrow(*ra, rb, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_TRUE(
      ExecuteGrow(*plan, *ra, rb, options, Path("whole"), nullptr, nullptr)
          .ok());
  std::vector<TensorSpec> specs;
  for (const GrowTensor& t : plan->tensors) {
    specs.push_back(TensorSpec{t.info.name, t.out_dtype, t.info.shape});
  }
  const int shards = CountShards(specs, options.shard_bytes);
  ASSERT_GE(shards, 3);
  for (int shard : {1, 0, 2}) {
    options.shard = shard;
    absl::Status s =
        ExecuteGrow(*plan, *ra, rb, options, Path("sharded"), nullptr, nullptr);
    ASSERT_TRUE(s.ok()) << s;
  }
  for (int shard = 3; shard < shards; ++shard) {
    options.shard = shard;
    ASSERT_TRUE(
        ExecuteGrow(*plan, *ra, rb, options, Path("sharded"), nullptr, nullptr)
            .ok());
  }
  ASSERT_TRUE(
      WriteModelIndex(Path("sharded"), specs, options.shard_bytes).ok());
  EXPECT_TRUE(Files(Path("sharded")) == Files(Path("whole")));
}

TEST_F(ShardTest, AShardOutsideTheModelIsInvalidAndNothingIsWritten) {
  MakeModels();
  MergeOptions options;
  options.shard_bytes = kShardBytes;
  absl::StatusOr<MergePlan> plan = PlanMerge(inputs_, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  options.shard = 40;
  absl::Status s =
      ExecuteMerge(*plan, inputs_, options, Path("out"), nullptr, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("shard 40 is not one of the model's"));
  EXPECT_FALSE(std::filesystem::exists(Path("out")));
}

TEST_F(ShardTest, AShardWriterTakesItsOwnTensorsOnly) {
  const std::vector<TensorSpec> specs = {{"a", DType::kF32, {4}},
                                         {"b", DType::kF32, {4}}};
  absl::StatusOr<std::unique_ptr<ModelWriter>> writer =
      ModelWriter::Create(Path("out"), specs, {}, 16, 1);
  ASSERT_TRUE(writer.ok()) << writer.status();
  const std::vector<uint8_t> bytes(16, 1);
  ASSERT_TRUE((*writer)->Append(bytes).ok());
  EXPECT_EQ((*writer)->Append(bytes).code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*writer)->Finish().ok());
  EXPECT_EQ((*writer)->files(),
            std::vector<std::string>{"model-00002-of-00002.safetensors"});
  EXPECT_EQ(Files(Path("out")).size(), 1u);
}

}  // namespace
}  // namespace amalgam::core
