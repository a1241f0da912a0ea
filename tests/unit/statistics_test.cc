// Upload-time validation of Gram and Fisher statistics (core/statistics).
#include "core/statistics.h"

#include <ATen/ATen.h>

#include <string>

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

TEST_F(StatisticsTest, NonFiniteStatisticsAreRefused) {
  at::Tensor g = at::eye(4);
  g[0][1] = std::numeric_limits<float>::quiet_NaN();
  auto status = ValidateGram(*Write("nan", {{"lin.weight", g}}), nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("lin.weight"));
}

}  // namespace
}  // namespace amalgam::core
