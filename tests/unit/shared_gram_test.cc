// RegMean of weights that share their input (core/merge, core/regmean): one
// Gram stored once with aliases, or found identical at upload, gives one
// factorisation for all of them and bitwise the result of solving each
// weight alone.
#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

#include "core/merge.h"
#include "core/statistics.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/tensor_files.h"

namespace amalgam::core {
namespace {

using ::testing::HasSubstr;
using namespace testutil;  // NOLINT(build/namespaces)

// How each model's Gram file holds the Gram that k, q and v share.
enum class Layout {
  kCopies,     // under each of the three names: solved one by one
  kAliases,    // once, under a.q, with alias.a.k and alias.a.v
  kIdentical,  // copies, marked identical (as found at upload)
};

struct Data {
  bool dead_feature = false;  // input feature 3 zero in every row
  bool collinear = false;     // features 0 and 1 nearly equal (cond ~1e12)
};
constexpr Data kDeadFeature{true, false};
constexpr Data kCollinear{false, true};

struct Result {
  std::string bytes;  // the merged model.safetensors
  MergeProgress progress;
};

class SharedGramTest : public TensorFilesTest {
 protected:
  static constexpr int64_t kIn = 24, kOut = 7;
  static constexpr int kModels = 3;

  // Weights a.k, a.o, a.q, a.v [kOut, kIn] and a.bias of three models; k, q
  // and v read the input X_i, o reads Y_i. Integer inputs: the Grams are
  // exact in float32.
  void MakeModels(const Data& data) {
    for (int i = 0; i < kModels; ++i) {
      const at::Tensor scales = at::linspace(0.5, 6.0, kIn, at::kDouble);
      at::Tensor x = at::round(Randn({40 + 9 * i, kIn}, 10 + i) * scales);
      const at::Tensor y = at::round(Randn({35 + 7 * i, kIn}, 20 + i) * scales);
      if (data.dead_feature) x.select(1, 3).zero_();
      if (data.collinear) {
        x.select(1, 1).copy_(x.select(1, 0) +
                             1e-5 * Randn({x.size(0)}, 30 + i));
      }
      gx_.push_back(x.t().matmul(x));
      gy_.push_back(y.t().matmul(y));
      Tensors weights;
      for (const char* name : {"a.k", "a.o", "a.q", "a.v"}) {
        weights.push_back(
            {name,
             Randn({kOut, kIn}, 40 + 10 * i + weights.size()).to(at::kFloat)});
      }
      weights.push_back({"a.bias", Randn({kOut}, 90 + i).to(at::kFloat)});
      weights_.push_back(Write("w" + std::to_string(i), weights));
      ws_.push_back(weights);
    }
    gram_type_ = data.collinear ? at::kDouble : at::kFloat;
  }

  std::vector<MergeInput> Inputs(Layout layout) {
    std::vector<MergeInput> inputs;
    for (int i = 0; i < kModels; ++i) {
      const std::string file = "g" + std::to_string(static_cast<int>(layout)) +
                               "_" + std::to_string(i);
      const at::Tensor gx = gx_[i].to(gram_type_);
      const at::Tensor gy = gy_[i].to(gram_type_);
      MergeInput input;
      input.weights = weights_[i];
      input.label = "m" + std::to_string(i);
      input.coefficient = 1 + i;
      if (layout == Layout::kAliases) {
        input.gram = Write(file, {{"a.o", gy}, {"a.q", gx}},
                           {{"alias.a.k", "a.q"}, {"alias.a.v", "a.q"}});
      } else {
        input.gram =
            Write(file, {{"a.k", gx}, {"a.o", gy}, {"a.q", gx}, {"a.v", gx}});
      }
      if (layout == Layout::kIdentical) {
        input.gram_identical = IdenticalTensors(*input.gram);
      }
      inputs.push_back(input);
    }
    return inputs;
  }

  Result Merge(Layout layout, MergeOptions options) {
    Result result;
    const std::vector<MergeInput> inputs = Inputs(layout);
    options.method = MergeMethod::kRegMean;
    auto plan = PlanMerge(inputs, options);
    EXPECT_TRUE(plan.ok()) << plan.status();
    if (!plan.ok()) return result;
    const std::string out = Path("out" + std::to_string(runs_++));
    const absl::Status status = ExecuteMerge(
        *plan, inputs, options, out,
        [&](const MergeProgress& p) { result.progress = p; }, nullptr);
    EXPECT_TRUE(status.ok()) << status;
    result.bytes = ReadFile(out);
    return result;
  }

  // The three layouts give the same bytes; only the shared ones share.
  // Returns the unshared run.
  Result ExpectSharedEqualsUnshared(const MergeOptions& options) {
    const Result alone = Merge(Layout::kCopies, options);
    EXPECT_FALSE(alone.bytes.empty());
    EXPECT_EQ(alone.progress.shared_factorisations, 0);
    for (Layout layout : {Layout::kAliases, Layout::kIdentical}) {
      SCOPED_TRACE(static_cast<int>(layout));
      const Result shared = Merge(layout, options);
      EXPECT_EQ(shared.progress.shared_factorisations, 2);  // k, q, v: 1 + 2
      EXPECT_TRUE(shared.bytes == alone.bytes);
      EXPECT_EQ(shared.progress.float32_solves, alone.progress.float32_solves);
      EXPECT_EQ(shared.progress.float64_solves, alone.progress.float64_solves);
      EXPECT_EQ(shared.progress.fast_solves, alone.progress.fast_solves);
      EXPECT_EQ(shared.progress.fast_fallbacks, alone.progress.fast_fallbacks);
    }
    return alone;
  }

  // The normal equations in float64 for weight `name` (input Grams `g`),
  // coefficients 1:2:3, alpha 0.9.
  at::Tensor Reference(const std::string& name,
                       const std::vector<at::Tensor>& g) const {
    at::Tensor a = at::zeros({kIn, kIn}, at::kDouble);
    at::Tensor b = at::zeros({kIn, kOut}, at::kDouble);
    for (int i = 0; i < kModels; ++i) {
      const double c = (1.0 + i) / 6.0;
      const at::Tensor gt = 0.9 * g[i] + 0.1 * at::diag(at::diag(g[i]));
      at::Tensor w;
      for (const auto& [n, t] : ws_[i]) {
        if (n == name) w = t.to(at::kDouble);
      }
      a += c * gt;
      b += c * gt.matmul(w.t());
    }
    return at::linalg_solve(a, b).t();
  }

  at::ScalarType gram_type_ = at::kFloat;
  std::vector<const SafetensorsReader*> weights_;
  std::vector<Tensors> ws_;
  std::vector<at::Tensor> gx_, gy_;
  int runs_ = 0;
};

TEST_F(SharedGramTest, PreciseSharedSolvesAreBitwiseTheUnsharedOnes) {
  MakeModels({});
  MergeOptions options;
  options.regmean_solve = RegMeanSolve::kFloat64;
  const Result alone = ExpectSharedEqualsUnshared(options);
  EXPECT_EQ(alone.progress.float64_solves, 4);
  // And right: each weight against the float64 normal equations (within
  // the float32 rounding of the result).
  const SafetensorsReader* merged = Open(Path("out1/model.safetensors"));
  ASSERT_NE(merged, nullptr);
  for (const char* name : {"a.k", "a.q", "a.v"}) {
    EXPECT_LE(RelErr(Read(*merged, name), Reference(name, gx_)), 1e-6) << name;
  }
  EXPECT_LE(RelErr(Read(*merged, "a.o"), Reference("a.o", gy_)), 1e-6);
}

TEST_F(SharedGramTest, RefinedFloat32SharedSolvesAreBitwiseTheUnsharedOnes) {
  MakeModels({});
  MergeOptions options;
  options.regmean_solve = RegMeanSolve::kFloat32;
  EXPECT_EQ(ExpectSharedEqualsUnshared(options).progress.float32_solves, 4);
}

TEST_F(SharedGramTest, IllConditionedSharedSolvesFallBackAsTheUnsharedOnes) {
  MakeModels(kCollinear);
  MergeOptions options;
  options.alpha = 1.0;  // no diagonal to steady the system
  options.regmean_solve = RegMeanSolve::kFloat32;  // fails, then float64
  const Result alone = ExpectSharedEqualsUnshared(options);
  EXPECT_EQ(alone.progress.float64_solves, 3);  // k, q, v
  options.regmean_solve = RegMeanSolve::kFloat64;
  options.precision = RegMeanPrecision::kFloat32;
  EXPECT_EQ(ExpectSharedEqualsUnshared(options).progress.fast_fallbacks, 3);
}

TEST_F(SharedGramTest, FastSharedSolvesAreBitwiseTheUnsharedOnes) {
  MakeModels({});
  MergeOptions options;
  options.precision = RegMeanPrecision::kFloat32;
  options.regmean_solve = RegMeanSolve::kFloat64;
  EXPECT_EQ(ExpectSharedEqualsUnshared(options).progress.fast_solves, 4);
}

TEST_F(SharedGramTest, ADeadFeatureIsSplitOffOnceForEveryWeightSharingIt) {
  MakeModels(kDeadFeature);
  MergeOptions options;
  options.regmean_solve = RegMeanSolve::kFloat64;
  ExpectSharedEqualsUnshared(options);
  options.precision = RegMeanPrecision::kFloat32;  // hands k, q, v over
  EXPECT_EQ(ExpectSharedEqualsUnshared(options).progress.fast_fallbacks, 3);
}

TEST_F(SharedGramTest, AnAliasNamingAMissingTensorIsAnInvalidArgument) {
  MakeModels({});
  std::vector<MergeInput> inputs = Inputs(Layout::kAliases);
  inputs[1].gram =
      Write("broken", {{"a.o", gy_[1].to(at::kFloat)}}, {{"alias.a.k", "a.q"}});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  const auto plan = PlanMerge(inputs, options);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(plan.status().message(),
              HasSubstr("the Grams of model m1: Gram alias \"alias.a.k\" "
                        "names \"a.q\", which is not a tensor of the file"));
}

TEST_F(SharedGramTest, WeightsShareOnlyWhereEveryModelSharesTheGram) {
  MakeModels({});
  std::vector<MergeInput> inputs = Inputs(Layout::kAliases);
  inputs[2] = Inputs(Layout::kCopies)[2];  // k, q, v apart in model 2
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  auto plan = PlanMerge(inputs, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  MergeProgress last;
  ASSERT_TRUE(ExecuteMerge(
                  *plan, inputs, options, Path("mixed"),
                  [&](const MergeProgress& p) { last = p; }, nullptr)
                  .ok());
  EXPECT_EQ(last.shared_factorisations, 0);
  EXPECT_TRUE(ReadFile(Path("mixed")) == Merge(Layout::kCopies, options).bytes);
}

}  // namespace
}  // namespace amalgam::core
