// The task-vector merges against float64 references written here from the
// formulas (plain loops over std::vector<double>), their properties, and
// their planning and execution through PlanMerge/ExecuteMerge.
#include "core/task_vectors.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "core/merge.h"
#include "core/torch_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/tensor_files.h"

namespace amalgam::core {
namespace {

using ::testing::HasSubstr;
using testutil::Randn;
using testutil::TensorFilesTest;
using Vec = std::vector<double>;

Vec ToVec(const at::Tensor& t) {
  at::Tensor c = t.to(at::kDouble).contiguous();
  return Vec(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

at::Tensor FromVec(const Vec& v) {
  return at::tensor(v, at::TensorOptions().dtype(at::kDouble));
}

bool SameBytes(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor x = a.contiguous(), y = b.contiguous();
  return x.scalar_type() == y.scalar_type() && x.numel() == y.numel() &&
         std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) == 0;
}

double MaxAbsDiff(const Vec& a, const Vec& b) {
  double worst = 0;
  for (size_t j = 0; j < a.size(); ++j) {
    worst = std::max(worst, std::fabs(a[j] - b[j]));
  }
  return worst;
}

// --- references, from the formulas of the issue -------------------------

std::vector<Vec> Deltas(const Vec& base, const std::vector<Vec>& models) {
  std::vector<Vec> d;
  for (const Vec& m : models) {
    Vec delta(m.size());
    for (size_t j = 0; j < m.size(); ++j) delta[j] = m[j] - base[j];
    d.push_back(delta);
  }
  return d;
}

Vec TrimReference(const Vec& delta, double density) {
  const size_t n = delta.size();
  const size_t k =
      std::max<size_t>(1, static_cast<size_t>(std::floor(density * n)));
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  // Largest magnitude first; equal magnitudes by index.
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return std::fabs(delta[a]) > std::fabs(delta[b]);
  });
  Vec trimmed(n, 0.0);
  for (size_t r = 0; r < std::min(k, n); ++r) {
    trimmed[order[r]] = delta[order[r]];
  }
  return trimmed;
}

Vec ElectReference(const std::vector<Vec>& d, const Vec& w, bool normalize) {
  const size_t n = d[0].size();
  Vec out(n);
  for (size_t j = 0; j < n; ++j) {
    double total = 0;
    for (size_t i = 0; i < d.size(); ++i) total += w[i] * d[i][j];
    const double s = total >= 0 ? 1 : -1;
    double num = 0, den = 0;
    for (size_t i = 0; i < d.size(); ++i) {
      const double sign = d[i][j] > 0 ? 1 : (d[i][j] < 0 ? -1 : 0);
      if (sign == s) {
        num += w[i] * d[i][j];
        den += w[i];
      }
    }
    out[j] = normalize ? num / (den == 0 ? 1 : den) : num;
  }
  return out;
}

Vec AddScaledReference(const Vec& base, const Vec& merged, double lambda) {
  Vec out(base.size());
  for (size_t j = 0; j < base.size(); ++j)
    out[j] = base[j] + lambda * merged[j];
  return out;
}

class TaskVectorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    base_ = Randn({7, 11}, 1);
    for (uint64_t s = 2; s < 5; ++s) {
      models_.push_back(base_ + 0.1 * Randn({7, 11}, s));
    }
  }
  std::vector<Vec> ModelVecs() const {
    std::vector<Vec> v;
    for (const at::Tensor& m : models_) v.push_back(ToVec(m));
    return v;
  }
  at::Tensor base_;
  std::vector<at::Tensor> models_;
};

TEST_F(TaskVectorsTest, TaskArithmeticIsTheFormulaAndTheAverageAtOneOverN) {
  const Vec w = {1.0, 0.5, 2.0};
  const Vec expected = AddScaledReference(
      ToVec(base_),
      [&] {
        const std::vector<Vec> d = Deltas(ToVec(base_), ModelVecs());
        Vec sum(d[0].size(), 0.0);
        for (size_t i = 0; i < d.size(); ++i) {
          for (size_t j = 0; j < sum.size(); ++j) sum[j] += w[i] * d[i][j];
        }
        return sum;
      }(),
      0.7);
  EXPECT_LT(MaxAbsDiff(ToVec(TaskArithmetic(base_, models_, w, 0.7)), expected),
            1e-14);
  // λ = 1/N with weights 1: the average of the models.
  const at::Tensor average = (models_[0] + models_[1] + models_[2]) / 3;
  EXPECT_LT(
      MaxAbsDiff(ToVec(TaskArithmetic(base_, models_, {1, 1, 1}, 1.0 / 3)),
                 ToVec(average)),
      1e-14);
}

TEST_F(TaskVectorsTest,
       TiesIsTheFormulaWithTiesOfMagnitudeZerosAndZeroDivisors) {
  // Magnitudes that tie at the threshold, exact zeros, and entries where
  // every model disagrees with the elected sign (divisor 0).
  const Vec base = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  const std::vector<Vec> models = {
      {1, -1, 1, -1, 0, 0, 2, 0.5, -3, 0},
      {-1, 1, 1, 1, 0, 0.5, -2, 0.5, 3, 0},
      {1, 1, -0.5, 1, 0, -0.5, 2, -0.5, 0.25, 0},
  };
  const Vec w = {1.0, 2.0, 1.5};
  const Vec densities = {0.5, 0.3, 0.7};
  for (const bool normalize : {true, false}) {
    std::vector<Vec> trimmed;
    const std::vector<Vec> d = Deltas(base, models);
    for (size_t i = 0; i < d.size(); ++i) {
      trimmed.push_back(TrimReference(d[i], densities[i]));
    }
    const Vec expected =
        AddScaledReference(base, ElectReference(trimmed, w, normalize), 0.9);
    std::vector<at::Tensor> m;
    for (const Vec& v : models) m.push_back(FromVec(v));
    EXPECT_LT(
        MaxAbsDiff(ToVec(Ties(FromVec(base), m, w, densities, 0.9, normalize)),
                   expected),
        1e-15)
        << "normalize " << normalize;
  }
  // Random tensors too.
  const Vec wr = {0.3, 1.0, 2.0};
  std::vector<Vec> trimmed;
  const std::vector<Vec> d = Deltas(ToVec(base_), ModelVecs());
  for (const Vec& delta : d) trimmed.push_back(TrimReference(delta, 0.2));
  const Vec expected =
      AddScaledReference(ToVec(base_), ElectReference(trimmed, wr, true), 1.0);
  EXPECT_LT(
      MaxAbsDiff(ToVec(Ties(base_, models_, wr, {0.2, 0.2, 0.2}, 1.0, true)),
                 expected),
      1e-14);
}

TEST_F(TaskVectorsTest, TiesAtDensityOneWithAgreeingSignsIsTheWeightedMean) {
  const at::Tensor base = Randn({50}, 9);
  // Every task vector positive.
  std::vector<at::Tensor> models;
  for (uint64_t s = 10; s < 13; ++s) {
    models.push_back(base + Randn({50}, s).abs() + 0.01);
  }
  const Vec w = {1.0, 3.0, 0.5};
  const at::Tensor mean =
      ((models[0] - base) * w[0] + (models[1] - base) * w[1] +
       (models[2] - base) * w[2]) /
      (w[0] + w[1] + w[2]);
  EXPECT_LT(MaxAbsDiff(ToVec(Ties(base, models, w, {1, 1, 1}, 1.0, true)),
                       ToVec(base + mean)),
            1e-14);
}

TEST_F(TaskVectorsTest,
       DareIsItsMaskTimesTheFormulaAndDensityOneIsTaskArithmetic) {
  const Vec w = {1.0, 0.5, 2.0};
  const Vec densities = {0.3, 0.5, 0.9};
  const std::vector<Vec> d = Deltas(ToVec(base_), ModelVecs());
  std::vector<Vec> dropped = d;
  for (size_t i = 0; i < d.size(); ++i) {
    for (size_t j = 0; j < d[i].size(); ++j) {
      dropped[i][j] = DareKeeps(7, "layer.weight", static_cast<int>(i),
                                static_cast<int64_t>(j), densities[i])
                          ? d[i][j] / densities[i]
                          : 0.0;
    }
  }
  Vec linear(d[0].size(), 0.0);
  for (size_t i = 0; i < d.size(); ++i) {
    for (size_t j = 0; j < linear.size(); ++j) {
      linear[j] += w[i] * dropped[i][j];
    }
  }
  EXPECT_LT(
      MaxAbsDiff(ToVec(Dare(base_, models_, w, densities, 0.8, false, true,
                            DareRescale::kInverseDensity, 7, "layer.weight")),
                 AddScaledReference(ToVec(base_), linear, 0.8)),
      1e-14);
  EXPECT_LT(
      MaxAbsDiff(ToVec(Dare(base_, models_, w, densities, 0.8, true, true,
                            DareRescale::kInverseDensity, 7, "layer.weight")),
                 AddScaledReference(ToVec(base_),
                                    ElectReference(dropped, w, true), 0.8)),
      1e-14);
  // Density 1 keeps everything: task arithmetic, to the bit.
  EXPECT_TRUE(SameBytes(Dare(base_, models_, w, {1, 1, 1}, 0.8, false, true,
                             DareRescale::kInverseDensity, 7, "x"),
                        TaskArithmetic(base_, models_, w, 0.8)));
  // The mask keeps about a density's share of the entries.
  int64_t kept = 0;
  for (int64_t j = 0; j < 100000; ++j) kept += DareKeeps(1, "t", 0, j, 0.3);
  EXPECT_NEAR(kept / 1e5, 0.3, 0.01);
  // Different seeds, names and models draw different masks.
  int64_t same_seed = 0, same_name = 0, same_model = 0;
  for (int64_t j = 0; j < 1000; ++j) {
    const bool keep = DareKeeps(1, "t", 0, j, 0.5);
    same_seed += keep == DareKeeps(2, "t", 0, j, 0.5);
    same_name += keep == DareKeeps(1, "u", 0, j, 0.5);
    same_model += keep == DareKeeps(1, "t", 1, j, 0.5);
  }
  for (int64_t same : {same_seed, same_name, same_model}) {
    EXPECT_GT(same, 400);
    EXPECT_LT(same, 600);
  }
}

TEST_F(TaskVectorsTest, DareWithL1RescalingKeepsEachTaskVectorsL1Norm) {
  const at::Tensor base = at::zeros({1000}, at::kDouble);
  const std::vector<at::Tensor> models = {Randn({1000}, 21)};
  const at::Tensor merged = Dare(base, models, {1.0}, {0.4}, 1.0, false, true,
                                 DareRescale::kL1, 3, "w");
  EXPECT_NEAR(merged.abs().sum().item<double>(),
              models[0].abs().sum().item<double>(), 1e-9);
  EXPECT_GT((merged == 0).sum().item<int64_t>(), 500) << "about 60% dropped";
}

TEST_F(TaskVectorsTest, DareIsTheSameForAnyThreadCountAndTensorOrder) {
  const at::Tensor big_base = Randn({300, 400}, 30);
  const std::vector<at::Tensor> big = {big_base + Randn({300, 400}, 31),
                                       big_base + Randn({300, 400}, 32)};
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const at::Tensor one = Dare(big_base, big, {1, 1}, {0.3, 0.6}, 1.0, true,
                              true, DareRescale::kL1, 5, "encoder.w");
  at::set_num_threads(2);
  // Another tensor first: the mask of "encoder.w" does not depend on it.
  Dare(base_, models_, {1, 1, 1}, {0.5, 0.5, 0.5}, 1.0, true, true,
       DareRescale::kInverseDensity, 5, "decoder.w");
  const at::Tensor two = Dare(big_base, big, {1, 1}, {0.3, 0.6}, 1.0, true,
                              true, DareRescale::kL1, 5, "encoder.w");
  at::set_num_threads(threads);
  EXPECT_TRUE(SameBytes(one, two));
}

TEST_F(TaskVectorsTest, SlerpIsTheFormulaExactAtItsEndsAndLinearWhenParallel) {
  const at::Tensor a = Randn({5, 9}, 40), b = Randn({5, 9}, 41);
  const double t = 0.3;
  const Vec x = ToVec(a), y = ToVec(b);
  double nx = 0, ny = 0, dot = 0;
  for (size_t j = 0; j < x.size(); ++j) {
    nx += x[j] * x[j];
    ny += y[j] * y[j];
  }
  nx = std::sqrt(nx);
  ny = std::sqrt(ny);
  for (size_t j = 0; j < x.size(); ++j) dot += (x[j] / nx) * (y[j] / ny);
  const double omega = std::acos(dot);
  Vec expected(x.size());
  for (size_t j = 0; j < x.size(); ++j) {
    expected[j] = std::sin((1 - t) * omega) / std::sin(omega) * x[j] +
                  std::sin(t * omega) / std::sin(omega) * y[j];
  }
  EXPECT_LT(MaxAbsDiff(ToVec(Slerp(a, b, t)), expected), 1e-14);
  // The ends, byte for byte (also a -0.0 entry).
  at::Tensor with_negative_zero = a.clone();
  with_negative_zero.view(-1)[0] = -0.0;
  EXPECT_TRUE(SameBytes(Slerp(with_negative_zero, b, 0), with_negative_zero));
  EXPECT_TRUE(SameBytes(Slerp(a, b, 1), b));
  // Parallel: the plain interpolation.
  const at::Tensor c = 2.5 * a;
  EXPECT_LT(MaxAbsDiff(ToVec(Slerp(a, c, t)), ToVec((1 - t) * a + t * c)),
            1e-14);
}

TEST_F(TaskVectorsTest, ModelStockIsTheFormulaAndIdenticalModelsGiveThatModel) {
  const Vec b = ToVec(base_);
  const std::vector<Vec> d = Deltas(b, ModelVecs());
  double c = 0;
  int pairs = 0;
  for (size_t i = 0; i < d.size(); ++i) {
    for (size_t j = i + 1; j < d.size(); ++j) {
      double dot = 0, ni = 0, nj = 0;
      for (size_t k = 0; k < b.size(); ++k) {
        dot += d[i][k] * d[j][k];
        ni += d[i][k] * d[i][k];
        nj += d[j][k] * d[j][k];
      }
      c += dot / std::max(std::sqrt(ni) * std::sqrt(nj), 1e-6);
      ++pairs;
    }
  }
  c = std::clamp(c / pairs, -1.0, 1.0);
  const double n = 3, t = n * c / (1 + (n - 1) * c);
  Vec expected(b.size());
  const std::vector<Vec> m = ModelVecs();
  for (size_t k = 0; k < b.size(); ++k) {
    expected[k] = t * (m[0][k] + m[1][k] + m[2][k]) / n + (1 - t) * b[k];
  }
  EXPECT_LT(MaxAbsDiff(ToVec(ModelStock(base_, models_)), expected), 1e-14);
  // Identical models give that model: in float64 to within rounding (the
  // cosine is 1 to the last bit or two), and once in the files' dtype to
  // the bit; models equal to the base give the base.
  const at::Tensor model = models_[0];
  EXPECT_LT(
      MaxAbsDiff(ToVec(ModelStock(base_, {model, model, model})), ToVec(model)),
      1e-15);
  const at::Tensor base32 = base_.to(at::kFloat),
                   model32 = model.to(at::kFloat);
  EXPECT_TRUE(SameBytes(
      ModelStock(base32, {model32, model32, model32}).to(at::kFloat), model32));
  EXPECT_TRUE(SameBytes(ModelStock(base_, {base_, base_}), base_));
}

// --- planning and execution ----------------------------------------------

class TaskVectorMergeTest : public TensorFilesTest {
 protected:
  void SetUp() override {
    TensorFilesTest::SetUp();
    base_ = Write("base.safetensors", {{"a", Randn({4, 3}, 50).to(at::kFloat)},
                                       {"b", Randn({6}, 51).to(at::kFloat)}});
    for (uint64_t s = 0; s < 3; ++s) {
      const SafetensorsReader* r =
          Write("m" + std::to_string(s) + ".safetensors",
                {{"a", Randn({4, 3}, 60 + s).to(at::kFloat)},
                 {"b", Randn({6}, 70 + s).to(at::kFloat)}});
      MergeInput input;
      input.weights = r;
      input.label = "m" + std::to_string(s);
      inputs_.push_back(input);
    }
  }

  MergeOptions Options(MergeMethod method) const {
    MergeOptions options;
    options.method = method;
    options.base.weights = base_;
    options.base.label = "base";
    return options;
  }

  const SafetensorsReader* base_ = nullptr;
  std::vector<MergeInput> inputs_;
};

TEST_F(TaskVectorMergeTest, AMergedFileIsTheFormulaPerTensorWithItsParameters) {
  MergeOptions options = Options(MergeMethod::kTies);
  options.task.density = 0.5;
  options.task.lambda = 0.8;
  inputs_[1].coefficient = 2;
  inputs_[2].density = 0.25;
  auto plan = PlanMerge(inputs_, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->coefficients, (std::vector<double>{1, 2, 1}));
  EXPECT_EQ(plan->densities, (std::vector<double>{0.5, 0.5, 0.25}));
  const std::string out = Path("ties.safetensors");
  ASSERT_TRUE(ExecuteMerge(*plan, inputs_, options, out, {}, nullptr).ok());
  const SafetensorsReader* merged = Open(out);
  ASSERT_NE(merged, nullptr);
  EXPECT_EQ(merged->metadata().at("amalgam.method"), "ties");
  EXPECT_EQ(merged->metadata().at("amalgam.base"), "base");
  EXPECT_EQ(merged->metadata().at("amalgam.lambda"), "0.8");
  EXPECT_EQ(merged->metadata().at("amalgam.densities"), "0.5,0.5,0.25");
  for (const char* name : {"a", "b"}) {
    std::vector<at::Tensor> models;
    for (const MergeInput& input : inputs_) {
      models.push_back(Load(*input.weights, *input.weights->Find(name),
                            at::kDouble, at::kCPU));
    }
    const at::Tensor expected =
        Ties(Load(*base_, *base_->Find(name), at::kDouble, at::kCPU), models,
             {1, 2, 1}, {0.5, 0.5, 0.25}, 0.8, true)
            .to(at::kFloat);
    EXPECT_TRUE(SameBytes(
        Load(*merged, *merged->Find(name), at::kFloat, at::kCPU), expected))
        << name;
  }
}

TEST_F(TaskVectorMergeTest, BadRequestsNameWhatIsWrong) {
  auto refused = [&](MergeOptions options, std::vector<MergeInput> inputs,
                     absl::StatusCode code, const std::string& text) {
    absl::StatusOr<MergePlan> plan = PlanMerge(inputs, options);
    EXPECT_EQ(plan.status().code(), code) << plan.status();
    EXPECT_THAT(plan.status().message(), HasSubstr(text));
  };
  MergeOptions no_base = Options(MergeMethod::kTaskArithmetic);
  no_base.base.weights = nullptr;
  refused(no_base, inputs_, absl::StatusCode::kInvalidArgument,
          "needs a base model");
  MergeOptions other_shape = Options(MergeMethod::kTies);
  other_shape.base.weights =
      Write("wide.safetensors", {{"a", Randn({4, 5}, 1).to(at::kFloat)},
                                 {"b", Randn({6}, 2).to(at::kFloat)}});
  refused(other_shape, inputs_, absl::StatusCode::kFailedPrecondition,
          "tensor \"a\" has shape [4, 3] in model m0 but [4, 5] in the base");
  MergeOptions dense = Options(MergeMethod::kDareLinear);
  dense.task.density = 1.5;
  refused(dense, inputs_, absl::StatusCode::kInvalidArgument,
          "density must be in (0, 1], got 1.5");
  MergeOptions zero = Options(MergeMethod::kTies);
  std::vector<MergeInput> with_zero = inputs_;
  with_zero[1].density = -0.1;
  refused(zero, with_zero, absl::StatusCode::kInvalidArgument,
          "the density of model m1 must be in (0, 1]");
  MergeOptions far = Options(MergeMethod::kSlerp);
  far.task.t = 1.5;
  refused(far, {inputs_[0]}, absl::StatusCode::kInvalidArgument,
          "t must be in [0, 1], got 1.5");
  MergeOptions three = Options(MergeMethod::kSlerp);
  three.base.weights = nullptr;
  three.task.t = 0.5;
  refused(three, inputs_, absl::StatusCode::kInvalidArgument,
          "slerp interpolates two models");
  MergeOptions untimed = Options(MergeMethod::kSlerp);
  refused(untimed, {inputs_[0]}, absl::StatusCode::kInvalidArgument,
          "slerp needs t");
  refused(Options(MergeMethod::kModelStock), {inputs_[0]},
          absl::StatusCode::kInvalidArgument, "at least 2 model(s)");
  MergeOptions scaled = Options(MergeMethod::kModelStock);
  scaled.task.lambda = 2;
  refused(scaled, inputs_, absl::StatusCode::kInvalidArgument,
          "lambda is not a parameter of model_stock");
  MergeOptions seeded = Options(MergeMethod::kTies);
  seeded.task.seed = 3;
  refused(seeded, inputs_, absl::StatusCode::kInvalidArgument,
          "seed is not a parameter of ties");
  MergeOptions average;
  average.base.weights = base_;
  refused(average, inputs_, absl::StatusCode::kInvalidArgument,
          "a base model is not a parameter of average");
}

TEST_F(TaskVectorMergeTest, SlerpOfTwoModelsNeedsNoBaseAndIsExactAtItsEnds) {
  MergeOptions options = Options(MergeMethod::kSlerp);
  options.base.weights = nullptr;
  options.task.t = 0;
  std::vector<MergeInput> two = {inputs_[0], inputs_[1]};
  auto plan = PlanMerge(two, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const std::string out = Path("slerp.safetensors");
  ASSERT_TRUE(ExecuteMerge(*plan, two, options, out, {}, nullptr).ok());
  const SafetensorsReader* merged = Open(out);
  for (const char* name : {"a", "b"}) {
    EXPECT_TRUE(
        SameBytes(Load(*merged, *merged->Find(name), at::kFloat, at::kCPU),
                  Load(*inputs_[0].weights, *inputs_[0].weights->Find(name),
                       at::kFloat, at::kCPU)));
  }
}

}  // namespace
}  // namespace amalgam::core
