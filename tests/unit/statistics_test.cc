// Upload-time validation of Gram and Fisher statistics (core/statistics).
#include "core/statistics.h"

#include <ATen/ATen.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/tensor_files.h"

namespace amalgam::core {
namespace {

using ::testing::HasSubstr;
using namespace testutil;  // NOLINT(build/namespaces)

class StatisticsTest : public TensorFilesTest {
 protected:
  const SafetensorsReader* Weights() {
    return Write(
        "w", {{"lin.weight", at::ones({3, 4})}, {"lin.bias", at::ones({3})}});
  }
};

TEST_F(StatisticsTest, NegativeFisherIsRefusedInEveryDtypeButMinusZeroIsNot) {
  const SafetensorsReader* weights = Weights();
  for (at::ScalarType dtype :
       {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    SCOPED_TRACE(dtype);
    at::Tensor f = at::ones({3, 4}, dtype);
    f[1][2] = -0.5;
    auto status = ValidateFisher(
        *Write("neg", {{"lin.weight", f}, {"lin.bias", at::ones({3}, dtype)}}),
        weights);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(status.message(),
                HasSubstr("Fisher \"lin.weight\" is negative at element 6"));
    f[1][2] = -0.0;
    EXPECT_TRUE(
        ValidateFisher(*Write("zero", {{"lin.weight", f}}), weights).ok());
  }
}

TEST_F(StatisticsTest, FisherOfAnotherShapeOrTensorIsAFailedPrecondition) {
  const SafetensorsReader* weights = Weights();
  auto shape =
      ValidateFisher(*Write("s", {{"lin.weight", at::ones({4, 3})}}), weights);
  EXPECT_EQ(shape.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(shape.message(),
              HasSubstr("has shape [4, 3] but the weight has [3, 4]"));
  auto name = ValidateFisher(*Write("n", {{"other", at::ones({3})}}), weights);
  EXPECT_EQ(name.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(name.message(), HasSubstr("Fisher \"other\" names no tensor"));
  // Without the described weights only the values are checked.
  EXPECT_TRUE(
      ValidateFisher(*Write("free", {{"other", at::ones({3})}}), nullptr).ok());
}

TEST_F(StatisticsTest, GramMetadataMustSayHowItWasReduced) {
  const at::Tensor g = at::eye(4);
  for (const auto& [key, value, message] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"reduction", "max",
            "reduction is \"max\"; expected \"sum\" or \"mean\""},
           {"num_examples", "0",
            "num_examples is \"0\"; expected a positive integer"},
           {"num_examples", "12x", "num_examples is \"12x\""}}) {
    SCOPED_TRACE(key + "=" + value);
    auto status = ValidateGram(
        *Write("meta", {{"lin.weight", g}}, {{key, value}}), nullptr);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(status.message(), HasSubstr(message));
  }
  EXPECT_TRUE(
      ValidateGram(*Write("ok", {{"lin.weight", g}},
                          {{"reduction", "mean"}, {"num_examples", "7"}}),
                   nullptr)
          .ok());
}

TEST_F(StatisticsTest, GramMustBeSquareAndNameA2DWeightOfTheRightWidth) {
  const SafetensorsReader* weights = Weights();
  auto square =
      ValidateGram(*Write("r", {{"lin.weight", at::ones({4, 3})}}), weights);
  EXPECT_EQ(square.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(square.message(), HasSubstr("a Gram must be square"));
  auto bias = ValidateGram(*Write("b", {{"lin.bias", at::eye(3)}}), weights);
  EXPECT_EQ(bias.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(bias.message(), HasSubstr("\"lin.bias\" names no 2-D weight"));
  auto width =
      ValidateGram(*Write("w3", {{"lin.weight", at::eye(3)}}), weights);
  EXPECT_EQ(width.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(width.message(), HasSubstr("needs [4, 4]"));
  EXPECT_TRUE(
      ValidateGram(*Write("fine", {{"lin.weight", at::eye(4)}}), weights).ok());
}

TEST_F(StatisticsTest, GramAliasesNameATensorOfTheFileAndAWeightOfItsWidth) {
  const SafetensorsReader* weights = Write("qkv", {{"a.q", at::ones({3, 4})},
                                                   {"a.k", at::ones({2, 4})},
                                                   {"a.o", at::ones({4, 5})}});
  const at::Tensor g = at::eye(4);
  const SafetensorsReader* good =
      Write("good", {{"a.q", g}}, {{"alias.a.k", "a.q"}});
  EXPECT_TRUE(ValidateGram(*good, weights).ok());
  EXPECT_EQ(FindGram(*good, "a.k"), good->Find("a.q"));
  EXPECT_EQ(FindGram(*good, "a.q"), good->Find("a.q"));
  EXPECT_EQ(FindGram(*good, "a.o"), nullptr);
  EXPECT_THAT(GramNames(*good), ::testing::ElementsAre("a.k", "a.q"));

  struct Case {
    const char* weight;  // the alias's: alias.<weight> = a.q
    const char* target;
    bool tensor_too;  // a.k also a tensor of the file
    bool described;   // checked against `weights`
    absl::StatusCode code;
    const char* message;
  };
  for (const Case& c : std::vector<Case>{
           {"a.k", "a.v", false, false, absl::StatusCode::kInvalidArgument,
            "Gram alias \"alias.a.k\" names \"a.v\", which is not a tensor "
            "of the file"},
           {"a.k", "a.q", true, false, absl::StatusCode::kInvalidArgument,
            "Gram \"a.k\" is both a tensor of the file and an alias"},
           {"", "a.q", false, false, absl::StatusCode::kInvalidArgument,
            "Gram alias \"alias.\" names no weight"},
           // The alias's weight must take the Gram's width.
           {"a.o", "a.q", false, true, absl::StatusCode::kFailedPrecondition,
            "Gram for tensor \"a.o\" has shape [4, 4] but the weight [4, 5] "
            "needs [5, 5]"},
           {"a.x", "a.q", false, true, absl::StatusCode::kFailedPrecondition,
            "Gram \"a.x\" names no 2-D weight"},
       }) {
    SCOPED_TRACE(c.message);
    Tensors tensors = {{"a.q", g}};
    if (c.tensor_too) tensors.push_back({"a.k", g});
    const auto status = ValidateGram(
        *Write("bad", tensors, {{std::string("alias.") + c.weight, c.target}}),
        c.described ? weights : nullptr);
    EXPECT_EQ(status.code(), c.code);
    EXPECT_THAT(status.message(), HasSubstr(c.message));
  }
}

TEST_F(StatisticsTest, IdenticalTensorsAreFoundByTheirBytes) {
  const at::Tensor g = Randn({6, 6}, 1).to(at::kFloat);
  at::Tensor other = g.clone();
  other[5][5] = std::nextafter(other[5][5].item<float>(), 1e9f);
  const SafetensorsReader* reader =
      Write("g", {{"c", g},
                  {"a", g},
                  {"b", other},
                  {"d", g.to(at::kDouble)},  // equal values, other bytes
                  {"e", g.reshape({4, 9})},  // same bytes, other shape
                  {"f", g}});
  const std::map<std::string, std::string> identical =
      IdenticalTensors(*reader);
  EXPECT_EQ(identical,
            (std::map<std::string, std::string>{{"c", "a"}, {"f", "a"}}));
}

TEST_F(StatisticsTest, NonFiniteStatisticsAreRefused) {
  at::Tensor g = at::eye(4);
  g[0][1] = std::numeric_limits<float>::quiet_NaN();
  auto status = ValidateGram(*Write("nan", {{"lin.weight", g}}), nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("lin.weight"));
}

}  // namespace
}  // namespace amalgam::core
