// Tests of core/merge.h. Every expected value is computed here,
// independently, in float64 with LibTorch (or from a closed form).
#include "core/merge.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <stdlib.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/runtime.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/tensor_files.h"

namespace amalgam::core {
namespace {

using ::testing::HasSubstr;
using namespace testutil;  // NOLINT(build/namespaces)

class MergeTest : public TensorFilesTest {
 protected:
  // Plans and runs a merge into `out`; returns the output reader.
  absl::StatusOr<const SafetensorsReader*> Merge(
      const std::vector<MergeInput>& inputs, const MergeOptions& options,
      const std::string& out = "out.safetensors") {
    absl::StatusOr<MergePlan> plan = PlanMerge(inputs, options);
    if (!plan.ok()) return plan.status();
    absl::Status s =
        ExecuteMerge(*plan, inputs, options, Path(out), nullptr, nullptr);
    if (!s.ok()) return s;
    const SafetensorsReader* reader = Open(Path(out));
    if (reader == nullptr) return absl::InternalError("cannot open output");
    return reader;
  }
};

MergeInput Input(const SafetensorsReader* weights, double coefficient,
                 const std::string& label) {
  MergeInput input;
  input.weights = weights;
  input.coefficient = coefficient;
  input.label = label;
  return input;
}

// ---------------------------------------------------------------------------
// Average and weighted average.

class AverageTest : public MergeTest {
 protected:
  // Three models with a matrix, a vector and a scalar; returns the float64
  // values each file holds.
  std::vector<Tensors> MakeModels(at::ScalarType type, double coeff0 = 0,
                                  double coeff1 = 0, double coeff2 = 0) {
    std::vector<Tensors> models;
    const double coeffs[] = {coeff0, coeff1, coeff2};
    for (int i = 0; i < 3; ++i) {
      Tensors t = {{"layer.weight", Randn({16, 8}, 10 + i).to(type)},
                   {"layer.bias", Randn({8}, 20 + i).to(type)},
                   {"scale", Randn({}, 30 + i).to(type)}};
      const SafetensorsReader* r =
          Write("m" + std::to_string(i) + ".safetensors", t);
      inputs_.push_back(Input(r, coeffs[i], "m" + std::to_string(i + 1)));
      models.push_back(t);
    }
    return models;
  }

  // sum c_i W_i in float64 with c normalised to sum 1.
  static at::Tensor Reference(const std::vector<Tensors>& models, size_t k,
                              std::vector<double> c) {
    double sum = 0;
    for (double x : c) sum += x;
    at::Tensor ref = at::zeros_like(models[0][k].second, at::kDouble);
    for (size_t i = 0; i < models.size(); ++i) {
      ref += models[i][k].second.to(at::kDouble) * (c[i] / sum);
    }
    return ref;
  }

  std::vector<MergeInput> inputs_;
};

TEST_F(AverageTest, EqualCoefficientsGiveTheMeanOfThreeF32Models) {
  auto models = MakeModels(at::kFloat);
  MergeOptions options;
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  for (size_t k = 0; k < models[0].size(); ++k) {
    DType dtype;
    at::Tensor got = Read(**out, models[0][k].first, &dtype);
    EXPECT_EQ(dtype, DType::kF32);
    EXPECT_LE(RelErr(got, Reference(models, k, {1, 1, 1})), 1e-6)
        << models[0][k].first;
  }
}

TEST_F(AverageTest, WeightedCoefficientsAreNormalisedToSumOne) {
  auto models = MakeModels(at::kFloat, 1, 2, 3);
  MergeOptions options;
  options.method = MergeMethod::kWeighted;
  auto plan = PlanMerge(inputs_, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->coefficients.size(), 3u);
  EXPECT_NEAR(plan->coefficients[0], 1.0 / 6, 1e-15);
  EXPECT_NEAR(plan->coefficients[1], 2.0 / 6, 1e-15);
  EXPECT_NEAR(plan->coefficients[2], 3.0 / 6, 1e-15);
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  for (size_t k = 0; k < models[0].size(); ++k) {
    at::Tensor got = Read(**out, models[0][k].first);
    EXPECT_LE(RelErr(got, Reference(models, k, {1, 2, 3})), 1e-6)
        << models[0][k].first;
  }
}

TEST_F(AverageTest,
       AFusedPassOverManyChunksIsTheFloat64SumRoundedOnceForAnyThreads) {
  // [300, 257]: 77100 elements, many chunks and a ragged last one; 3 models,
  // and 6 (summed in groups of up to 4).
  for (at::ScalarType type : {at::kFloat, at::kDouble}) {
    for (int count : {3, 6}) {
      SCOPED_TRACE(absl::StrCat(type, " x", count));
      inputs_.clear();
      std::vector<Tensors> models;
      std::vector<double> coefficients;
      for (int i = 0; i < count; ++i) {
        Tensors t = {{"big", Randn({300, 257}, 40 + i).to(type)}};
        inputs_.push_back(
            Input(Write(absl::StrCat("big", count, "-", i, ".safetensors"), t),
                  1.0 + i, absl::StrCat("m", i)));
        models.push_back(t);
        coefficients.push_back(1.0 + i);
      }
      MergeOptions options;
      options.method = MergeMethod::kWeighted;
      auto plan = PlanMerge(inputs_, options);
      ASSERT_TRUE(plan.ok()) << plan.status();
      // sum c_i W_i in float64 with the plan's coefficients, in model order.
      at::Tensor want = at::zeros({300, 257}, at::kDouble);
      for (int i = 0; i < count; ++i) {
        want += models[i][0].second.to(at::kDouble) * plan->coefficients[i];
      }
      EXPECT_LE(RelErr(want, Reference(models, 0, coefficients)), 1e-15);
      std::string bytes[2];
      const int threads[2] = {1, 4};
      const int before = at::get_num_threads();
      for (int k = 0; k < 2; ++k) {
        at::set_num_threads(threads[k]);
        const std::string out = absl::StrCat("big-out", k, ".safetensors");
        auto merged = Merge(inputs_, options, out);
        ASSERT_TRUE(merged.ok()) << merged.status();
        // Summed in float64, in model order, and rounded once.
        EXPECT_TRUE(at::equal(Read(**merged, "big"), want.to(type)));
        bytes[k] = ReadFile(Path(out));
      }
      at::set_num_threads(before);
      EXPECT_EQ(bytes[0], bytes[1]) << "1 and 4 intra-op threads differ";
    }
  }
}

TEST_F(AverageTest, AllZeroCoefficientsMeanEqualWeights) {
  auto models = MakeModels(at::kFloat, 0, 0, 0);
  auto plan = PlanMerge(inputs_, MergeOptions());
  ASSERT_TRUE(plan.ok()) << plan.status();
  for (double c : plan->coefficients) EXPECT_DOUBLE_EQ(c, 1.0 / 3);
}

TEST_F(AverageTest, ZeroCoefficientLeavesAModelOut) {
  auto models = MakeModels(at::kFloat, 0, 1, 1);
  auto out = Merge(inputs_, MergeOptions());
  ASSERT_TRUE(out.ok()) << out.status();
  at::Tensor got = Read(**out, "layer.weight");
  EXPECT_LE(RelErr(got, Reference(models, 0, {0, 1, 1})), 1e-6);
}

TEST_F(AverageTest, HalfAndBFloat16KeepTheirDtype) {
  struct Case {
    at::ScalarType type;
    DType dtype;
    double tol;  // a few units of the format's rounding
  };
  for (const Case& c : {Case{at::kHalf, DType::kF16, 1e-3},
                        Case{at::kBFloat16, DType::kBF16, 8e-3}}) {
    inputs_.clear();
    auto models = MakeModels(c.type, 1, 2, 3);
    auto out = Merge(inputs_, MergeOptions(),
                     "out" + std::to_string(static_cast<int>(c.dtype)));
    ASSERT_TRUE(out.ok()) << out.status();
    for (size_t k = 0; k < models[0].size(); ++k) {
      DType dtype;
      at::Tensor got = Read(**out, models[0][k].first, &dtype);
      EXPECT_EQ(dtype, c.dtype);
      EXPECT_LE(RelErr(got, Reference(models, k, {1, 2, 3})), c.tol)
          << models[0][k].first << " " << DTypeName(c.dtype);
    }
  }
}

TEST_F(AverageTest, Float64StaysFloat64AndIsComputedInFloat64) {
  auto models = MakeModels(at::kDouble, 1, 2, 3);
  auto out = Merge(inputs_, MergeOptions());
  ASSERT_TRUE(out.ok()) << out.status();
  for (size_t k = 0; k < models[0].size(); ++k) {
    DType dtype;
    at::Tensor got = Read(**out, models[0][k].first, &dtype);
    EXPECT_EQ(dtype, DType::kF64);
    EXPECT_LE(RelErr(got, Reference(models, k, {1, 2, 3})), 1e-14);
  }
}

TEST_F(AverageTest, MisalignedAndEmptyTensorsAreMerged) {
  // "a" (3 x F16 = 6 bytes) comes first in the file, so "b" starts at an
  // address that is not a multiple of 4; "c" holds no elements.
  std::vector<Tensors> models;
  for (int i = 0; i < 2; ++i) {
    Tensors t = {{"a", Randn({3}, 40 + i).to(at::kHalf)},
                 {"b", Randn({4, 4}, 50 + i).to(at::kFloat)},
                 {"c", at::zeros({0, 3}, at::kFloat)}};
    inputs_.push_back(
        Input(Write("m" + std::to_string(i), t), 0, "m" + std::to_string(i)));
    models.push_back(t);
  }
  auto out = Merge(inputs_, MergeOptions());
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_LE(RelErr(Read(**out, "b"), Reference(models, 1, {1, 1})), 1e-6);
  EXPECT_LE(RelErr(Read(**out, "a"), Reference(models, 0, {1, 1})), 1e-3);
  EXPECT_EQ(Read(**out, "c").sizes().vec(), (std::vector<int64_t>{0, 3}));
}

TEST_F(AverageTest, PlanListsTensorsSortedWithTheirTotalSize) {
  MakeModels(at::kFloat);
  auto plan = PlanMerge(inputs_, MergeOptions());
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->tensors.size(), 3u);
  EXPECT_EQ(plan->tensors[0].info.name, "layer.bias");
  EXPECT_EQ(plan->tensors[1].info.name, "layer.weight");
  EXPECT_EQ(plan->tensors[2].info.name, "scale");
  for (const auto& t : plan->tensors) {
    EXPECT_EQ(t.rule, TensorRule::kAverage);
  }
  EXPECT_EQ(plan->output_bytes, (16 * 8 + 8 + 1) * 4u);
}

// ---------------------------------------------------------------------------
// Fisher.

class FisherTest : public MergeTest {
 protected:
  // Weights {"w" [6, 5], "b" [5]}; Fisher for "w" only (and for "b" when
  // `fisher_for_bias`).
  void MakeModels(const std::vector<at::Tensor>& fishers,
                  bool fisher_for_bias = false) {
    for (size_t i = 0; i < fishers.size(); ++i) {
      const std::string id = std::to_string(i);
      Tensors w = {{"w", Randn({6, 5}, 100 + i).to(at::kFloat)},
                   {"b", Randn({5}, 200 + i).to(at::kFloat)}};
      Tensors f = {{"w", fishers[i].to(at::kFloat)}};
      if (fisher_for_bias) {
        f.push_back({"b", Rand({5}, 300 + i).to(at::kFloat)});
      }
      MergeInput input = Input(Write("w" + id, w), coeffs_[i], "m" + id);
      input.fisher = Write("f" + id, f, {{"num_examples", "100"}});
      inputs_.push_back(input);
      weights_.push_back(w);
      fisher_.push_back(f);
    }
  }

  at::Tensor Average(size_t k) const {
    at::Tensor ref = at::zeros_like(weights_[0][k].second, at::kDouble);
    double sum = 0;
    for (double c : coeffs_) sum += c;
    for (size_t i = 0; i < weights_.size(); ++i) {
      ref += weights_[i][k].second.to(at::kDouble) * (coeffs_[i] / sum);
    }
    return ref;
  }

  // The float64 parts of the Fisher formula over some inputs.
  struct Formula {
    at::Tensor num, den, avg;
  };

  // Three inputs of F32 weights "w" of `shape` (seeds from `seed`) and the
  // Fishers `fisher(i)` stored as `fisher_type`, with the formula's parts.
  std::vector<MergeInput> FisherInputs(
      const std::string& prefix, const std::vector<int64_t>& shape,
      at::ScalarType fisher_type, uint64_t seed,
      const std::function<at::Tensor(int)>& fisher, Formula* formula) {
    std::vector<MergeInput> inputs;
    formula->num = at::zeros(shape, at::kDouble);
    formula->den = at::zeros(shape, at::kDouble);
    formula->avg = at::zeros(shape, at::kDouble);
    for (int i = 0; i < 3; ++i) {
      const std::string id =
          prefix + std::to_string(i) + at::toString(fisher_type);
      at::Tensor w = Randn(shape, seed + i).to(at::kFloat);
      at::Tensor f = fisher(i).to(fisher_type);
      MergeInput input = Input(Write("w" + id, {{"w", w}}), coeffs_[i], id);
      input.fisher = Write("f" + id, {{"w", f}}, {{"num_examples", "10"}});
      inputs.push_back(input);
      const double c = coeffs_[i] / 6.0;
      formula->num += f.to(at::kDouble) * c * w.to(at::kDouble);
      formula->den += f.to(at::kDouble) * c;
      formula->avg += w.to(at::kDouble) * c;
    }
    return inputs;
  }

  std::vector<double> coeffs_ = {1, 2, 3};
  std::vector<MergeInput> inputs_;
  std::vector<Tensors> weights_;
  std::vector<Tensors> fisher_;
};

TEST_F(FisherTest, EqualFisherEqualsTheWeightedAverage) {
  at::Tensor f = Rand({6, 5}, 1) + 0.1;
  MakeModels({f, f, f});
  MergeOptions options;
  options.method = MergeMethod::kFisher;
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_LE(RelErr(Read(**out, "w"), Average(0)), 1e-6);
}

TEST_F(FisherTest, RandomPositiveFisherMatchesTheFloat64Formula) {
  MakeModels({Rand({6, 5}, 1) + 0.01, Rand({6, 5}, 2) * 10 + 0.01,
              Rand({6, 5}, 3) + 0.01});
  MergeOptions options;
  options.method = MergeMethod::kFisher;
  auto plan = PlanMerge(inputs_, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->tensors.size(), 2u);
  EXPECT_EQ(plan->tensors[0].info.name, "b");
  EXPECT_EQ(plan->tensors[0].rule, TensorRule::kAverage);
  EXPECT_EQ(plan->tensors[1].rule, TensorRule::kFisher);

  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  at::Tensor num = at::zeros({6, 5}, at::kDouble);
  at::Tensor den = at::zeros({6, 5}, at::kDouble);
  for (size_t i = 0; i < 3; ++i) {
    at::Tensor f = fisher_[i][0].second.to(at::kDouble) * coeffs_[i];
    num += f * weights_[i][0].second.to(at::kDouble);
    den += f;
  }
  EXPECT_LE(RelErr(Read(**out, "w"), num / den), 1e-6);
}

TEST_F(FisherTest, TensorWithoutFisherFallsBackToTheAverage) {
  MakeModels(
      {Rand({6, 5}, 1) + 0.01, Rand({6, 5}, 2) + 0.01, Rand({6, 5}, 3) + 0.01});
  MergeOptions options;
  options.method = MergeMethod::kFisher;
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_LE(RelErr(Read(**out, "b"), Average(1)), 1e-6);
}

TEST_F(FisherTest, DenominatorBelowTheFloorUsesTheAverage) {
  // Row 0: zero Fisher everywhere; row 1: 1e-20 (below 1e-12 x max); the
  // rest ordinary.
  std::vector<at::Tensor> fishers;
  for (int i = 0; i < 3; ++i) {
    at::Tensor f = Rand({6, 5}, 10 + i) + 0.5;
    f[0] = 0.0;
    f[1] = 1e-20;
    fishers.push_back(f);
  }
  MakeModels(fishers);
  MergeOptions options;
  options.method = MergeMethod::kFisher;
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  at::Tensor got = Read(**out, "w");
  at::Tensor avg = Average(0);
  EXPECT_TRUE(at::isfinite(got).all().item<bool>());
  EXPECT_LE(RelErr(got.slice(0, 0, 2), avg.slice(0, 0, 2)), 1e-6);

  at::Tensor num = at::zeros({6, 5}, at::kDouble);
  at::Tensor den = at::zeros({6, 5}, at::kDouble);
  for (size_t i = 0; i < 3; ++i) {
    at::Tensor f = fisher_[i][0].second.to(at::kDouble) * coeffs_[i];
    num += f * weights_[i][0].second.to(at::kDouble);
    den += f;
  }
  at::Tensor fisher = num / den;
  EXPECT_LE(RelErr(got.slice(0, 2), fisher.slice(0, 2)), 1e-6);
  // Without a floor the tiny row is Fisher-weighted, not averaged.
  options.fisher_floor = 0;
  auto unfloored = Merge(inputs_, options, "unfloored");
  ASSERT_TRUE(unfloored.ok()) << unfloored.status();
  at::Tensor row1 = Read(**unfloored, "w")[1];
  EXPECT_LE(RelErr(row1, fisher[1]), 1e-5);
}

// Many chunks of the fused CPU pass (60000 elements, split between threads)
// against the float64 formula, floor included; and Fisher stored as F64
// beside F32 weights, which takes the general path, gives the same.
TEST_F(FisherTest, LargeTensorsAndMixedDtypesMatchTheFloat64Formula) {
  const std::vector<int64_t> shape = {200, 300};
  for (at::ScalarType fisher_type : {at::kFloat, at::kDouble}) {
    Formula formula;
    std::vector<MergeInput> inputs = FisherInputs(
        "large", shape, fisher_type, 400,
        [&](int i) {
          at::Tensor f = Rand(shape, 500 + i) * 4;
          f.select(0, 7).zero_();  // no information: the average
          return f;
        },
        &formula);
    const at::Tensor& avg = formula.avg;
    at::Tensor expected =
        at::where(formula.den.gt(0), formula.num / formula.den, avg);
    MergeOptions options;
    options.method = MergeMethod::kFisher;
    auto out = Merge(inputs, options,
                     std::string("large") + at::toString(fisher_type));
    ASSERT_TRUE(out.ok()) << out.status();
    at::Tensor got = Read(**out, "w");
    EXPECT_LE(RelErr(got, expected), 1e-5) << at::toString(fisher_type);
    EXPECT_LE(RelErr(got.select(0, 7), avg.select(0, 7)), 1e-6);
  }
}

// The floor is relative to the largest denominator, never absolute: every
// Fisher scaled by 1e-15 still merges by the formula, and rows at 1e-11 and
// 1e-13 times the largest land on either side of the 1e-12 floor; on the
// fused F32 path and on the general path (F64 Fisher beside F32 weights).
TEST_F(FisherTest, TheFloorIsRelativeToTheLargestDenominator) {
  const std::vector<int64_t> shape = {6, 5};
  for (at::ScalarType fisher_type : {at::kFloat, at::kDouble}) {
    SCOPED_TRACE(fisher_type);
    Formula parts;
    std::vector<MergeInput> inputs = FisherInputs(
        "relative", shape, fisher_type, 600,
        [&](int i) {
          at::Tensor f = (Rand(shape, 700 + i) + 0.5) * 1e-15;
          f[2] = 1e-11 * 1.5e-15;     // above the floor: Fisher-weighted
          f[3] = 1e-13 * 1.5e-15;     // below it: the average
          f[2][i] = 2e-11 * 1.5e-15;  // rows' Fisher differ between models
          f[3][i] = 2e-13 * 1.5e-15;
          return f;
        },
        &parts);
    const at::Tensor& avg = parts.avg;
    ASSERT_LT(parts.den.max().item<double>(), 1e-14) << "every Fisher is tiny";
    MergeOptions options;
    options.method = MergeMethod::kFisher;
    auto out = Merge(inputs, options,
                     std::string("relative") + at::toString(fisher_type));
    ASSERT_TRUE(out.ok()) << out.status();
    const at::Tensor got = Read(**out, "w");
    const at::Tensor formula = parts.num / parts.den;
    for (int64_t row : {0, 1, 2, 4, 5}) {
      EXPECT_LE(RelErr(got[row], formula[row]), 1e-5) << "row " << row;
    }
    EXPECT_LE(RelErr(got[3], avg[3]), 1e-6) << "row 3 is below the floor";
    // The two sides differ, so the test tells them apart.
    EXPECT_GT(RelErr(formula[2], avg[2]), 1e-3);
    EXPECT_GT(RelErr(formula[3], avg[3]), 1e-3);
  }
}

// The CUDA path (tensors loaded onto the device) against float64 on the CPU,
// for F32 and F64 Fishers over many chunks.
TEST_F(FisherTest, OnCudaLargeTensorsMatchTheFloat64Formula) {
  AMALGAM_SKIP_WITHOUT_CUDA();
  const std::vector<int64_t> shape = {300, 257};
  for (at::ScalarType fisher_type : {at::kFloat, at::kDouble}) {
    SCOPED_TRACE(fisher_type);
    Formula formula;
    std::vector<MergeInput> inputs = FisherInputs(
        "cuda", shape, fisher_type, 800,
        [&](int i) { return Rand(shape, 900 + i) * 4 + 0.01; }, &formula);
    MergeOptions options;
    options.method = MergeMethod::kFisher;
    options.device = "cuda";
    auto out =
        Merge(inputs, options, std::string("cuda") + at::toString(fisher_type));
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_LE(RelErr(Read(**out, "w"), formula.num / formula.den), 1e-5);
  }
}

TEST_F(FisherTest, FisherMissingForAModelIsRefused) {
  MakeModels({Rand({6, 5}, 1), Rand({6, 5}, 2), Rand({6, 5}, 3)});
  inputs_[1].fisher = nullptr;
  MergeOptions options;
  options.method = MergeMethod::kFisher;
  auto plan = PlanMerge(inputs_, options);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(plan.status().message(), HasSubstr("model m1"));
}

TEST_F(FisherTest, FisherForATensorInSomeModelsOnlyIsRefused) {
  MakeModels({Rand({6, 5}, 1), Rand({6, 5}, 2), Rand({6, 5}, 3)});
  inputs_[2].fisher = Write("f2b", {{"w", Rand({6, 5}, 3).to(at::kFloat)},
                                    {"b", Rand({5}, 4).to(at::kFloat)}});
  MergeOptions options;
  options.method = MergeMethod::kFisher;
  auto plan = PlanMerge(inputs_, options);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(plan.status().message(), HasSubstr("\"b\""));
  EXPECT_THAT(plan.status().message(), HasSubstr("missing from model m0"));
}

TEST_F(FisherTest, FisherOfTheWrongShapeIsRefused) {
  MakeModels({Rand({6, 5}, 1), Rand({6, 5}, 2), Rand({6, 5}, 3)});
  inputs_[1].fisher = Write("f1b", {{"w", Rand({5, 6}, 3).to(at::kFloat)}});
  MergeOptions options;
  options.method = MergeMethod::kFisher;
  auto plan = PlanMerge(inputs_, options);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(plan.status().message(), HasSubstr("\"w\" has shape [5, 6]"));
  EXPECT_THAT(plan.status().message(), HasSubstr("[6, 5]"));
}

// ---------------------------------------------------------------------------
// RegMean.

class RegMeanTest : public MergeTest {
 protected:
  // Input features: small, or large enough for the blocked factorisation.
  int64_t in_ = 8;
  int64_t out_ = 5;  // outputs of "lin"
  // The dtype the Grams are stored in.
  at::ScalarType gram_type_ = at::kFloat;
  // When > 0, input feature 1 is feature 0 plus this much noise: nearly
  // collinear features, an ill-conditioned Gram.
  double collinear_ = 0;
  // Offsets every random stream of MakeModels (0: the fixed data).
  int64_t seed_ = 0;

  // Model i: weight "lin.weight" [out_, in_], bias "lin.bias" [out_], inputs
  // X_i [rows_i, in_] and their Gram X_i^T X_i (a sum over rows).
  void MakeModels(std::vector<int64_t> rows,
                  std::vector<std::map<std::string, std::string>> meta = {},
                  bool equal_grams = false) {
    for (size_t i = 0; i < rows.size(); ++i) {
      const std::string id = std::to_string(i);
      // Small integers of different scales per feature: the Grams differ
      // strongly between features and are exact in float32.
      at::Tensor x = at::round(
          Randn({rows[i], in_}, 500 + (equal_grams ? 0 : i) + 1000 * seed_) *
          at::linspace(0.5, 6.0, in_, at::kDouble));
      if (collinear_ > 0) {
        x.select(1, 1).copy_(x.select(1, 0) +
                             collinear_ *
                                 Randn({rows[i]}, 800 + i + 1000 * seed_));
      }
      at::Tensor w = Randn({out_, in_}, 600 + i + 1000 * seed_).to(at::kFloat);
      at::Tensor b = Randn({out_}, 700 + i + 1000 * seed_).to(at::kFloat);
      at::Tensor g = x.t().matmul(x);
      std::map<std::string, std::string> m =
          i < meta.size() ? meta[i]
                          : std::map<std::string, std::string>{
                                {"num_examples", std::to_string(rows[i])}};
      if (m.count("reduction") && m.at("reduction") == "mean") {
        g = g / static_cast<double>(rows[i]);
      }
      MergeInput input =
          Input(Write("w" + id, {{"lin.weight", w}, {"lin.bias", b}}),
                coeffs_.empty() ? 0 : coeffs_[i], "m" + id);
      input.gram = Write("g" + id, {{"lin.weight", g.to(gram_type_)}}, m);
      inputs_.push_back(input);
      xs_.push_back(x);
      ws_.push_back(w.to(at::kDouble));
      bs_.push_back(b.to(at::kDouble));
      grams_.push_back(Rounded(g, gram_type_));
    }
  }

  // Three models of 1101 features (over kCholeskyBlock, an odd size) with
  // unequal coefficients.
  void MakeLargeModels() {
    in_ = 1101;
    coeffs_ = {1, 2, 3};
    MakeModels({1400, 1300, 1900});
  }

  std::vector<double> NormalisedCoeffs() const {
    std::vector<double> c(ws_.size(), 1.0 / ws_.size());
    double sum = 0;
    for (double x : coeffs_) sum += x;
    if (sum > 0) {
      for (size_t i = 0; i < c.size(); ++i) c[i] = coeffs_[i] / sum;
    }
    return c;
  }

  // Merges with `options` and `solve` into a file of its own; its
  // "lin.weight" goes to `merged`, and the last progress report is returned.
  MergeProgress MergeWithSolve(MergeOptions options, RegMeanSolve solve,
                               at::Tensor& merged) {
    options.regmean_solve = solve;
    MergeProgress last;
    auto plan = PlanMerge(inputs_, options);
    EXPECT_TRUE(plan.ok()) << plan.status();
    if (!plan.ok()) return last;
    const std::string out =
        Path(solve == RegMeanSolve::kFloat32 ? "f32" : "f64");
    const absl::Status status = ExecuteMerge(
        *plan, inputs_, options, out, [&](const MergeProgress& p) { last = p; },
        nullptr);
    EXPECT_TRUE(status.ok()) << status;
    if (status.ok()) merged = Read(*Open(out), "lin.weight");
    return last;
  }

  // Merges with RegMean in the fast mode, `options` otherwise as given.
  MergeProgress MergeFast(MergeOptions options, at::Tensor& merged) {
    options.method = MergeMethod::kRegMean;
    options.precision = RegMeanPrecision::kFloat32;
    return MergeWithSolve(options, RegMeanSolve::kFloat64, merged);
  }

  // The normal-equation solution in float64, Grams scaled by `scale`.
  at::Tensor Reference(double alpha, std::vector<double> scale = {}) const {
    std::vector<double> c = NormalisedCoeffs();
    at::Tensor a = at::zeros({in_, in_}, at::kDouble);
    at::Tensor b = at::zeros({in_, out_}, at::kDouble);
    for (size_t i = 0; i < ws_.size(); ++i) {
      at::Tensor g = grams_[i] * (scale.empty() ? 1.0 : scale[i]);
      at::Tensor gt = alpha * g + (1 - alpha) * at::diag(at::diag(g));
      a += c[i] * gt;
      b += c[i] * gt.matmul(ws_[i].t());
    }
    return at::linalg_solve(a, b).t();
  }

  // sum c_i G~_i in float64.
  at::Tensor Pooled(double alpha) const {
    std::vector<double> c = NormalisedCoeffs();
    at::Tensor pooled = at::zeros({in_, in_}, at::kDouble);
    for (size_t i = 0; i < grams_.size(); ++i) {
      pooled += c[i] * (alpha * grams_[i] +
                        (1 - alpha) * at::diag(at::diag(grams_[i])));
    }
    return pooled;
  }

  at::Tensor AverageBias() const {
    std::vector<double> c = NormalisedCoeffs();
    at::Tensor ref = at::zeros({out_}, at::kDouble);
    for (size_t i = 0; i < bs_.size(); ++i) ref += c[i] * bs_[i];
    return ref;
  }

  std::vector<double> coeffs_;
  std::vector<MergeInput> inputs_;
  std::vector<at::Tensor> xs_, ws_, bs_, grams_;
};

TEST_F(RegMeanTest, AlphaOneMatchesTheNormalEquations) {
  MakeModels({40, 25, 60});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.alpha = 1.0;
  auto plan = PlanMerge(inputs_, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->tensors[0].rule, TensorRule::kAverage);  // lin.bias
  EXPECT_EQ(plan->tensors[1].rule, TensorRule::kRegMean);  // lin.weight
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_LE(RelErr(Read(**out, "lin.weight"), Reference(1.0)), 1e-6);
}

TEST_F(RegMeanTest, TheResultRecordsTheBlasCoreThreadsAndDevice) {
  MakeModels({40, 25});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  const int before = at::get_num_threads();
  at::set_num_threads(1);
  auto out = Merge(inputs_, options);
  at::set_num_threads(before);
  ASSERT_TRUE(out.ok()) << out.status();
  const auto& metadata = (*out)->metadata();
  const std::string core = GetBlasInfo().core;
  EXPECT_EQ(metadata.at("amalgam.blas_core"), core.empty() ? "-" : core);
  EXPECT_EQ(metadata.at("amalgam.intra_op_threads"), "1");
  EXPECT_EQ(metadata.at("amalgam.device"), "cpu");
  // Elementwise methods do not depend on them, and do not record them.
  MergeOptions average;
  auto plain = Merge(inputs_, average, "plain");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ((*plain)->metadata().count("amalgam.blas_core"), 0u);
}

TEST_F(RegMeanTest, Float64GramsAreReadNotWritten) {
  gram_type_ = at::kDouble;
  coeffs_ = {1, 2, 3};
  MakeModels({40, 25, 60});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.alpha = 0.5;
  auto first = Merge(inputs_, options, "first.safetensors");
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_LE(RelErr(Read(**first, "lin.weight"), Reference(0.5)), 1e-6);
  // The merge works on copies: the mapped Grams are unchanged, so the same
  // readers give the same result again.
  auto second = Merge(inputs_, options, "second.safetensors");
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_TRUE(
      at::equal(Read(**first, "lin.weight"), Read(**second, "lin.weight")));
  EXPECT_TRUE(at::equal(Read(*inputs_[0].gram, "lin.weight"), grams_[0]));
}

// The float32 solve (what CUDA uses) refined in float64 is as accurate as
// float64 on well-conditioned systems, and hands ill-conditioned ones to the
// float64 solve.
TEST_F(RegMeanTest, Float32SolveIsRefinedOrFallsBackToFloat64) {
  MakeModels({40, 25, 60});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.alpha = 1.0;
  for (RegMeanSolve solve : {RegMeanSolve::kFloat32, RegMeanSolve::kFloat64}) {
    at::Tensor merged;
    const MergeProgress last = MergeWithSolve(options, solve, merged);
    ASSERT_TRUE(merged.defined());
    EXPECT_LE(RelErr(merged, Reference(1.0)), 1e-6);
    EXPECT_EQ(last.float32_solves, solve == RegMeanSolve::kFloat32 ? 1 : 0);
    EXPECT_EQ(last.float64_solves, solve == RegMeanSolve::kFloat64 ? 1 : 0);
  }
}

TEST_F(RegMeanTest, IllConditionedFloat32SolveFallsBackToFloat64) {
  // Condition number near 1e12: beyond float32, fine for float64.
  gram_type_ = at::kDouble;
  collinear_ = 1e-5;
  MakeModels({40, 25, 60});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.alpha = 1.0;
  at::Tensor merged;
  const MergeProgress last =
      MergeWithSolve(options, RegMeanSolve::kFloat32, merged);
  ASSERT_TRUE(merged.defined());
  EXPECT_EQ(last.float32_solves, 0);
  EXPECT_EQ(last.float64_solves, 1);
  EXPECT_LE(RelErr(merged, Reference(1.0)), 1e-4);
}

TEST_F(RegMeanTest, AlphaHalfWithCoefficientsMatchesTheNormalEquations) {
  coeffs_ = {1, 2, 3};
  MakeModels({40, 25, 60});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.alpha = 0.5;
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  at::Tensor got = Read(**out, "lin.weight");
  EXPECT_LE(RelErr(got, Reference(0.5)), 1e-6);
  // And it is not simply the average.
  EXPECT_GT(RelErr(got, Reference(0.0)), 1e-3);
}

// Systems of over kCholeskyBlock (256) features are factorised in blocks,
// in both precisions; an odd size leaves a partial block.
TEST_F(RegMeanTest, LargeSystemsMatchTheNormalEquations) {
  MakeLargeModels();
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.alpha = 0.7;
  const at::Tensor reference = Reference(0.7);
  for (RegMeanSolve solve : {RegMeanSolve::kFloat64, RegMeanSolve::kFloat32}) {
    at::Tensor merged;
    const MergeProgress last = MergeWithSolve(options, solve, merged);
    ASSERT_TRUE(merged.defined());
    EXPECT_LE(RelErr(merged, reference), 1e-6);
    EXPECT_EQ(last.float32_solves, solve == RegMeanSolve::kFloat32 ? 1 : 0);
  }
}

// The output error of `merged` [out, in] on the pooled inputs against the
// exact solution `want`: ||(W - W*) L||_F / ||W* L||_F, sum G~ = L L^T.
double OutputError(const at::Tensor& merged, const at::Tensor& want,
                   const at::Tensor& pooled) {
  const at::Tensor l = at::linalg_cholesky(pooled);
  return (at::linalg_norm(at::matmul(merged.to(at::kDouble) - want, l)) /
          at::linalg_norm(at::matmul(want, l)))
      .item<double>();
}

// The fast mode (float32 throughout) on a system over kCholeskyBlock: its
// output error is under the tolerance, and the check's estimate of it (made
// on 4 random combinations of the columns) is within 2x of the truth.
TEST_F(RegMeanTest, FastPrecisionKeepsItsErrorUnderTheToleranceAndEstimatesIt) {
  MakeLargeModels();
  MergeOptions options;
  options.alpha = 0.7;
  at::Tensor merged;
  const MergeProgress last = MergeFast(options, merged);
  ASSERT_TRUE(merged.defined());
  EXPECT_EQ(last.fast_solves, 1);
  EXPECT_EQ(last.fast_fallbacks, 0);
  EXPECT_EQ(last.float64_solves, 0);
  const double truth = OutputError(merged, Reference(0.7), Pooled(0.7));
  EXPECT_LE(truth, options.fast_output_tolerance);
  EXPECT_GT(truth, 1e-9);  // float32, not float64
  EXPECT_GE(last.fast_output_error, truth / 2);
  EXPECT_LE(last.fast_output_error, truth * 2);
  EXPECT_LE(RelErr(merged, Reference(0.7)), 1e-4);
}

// With far more output columns than the check's 4 combinations of them
// (and a column count off its 8-lane blocks), the estimate still reads the
// true output error within 2x, and a tolerance under it sends the weight
// to float64.
TEST_F(RegMeanTest, FastPrecisionEstimatesTheErrorOfAWideWeight) {
  in_ = 1101;
  out_ = 301;
  coeffs_ = {1, 2, 3};
  MakeModels({1400, 1300, 1900});
  MergeOptions options;
  options.alpha = 0.7;
  at::Tensor merged;
  MergeProgress last = MergeFast(options, merged);
  ASSERT_TRUE(merged.defined());
  ASSERT_EQ(last.fast_solves, 1);
  const double truth = OutputError(merged, Reference(0.7), Pooled(0.7));
  EXPECT_GT(truth, 1e-9);
  EXPECT_GE(last.fast_output_error, truth / 2);
  EXPECT_LE(last.fast_output_error, truth * 2);

  options.fast_output_tolerance = last.fast_output_error / 2;
  last = MergeFast(options, merged);
  EXPECT_EQ(last.fast_solves, 0);
  EXPECT_EQ(last.fast_fallbacks, 1);
  EXPECT_LE(RelErr(merged, Reference(0.7)), 1e-6);
}

// A weight whose estimate is over the tolerance is solved again in float64,
// giving bitwise the precise mode's result; so is one that float32 cannot
// factor (condition number near 1e12).
TEST_F(RegMeanTest, FastPrecisionRedoesInFloat64WhatItsCheckRefuses) {
  MakeModels({40, 25, 60});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.alpha = 0.9;
  at::Tensor precise, redone;
  MergeWithSolve(options, RegMeanSolve::kFloat64, precise);
  options.precision = RegMeanPrecision::kFloat32;
  options.fast_output_tolerance = 1e-14;  // float32 cannot meet it
  MergeProgress last = MergeWithSolve(options, RegMeanSolve::kFloat64, redone);
  ASSERT_TRUE(precise.defined() && redone.defined());
  EXPECT_EQ(last.fast_solves, 0);
  EXPECT_EQ(last.fast_fallbacks, 1);
  EXPECT_EQ(last.float64_solves, 1);
  EXPECT_TRUE(at::equal(precise, redone));

  inputs_.clear();
  xs_.clear(), ws_.clear(), bs_.clear(), grams_.clear();
  gram_type_ = at::kDouble;
  collinear_ = 1e-5;
  MakeModels({40, 25, 60});
  options.alpha = 1.0;
  options.fast_output_tolerance = 1e-5;
  last = MergeWithSolve(options, RegMeanSolve::kFloat64, redone);
  ASSERT_TRUE(redone.defined());
  EXPECT_EQ(last.fast_fallbacks, 1);
  EXPECT_EQ(last.float64_solves, 1);
  EXPECT_LE(RelErr(redone, Reference(1.0)), 1e-4);
}

// Features whose scales span 1e4 (so the Grams' diagonal spans 1e8, as
// real activations do) are no harder for float32: the fast mode's pivot test
// is relative to each diagonal entry, not to the largest pivot.
TEST_F(RegMeanTest, FastPrecisionIsBlindToTheFeaturesScales) {
  MakeModels({40, 25, 60});
  const at::Tensor scale =
      at::pow(10.0, at::linspace(-2.0, 2.0, in_, at::kDouble));
  for (size_t i = 0; i < inputs_.size(); ++i) {
    grams_[i] = Rounded(grams_[i] * scale.unsqueeze(0) * scale.unsqueeze(1),
                        at::kFloat);
    inputs_[i].gram = Write("scaled" + std::to_string(i),
                            {{"lin.weight", grams_[i].to(at::kFloat)}});
  }
  MergeOptions options;
  at::Tensor merged;
  const MergeProgress last = MergeFast(options, merged);
  ASSERT_TRUE(merged.defined());
  EXPECT_EQ(last.fast_solves, 1);
  EXPECT_EQ(last.fast_fallbacks, 0);
  EXPECT_LE(OutputError(merged, Reference(0.9), Pooled(0.9)),
            options.fast_output_tolerance);
}

// Columns with no input are split off by the float64 path, which the fast
// mode hands them to.
TEST_F(RegMeanTest, FastPrecisionHandsColumnsWithNoInputToFloat64) {
  MakeModels({40, 25, 60});
  for (size_t i = 0; i < inputs_.size(); ++i) {
    xs_[i].select(1, 3).zero_();
    grams_[i] = Rounded(xs_[i].t().matmul(xs_[i]), at::kFloat);
    inputs_[i].gram = Write("dead" + std::to_string(i),
                            {{"lin.weight", grams_[i].to(at::kFloat)}});
  }
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  at::Tensor precise, fast;
  MergeWithSolve(options, RegMeanSolve::kFloat64, precise);
  options.precision = RegMeanPrecision::kFloat32;
  const MergeProgress last =
      MergeWithSolve(options, RegMeanSolve::kFloat64, fast);
  ASSERT_TRUE(precise.defined() && fast.defined());
  EXPECT_EQ(last.fast_fallbacks, 1);
  EXPECT_TRUE(at::equal(precise, fast));
}

TEST_F(RegMeanTest, FastPrecisionIsRefusedForOtherMethods) {
  MakeModels({40, 25});
  MergeOptions options;
  options.method = MergeMethod::kAverage;
  options.precision = RegMeanPrecision::kFloat32;
  auto plan = PlanMerge(inputs_, options);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(plan.status().message(),
              HasSubstr("precision float32 is not a parameter of average"));
}

// An alpha so small that 1/alpha overflows is still the formula, not a
// "singular" system.
TEST_F(RegMeanTest, TinyAlphaMatchesTheNormalEquations) {
  coeffs_ = {1, 2, 3};
  MakeModels({40, 25, 60});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  const std::vector<double> alphas = {1e-310, 1e-7};
  for (size_t k = 0; k < alphas.size(); ++k) {
    const double alpha = alphas[k];
    options.alpha = alpha;
    auto out = Merge(inputs_, options, "tiny" + std::to_string(k));
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_LE(RelErr(Read(**out, "lin.weight"), Reference(alpha)), 1e-6);
  }
}

TEST_F(RegMeanTest, AlphaZeroWithEqualGramsEqualsTheWeightedAverage) {
  coeffs_ = {1, 2, 3};
  MakeModels({30, 30, 30}, {}, /*equal_grams=*/true);
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.alpha = 0.0;
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  at::Tensor avg = at::zeros({out_, in_}, at::kDouble);
  for (size_t i = 0; i < 3; ++i) avg += ws_[i] * (coeffs_[i] / 6.0);
  EXPECT_LE(RelErr(Read(**out, "lin.weight"), avg), 1e-6);
}

TEST_F(RegMeanTest, AlphaOneReproducesTheLeastSquaresMerge) {
  MakeModels({40, 25, 60});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.alpha = 1.0;
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  // min_W sum_i ||X_i W^T - X_i W_i^T||^2 as one stacked least-squares
  // problem, solved by QR (not through the Grams).
  std::vector<at::Tensor> x_rows, y_rows;
  for (size_t i = 0; i < 3; ++i) {
    x_rows.push_back(xs_[i]);
    y_rows.push_back(xs_[i].matmul(ws_[i].t()));
  }
  at::Tensor x = at::cat(x_rows);
  at::Tensor y = at::cat(y_rows);
  at::Tensor q, r;
  std::tie(q, r) = at::linalg_qr(x);
  at::Tensor wt = at::linalg_solve_triangular(r, q.t().matmul(y),
                                              /*upper=*/true);
  EXPECT_LE(RelErr(Read(**out, "lin.weight"), wt.t()), 1e-6);
}

TEST_F(RegMeanTest, BiasesAreAveraged) {
  coeffs_ = {1, 2, 3};
  MakeModels({40, 25, 60});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_LE(RelErr(Read(**out, "lin.bias"), AverageBias()), 1e-6);
}

TEST_F(RegMeanTest, MeanNormalisationDividesSumGramsByTheirExamples) {
  // m0 uploads a sum, m1 a mean, m2 a sum.
  MakeModels({40, 25, 60}, {{{"num_examples", "40"}},
                            {{"reduction", "mean"}, {"num_examples", "25"}},
                            {{"reduction", "sum"}, {"num_examples", "60"}}});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.alpha = 0.9;
  options.gram_normalization = GramNormalization::kMean;
  auto plan = PlanMerge(inputs_, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_DOUBLE_EQ(plan->gram_scale[0], 1.0 / 40);
  EXPECT_DOUBLE_EQ(plan->gram_scale[1], 1.0);
  EXPECT_DOUBLE_EQ(plan->gram_scale[2], 1.0 / 60);
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  at::Tensor got = Read(**out, "lin.weight");
  EXPECT_LE(RelErr(got, Reference(0.9, {1.0 / 40, 1.0, 1.0 / 60})), 1e-6);
  // Unnormalised, the result would differ.
  EXPECT_GT(RelErr(got, Reference(0.9)), 1e-4);
}

TEST_F(RegMeanTest, MixingSumAndMeanGramsAsUploadedIsRefused) {
  MakeModels({40, 25}, {{{"num_examples", "40"}},
                        {{"reduction", "mean"}, {"num_examples", "25"}}});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  auto plan = PlanMerge(inputs_, options);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(plan.status().message(), HasSubstr("choose a normalisation"));
  EXPECT_THAT(plan.status().message(), HasSubstr("m1"));
}

TEST_F(RegMeanTest, MeanNormalisationWithoutNumExamplesIsRefused) {
  MakeModels({40, 25}, {{{"num_examples", "40"}}, {{"reduction", "sum"}}});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.gram_normalization = GramNormalization::kMean;
  auto plan = PlanMerge(inputs_, options);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(plan.status().message(), HasSubstr("model m1"));
  EXPECT_THAT(plan.status().message(), HasSubstr("num_examples"));
}

TEST_F(RegMeanTest, SingularGramsAreReportedWithTheTensorNameForEverySeed) {
  // Two input features equal in every row of every model: the summed Gram
  // is rank deficient with a non-zero diagonal, so alpha = 1 has no
  // solution. A rounded Cholesky of it succeeded for some seeds (12 of 50
  // once), with a tiny positive pivot and a "solution" of about 1e13.
  for (seed_ = 0; seed_ < 50; ++seed_) {
    SCOPED_TRACE(seed_);
    inputs_.clear();
    xs_.clear(), ws_.clear(), bs_.clear(), grams_.clear();
    MakeModels({40, 25});
    for (size_t i = 0; i < 2; ++i) {
      at::Tensor x = xs_[i].clone();
      x.select(1, 1).copy_(x.select(1, 0));
      inputs_[i].gram = Write("dup" + std::to_string(i),
                              {{"lin.weight", x.t().matmul(x).to(at::kFloat)}});
    }
    for (RegMeanSolve solve :
         {RegMeanSolve::kFloat64, RegMeanSolve::kFloat32}) {
      MergeOptions options;
      options.method = MergeMethod::kRegMean;
      options.alpha = 1.0;
      options.regmean_solve = solve;
      // The fast mode too (it hands the system to the float64 path).
      if (seed_ % 2 == 1) options.precision = RegMeanPrecision::kFloat32;
      auto plan = PlanMerge(inputs_, options);
      ASSERT_TRUE(plan.ok()) << plan.status();
      absl::Status s =
          ExecuteMerge(*plan, inputs_, options, Path("out"), nullptr, nullptr);
      EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
      EXPECT_THAT(
          s.message(),
          HasSubstr("RegMean system for tensor \"lin.weight\" is singular"));
    }
  }
}

TEST_F(RegMeanTest, AnIndefiniteNonSingularSystemIsSolvedByLu) {
  gram_type_ = at::kDouble;
  MakeModels({40, 25});
  // Symmetric with a positive diagonal but a negative eigenvalue (not a Gram
  // of real rows, yet a regular system): Cholesky fails, LU solves it.
  for (size_t i = 0; i < 2; ++i) {
    at::Tensor g = at::eye(in_, at::kDouble) * (2.0 + static_cast<double>(i));
    g[0][1] = g[1][0] = 5.0 + static_cast<double>(i);
    grams_[i] = g;
    inputs_[i].gram = Write("indef" + std::to_string(i), {{"lin.weight", g}});
  }
  ASSERT_LT(at::linalg_eigvalsh(grams_[0] + grams_[1]).min().item<double>(), 0);
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.alpha = 1.0;
  at::Tensor merged;
  MergeWithSolve(options, RegMeanSolve::kFloat64, merged);
  ASSERT_TRUE(merged.defined());
  EXPECT_LE(RelErr(merged, Reference(1.0)), 1e-6);
}

TEST_F(RegMeanTest, NearSingularSystemsAreSolvedOrRefusedByTheirPivotRatio) {
  // Diagonal Grams with one entry r times the others: pivot ratio r, against
  // the threshold of n * DBL_EPSILON (8 features: 1.8e-15).
  gram_type_ = at::kDouble;
  for (const double r : {1e-13, 1e-17}) {
    SCOPED_TRACE(r);
    inputs_.clear();
    xs_.clear(), ws_.clear(), bs_.clear(), grams_.clear();
    MakeModels({40, 25});
    for (size_t i = 0; i < 2; ++i) {
      at::Tensor g = at::eye(in_, at::kDouble);
      g[in_ - 1][in_ - 1] = r;
      grams_[i] = g;
      inputs_[i].gram = Write("near" + std::to_string(i), {{"lin.weight", g}});
    }
    MergeOptions options;
    options.method = MergeMethod::kRegMean;
    options.alpha = 1.0;
    auto plan = PlanMerge(inputs_, options);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const absl::Status s =
        ExecuteMerge(*plan, inputs_, options, Path("near"), nullptr, nullptr);
    if (r > 8 * DBL_EPSILON) {
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_LE(RelErr(Read(*Open(Path("near")), "lin.weight"), Reference(1.0)),
                1e-6);
    } else {
      EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
      EXPECT_THAT(s.message(), HasSubstr("\"lin.weight\" is singular"));
    }
  }
}

TEST_F(RegMeanTest, FeaturesZeroInEveryModelTakeTheAverageAndTheRestIsSolved) {
  MakeModels({40, 25, 60});
  // Feature 3 (say a ReLU unit dead on all data) is zero in every row.
  const int64_t dead = 3;
  for (size_t i = 0; i < inputs_.size(); ++i) {
    xs_[i].select(1, dead).zero_();
    grams_[i] = Rounded(xs_[i].t().matmul(xs_[i]), at::kFloat);
    inputs_[i].gram = Write("dead" + std::to_string(i),
                            {{"lin.weight", grams_[i].to(at::kFloat)}});
  }
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.alpha = 1.0;
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  at::Tensor got = Read(**out, "lin.weight");
  // Reference: the normal equations restricted to the live features, and
  // the plain average for the dead column.
  std::vector<int64_t> live;
  for (int64_t k = 0; k < in_; ++k) {
    if (k != dead) live.push_back(k);
  }
  at::Tensor index = at::tensor(live, at::kLong);
  at::Tensor a = at::zeros({in_ - 1, in_ - 1}, at::kDouble);
  at::Tensor b = at::zeros({in_ - 1, out_}, at::kDouble);
  at::Tensor average = at::zeros({out_, in_}, at::kDouble);
  for (size_t i = 0; i < ws_.size(); ++i) {
    at::Tensor g = grams_[i].index_select(0, index).index_select(1, index);
    a += g / 3.0;
    b += g.matmul(ws_[i].index_select(1, index).t()) / 3.0;
    average += ws_[i] / 3.0;
  }
  at::Tensor want = average.clone();
  want.index_copy_(1, index, at::linalg_solve(a, b).t());
  EXPECT_LE(RelErr(got.index_select(1, index), want.index_select(1, index)),
            1e-6);
  EXPECT_LE(RelErr(got.select(1, dead), average.select(1, dead)), 1e-6);
}

TEST_F(RegMeanTest, GramOfTheWrongSizeIsRefused) {
  MakeModels({40, 25});
  inputs_[1].gram = Write("bad", {{"lin.weight", at::eye(5, at::kFloat)}});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  auto plan = PlanMerge(inputs_, options);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(plan.status().message(),
              HasSubstr("Gram for tensor \"lin.weight\" has shape [5, 5]"));
  EXPECT_THAT(plan.status().message(),
              HasSubstr("the weight [5, 8] needs [8, 8]"));
}

TEST_F(RegMeanTest, NonSquareGramIsRefused) {
  MakeModels({40, 25});
  inputs_[0].gram =
      Write("bad", {{"lin.weight", at::ones({8, 5}, at::kFloat)}});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  auto plan = PlanMerge(inputs_, options);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(plan.status().message(),
              HasSubstr("Gram for tensor \"lin.weight\" has shape [8, 5]"));
  EXPECT_THAT(plan.status().message(), HasSubstr("needs [8, 8]"));
}

TEST_F(RegMeanTest, GramsMissingForAModelAreRefused) {
  MakeModels({40, 25});
  inputs_[1].gram = nullptr;
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  auto plan = PlanMerge(inputs_, options);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(plan.status().message(), HasSubstr("model m1 has none"));
}

TEST_F(RegMeanTest, GramForAWeightInOneModelOnlyIsRefused) {
  MakeModels({40, 25});
  inputs_[1].gram = Write("empty", {}, {{"num_examples", "25"}});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  auto plan = PlanMerge(inputs_, options);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(plan.status().message(), HasSubstr("\"lin.weight\""));
  EXPECT_THAT(plan.status().message(), HasSubstr("missing from model m1"));
}

TEST_F(RegMeanTest, GramForANonLinearTensorIsRefused) {
  MakeModels({40, 25});
  inputs_[0].gram = Write("bias", {{"lin.weight", grams_[0].to(at::kFloat)},
                                   {"lin.bias", at::eye(5, at::kFloat)}});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  auto plan = PlanMerge(inputs_, options);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(plan.status().message(), HasSubstr("\"lin.bias\""));
}

TEST_F(RegMeanTest, AlphaOutOfRangeIsRefused) {
  MakeModels({40, 25});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  for (double alpha : {-0.1, 1.5, std::nan("")}) {
    options.alpha = alpha;
    auto plan = PlanMerge(inputs_, options);
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(plan.status().message(), HasSubstr("alpha must be in [0, 1]"));
  }
}

// ---------------------------------------------------------------------------
// Validation of names, shapes and options.

class ValidationTest : public MergeTest {
 protected:
  MergeInput Model(const std::string& label, Tensors tensors) {
    return Input(Write(label, tensors), 0, label);
  }
};

TEST_F(ValidationTest, OneModelIsRefused) {
  std::vector<MergeInput> inputs = {
      Model("m1", {{"x", at::zeros({2}, at::kFloat)}})};
  auto plan = PlanMerge(inputs, MergeOptions());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(plan.status().message(),
              HasSubstr("a merge needs at least two models, got 1"));
}

TEST_F(ValidationTest, ShapeMismatchNamesTheTensorAndBothShapes) {
  std::vector<MergeInput> inputs = {
      Model("m1", {{"x", at::zeros({4, 8}, at::kFloat)}}),
      Model("m2", {{"x", at::zeros({4, 9}, at::kFloat)}})};
  auto plan = PlanMerge(inputs, MergeOptions());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(
      plan.status().message(),
      HasSubstr("tensor \"x\" has shape [4, 8] in model m1 but [4, 9] in "
                "model m2"));
}

TEST_F(ValidationTest, DtypeMismatchIsRefused) {
  std::vector<MergeInput> inputs = {
      Model("m1", {{"x", at::zeros({4}, at::kFloat)}}),
      Model("m2", {{"x", at::zeros({4}, at::kHalf)}})};
  auto plan = PlanMerge(inputs, MergeOptions());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(plan.status().message(),
              HasSubstr("tensor \"x\" has dtype F32 in model m1 but F16 in "
                        "model m2"));
}

TEST_F(ValidationTest, MissingTensorNamesTheModelThatLacksIt) {
  std::vector<MergeInput> inputs = {
      Model("m1", {{"x", at::zeros({4}, at::kFloat)}}),
      Model("m2", {{"x", at::zeros({4}, at::kFloat)},
                   {"y", at::zeros({4}, at::kFloat)}})};
  auto plan = PlanMerge(inputs, MergeOptions());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(
      plan.status().message(),
      HasSubstr("tensor \"y\" is in model m2 but missing from model m1"));
  std::swap(inputs[0], inputs[1]);
  plan = PlanMerge(inputs, MergeOptions());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(
      plan.status().message(),
      HasSubstr("tensor \"y\" is in model m2 but missing from model m1"));
}

class ExclusionTest : public ValidationTest {
 protected:
  void SetUp() override {
    ValidationTest::SetUp();
    body_ = {Randn({3, 4}, 1).to(at::kFloat), Randn({3, 4}, 2).to(at::kFloat)};
    heads_ = {Randn({2, 3}, 3).to(at::kFloat), Randn({7, 3}, 4).to(at::kFloat)};
    inputs_ = {
        Model("m1", {{"body.weight", body_[0]}, {"head.weight", heads_[0]}}),
        Model("m2", {{"body.weight", body_[1]},
                     {"head.weight", heads_[1]},
                     {"head.extra", at::ones({5}, at::kFloat)}})};
    options_.exclude = {"head\\..*"};
  }
  std::vector<at::Tensor> body_, heads_;
  std::vector<MergeInput> inputs_;
  MergeOptions options_;
};

TEST_F(ExclusionTest, DifferingHeadsAreRefusedWithoutExclusion) {
  options_.exclude.clear();
  auto plan = PlanMerge(inputs_, options_);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(plan.status().message(), HasSubstr("\"head.weight\""));
}

TEST_F(ExclusionTest, ExcludedHeadsAreDropped) {
  auto out = Merge(inputs_, options_);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ((*out)->tensors().size(), 1u);
  EXPECT_EQ((*out)->tensors()[0].name, "body.weight");
  EXPECT_LE(RelErr(Read(**out, "body.weight"),
                   (body_[0].to(at::kDouble) + body_[1].to(at::kDouble)) / 2),
            1e-6);
}

TEST_F(ExclusionTest, ExcludedHeadsAreCopiedFromTheSecondModel) {
  options_.take_excluded_from = 1;
  auto plan = PlanMerge(inputs_, options_);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->tensors.size(), 3u);
  EXPECT_EQ(plan->tensors[1].info.name, "head.extra");
  EXPECT_EQ(plan->tensors[1].rule, TensorRule::kCopy);
  EXPECT_EQ(plan->tensors[1].copy_from, 1);
  auto out = Merge(inputs_, options_);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ((*out)->tensors().size(), 3u);
  const TensorInfo* head = (*out)->Find("head.weight");
  ASSERT_NE(head, nullptr);
  EXPECT_EQ(head->shape, (std::vector<int64_t>{7, 3}));
  EXPECT_TRUE(at::equal(Read(**out, "head.weight"), heads_[1].to(at::kDouble)));
  EXPECT_TRUE(at::equal(Read(**out, "head.extra"), at::ones({5}, at::kDouble)));
}

TEST_F(ExclusionTest, InvalidRegexIsRefusedNamingThePattern) {
  options_.exclude = {"head\\..*", "(unclosed"};
  auto plan = PlanMerge(inputs_, options_);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(plan.status().message(), HasSubstr("\"(unclosed\""));
}

TEST_F(ExclusionTest, SourceModelOutOfRangeIsRefused) {
  options_.take_excluded_from = 2;
  auto plan = PlanMerge(inputs_, options_);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(plan.status().message(), HasSubstr("take_excluded_from"));
}

TEST_F(ValidationTest, NegativeOrNonFiniteCoefficientIsRefused) {
  std::vector<MergeInput> inputs = {
      Model("m1", {{"x", at::zeros({4}, at::kFloat)}}),
      Model("m2", {{"x", at::zeros({4}, at::kFloat)}})};
  for (double c :
       {-1.0, std::numeric_limits<double>::infinity(), std::nan("")}) {
    inputs[1].coefficient = c;
    auto plan = PlanMerge(inputs, MergeOptions());
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(plan.status().message(), HasSubstr("coefficient of model m2"));
  }
}

TEST_F(ValidationTest, NegativeFisherFloorIsRefused) {
  std::vector<MergeInput> inputs = {
      Model("m1", {{"x", at::zeros({4}, at::kFloat)}}),
      Model("m2", {{"x", at::zeros({4}, at::kFloat)}})};
  MergeOptions options;
  options.fisher_floor = -1;
  auto plan = PlanMerge(inputs, options);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(plan.status().message(), HasSubstr("fisher_floor"));
}

// ---------------------------------------------------------------------------
// Execution: determinism, cancellation, progress, devices.

class ExecutionTest : public RegMeanTest {};

TEST_F(ExecutionTest, TwoRunsGiveByteIdenticalFiles) {
  coeffs_ = {1, 2, 3};
  MakeModels({40, 25, 60});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  auto plan = PlanMerge(inputs_, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_TRUE(
      ExecuteMerge(*plan, inputs_, options, Path("a"), nullptr, nullptr).ok());
  ASSERT_TRUE(
      ExecuteMerge(*plan, inputs_, options, Path("b"), nullptr, nullptr).ok());
  std::string a = ReadFile(Path("a"));
  EXPECT_FALSE(a.empty());
  EXPECT_TRUE(a == ReadFile(Path("b")));
}

TEST_F(ExecutionTest, ProgressReachesTheTotal) {
  MakeModels({40, 25});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  auto plan = PlanMerge(inputs_, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::vector<MergeProgress> seen;
  absl::Status s = ExecuteMerge(
      *plan, inputs_, options, Path("out"),
      [&seen](const MergeProgress& p) { seen.push_back(p); }, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0].tensors_done, 1);
  EXPECT_EQ(seen[0].bytes_done,
            static_cast<uint64_t>(out_ * 4));  // lin.bias first
  EXPECT_EQ(seen[1].tensors_done, seen[1].tensors_total);
  EXPECT_EQ(seen[1].tensors_total, 2);
  EXPECT_EQ(seen[1].bytes_done, plan->output_bytes);
  EXPECT_EQ(seen[1].bytes_total, plan->output_bytes);
}

TEST_F(ExecutionTest, CancellationReturnsCancelled) {
  MakeModels({40, 25});
  MergeOptions options;
  auto plan = PlanMerge(inputs_, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::atomic<bool> cancelled{true};
  absl::Status s =
      ExecuteMerge(*plan, inputs_, options, Path("out"), nullptr, &cancelled);
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);

  // Cancelled after the first tensor.
  cancelled = false;
  int calls = 0;
  s = ExecuteMerge(
      *plan, inputs_, options, Path("out2"),
      [&](const MergeProgress&) {
        ++calls;
        cancelled = true;
      },
      &cancelled);
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(s.message(), HasSubstr("1 of 2"));
  EXPECT_EQ(calls, 1);
  EXPECT_FALSE(std::filesystem::exists(Path("out2")));
}

TEST_F(ExecutionTest, AutoDeviceRunsTheMerge) {
  MakeModels({40, 25});
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.device = "auto";
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_LE(RelErr(Read(**out, "lin.weight"), Reference(0.9)), 1e-6);
}

// Merges in child processes of their own (merge_child) write the same bytes:
// for the elementwise methods under 1, 2 and 4 intra-op threads, with and
// without the write queue; for RegMean (whose last bits depend on the
// thread count, which its metadata records) under one thread count, with
// and without the write queue. The tensors are large enough to be split:
// 77 100 elements, and a 1101-feature Gram.
class ReproducibilityTest : public MergeTest {
 protected:
  void SetUp() override {
    MergeTest::SetUp();
    for (int i = 0; i < 3; ++i) {
      const std::string id = std::to_string(i);
      Tensors weights = {
          {"a", Randn({300, 257}, 10 + i).to(at::kFloat)},
          {"h", Randn({257, 300}, 20 + i).to(at::kHalf)},
          {"lin.weight", Randn({6, 1101}, 30 + i).to(at::kFloat)},
          {"lin.bias", Randn({6}, 40 + i).to(at::kFloat)}};
      Tensors fisher;
      for (const auto& [name, t] : weights) {
        fisher.push_back(
            {name, (Rand(t.sizes().vec(), 50 + i) + 0.01).to(t.scalar_type())});
      }
      const at::Tensor x = Randn({1500, 1101}, 60 + i);
      Write("w" + id, weights);
      Write("f" + id, fisher, {{"num_examples", "10"}});
      Write("g" + id, {{"lin.weight", x.t().matmul(x).to(at::kFloat)}},
            {{"num_examples", "1500"}});
    }
  }

  // The bytes merge_child writes for `method` (statistics from files
  // `statistics`0..2, none if empty) under `threads` and `queue_depth`.
  std::string ChildMerge(const std::string& method,
                         const std::string& statistics, int threads,
                         int queue_depth) {
    const std::string out =
        Path(absl::StrCat(method, "-", threads, "-", queue_depth));
    std::string command = absl::StrCat(AMALGAM_MERGE_CHILD, " ", method, " ",
                                       out, " ", threads, " ", queue_depth);
    for (int i = 0; i < 3; ++i) {
      absl::StrAppend(&command, " ", Path(absl::StrCat("w", i)), ",", i + 1);
      if (!statistics.empty()) {
        absl::StrAppend(&command, ",", Path(absl::StrCat(statistics, i)));
      }
    }
    EXPECT_EQ(std::system(command.c_str()), 0) << command;
    const std::string bytes = ReadFile(out);
    EXPECT_GT(bytes.size(), 300u * 257 * 4) << command;
    return bytes;
  }
};

TEST_F(ReproducibilityTest, ElementwiseMergesAreIdenticalAcrossProcesses) {
  for (const auto& [method, statistics] :
       {std::pair<std::string, std::string>{"weighted", ""},
        std::pair<std::string, std::string>{"fisher", "f"}}) {
    SCOPED_TRACE(method);
    const std::string first = ChildMerge(method, statistics, 1, 2);
    EXPECT_TRUE(first == ChildMerge(method, statistics, 1, 2));
    EXPECT_TRUE(first == ChildMerge(method, statistics, 2, 0))
        << "2 threads without the write queue differ";
    EXPECT_TRUE(first == ChildMerge(method, statistics, 4, 2))
        << "4 threads differ";
  }
}

TEST_F(ReproducibilityTest, RegMeanIsIdenticalAcrossProcessesAtOneThreadCount) {
  for (int threads : {1, 2}) {
    SCOPED_TRACE(threads);
    const std::string first = ChildMerge("regmean", "g", threads, 2);
    EXPECT_TRUE(first == ChildMerge("regmean", "g", threads, 2));
    EXPECT_TRUE(first == ChildMerge("regmean", "g", threads, 0))
        << "without the write queue";
  }
}

// The CUDA path of RegMean (a float32 solve refined in float64) and of the
// average, on a system large enough for the blocked factorisation, against
// the float64 normal equations.
TEST_F(ExecutionTest, OnCudaRegMeanMatchesTheNormalEquations) {
  AMALGAM_SKIP_WITHOUT_CUDA();
  MakeLargeModels();
  MergeOptions options;
  options.method = MergeMethod::kRegMean;
  options.device = "cuda";
  auto out = Merge(inputs_, options);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_LE(RelErr(Read(**out, "lin.weight"), Reference(0.9)), 1e-6);
  EXPECT_LE(RelErr(Read(**out, "lin.bias"), AverageBias()), 1e-6);
  EXPECT_EQ((*out)->metadata().at("amalgam.device"), "cuda:0");
}

// The fast mode on the device: float32 sums, factorisation and solve, the
// check in float64, the output error under the tolerance.
TEST_F(ExecutionTest, OnCudaFastPrecisionKeepsTheOutputErrorUnderItsTolerance) {
  AMALGAM_SKIP_WITHOUT_CUDA();
  MakeLargeModels();
  MergeOptions options;
  options.device = "cuda";
  at::Tensor merged;
  const MergeProgress last = MergeFast(options, merged);
  ASSERT_TRUE(merged.defined());
  EXPECT_EQ(last.fast_solves, 1);
  EXPECT_LE(OutputError(merged, Reference(0.9), Pooled(0.9)),
            options.fast_output_tolerance);
}

}  // namespace
}  // namespace amalgam::core
