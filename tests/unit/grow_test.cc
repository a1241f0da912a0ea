#include "core/grow.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/unit/tensor_files.h"

namespace amalgam::core {
namespace {

using ::testing::HasSubstr;
using namespace testutil;  // NOLINT(build/namespaces)

class GrowTest : public TensorFilesTest {
 protected:
  // Plans and runs a growth; returns the grown model and the plan's report.
  absl::StatusOr<const SafetensorsReader*> Grow(const SafetensorsReader* a,
                                                const SafetensorsReader* b,
                                                const GrowOptions& options,
                                                nlohmann::json* report) {
    absl::StatusOr<GrowPlan> plan = PlanGrow(*a, b, options);
    if (!plan.ok()) return plan.status();
    *report = nlohmann::json::parse(plan->report_json);
    const std::string out = Path(absl::StrCat("grown", count_++));
    absl::Status s = ExecuteGrow(*plan, *a, b, options, out, nullptr, nullptr);
    if (!s.ok()) return s;
    return Open(out);
  }

  int count_ = 0;
};

GrowOptions Layout(const std::string& layout) {
  GrowOptions options;
  options.layout = layout;
  return options;
}

// Multiples of 2^-12: the mean of two such F32 values is exact in F32, so
// the grown model's averaged output bias carries no rounding.
at::Tensor Dyadic(const at::Tensor& t) { return (t * 4096).round() / 4096; }

// Three Linear layers `net.0`, `net.2`, `net.4` with ReLU in between.
Tensors Mlp(int64_t in, int64_t h1, int64_t h2, int64_t out, uint64_t seed) {
  return {{"net.0.weight", Randn({h1, in}, seed).to(at::kFloat)},
          {"net.0.bias", Randn({h1}, seed + 1).to(at::kFloat)},
          {"net.2.weight", Randn({h2, h1}, seed + 2).to(at::kFloat)},
          {"net.2.bias", Randn({h2}, seed + 3).to(at::kFloat)},
          {"net.4.weight", Randn({out, h2}, seed + 4).to(at::kFloat)},
          {"net.4.bias", Dyadic(Randn({out}, seed + 5)).to(at::kFloat)}};
}

// The MLP's output for the rows of `x`, in float64 from the stored weights.
at::Tensor MlpForward(const SafetensorsReader& m, const at::Tensor& x) {
  at::Tensor h = x;
  for (int layer : {0, 2, 4}) {
    const std::string p = absl::StrCat("net.", layer, ".");
    h = at::matmul(h, TensorFilesTest::Read(m, p + "weight").t()) +
        TensorFilesTest::Read(m, p + "bias");
    if (layer != 4) h = at::relu(h);
  }
  return h;
}

TEST_F(GrowTest, GrownMlpComputesTheMeanOfItsParents) {
  const SafetensorsReader* a = Write("a", Mlp(4, 6, 5, 3, 10));
  const SafetensorsReader* b = Write("b", Mlp(4, 7, 2, 3, 20));
  nlohmann::json report;
  auto grown = Grow(a, b, Layout("mlp"), &report);
  ASSERT_TRUE(grown.ok()) << grown.status();
  const at::Tensor x = Randn({32, 4}, 7);
  const at::Tensor want = (MlpForward(*a, x) + MlpForward(*b, x)) / 2;
  EXPECT_LE(RelErr(MlpForward(**grown, x), want), 1e-10);
  EXPECT_EQ(report["config"]["widths"], nlohmann::json({4, 13, 7, 3}));
  EXPECT_EQ(report["properties"]["output_is_mean_of_inputs"], true);
  EXPECT_EQ((*grown)->Find("net.2.weight")->shape,
            (std::vector<int64_t>{7, 13}));
  auto metadata = (*grown)->metadata();
  EXPECT_EQ(nlohmann::json::parse(metadata.at("amalgam.grow.report")), report);
}

TEST_F(GrowTest, SelfFusionKeepsTheFunction) {
  const SafetensorsReader* a = Write("a", Mlp(4, 6, 5, 3, 30));
  nlohmann::json report;
  auto grown = Grow(a, nullptr, Layout("mlp"), &report);
  ASSERT_TRUE(grown.ok()) << grown.status();
  const at::Tensor x = Randn({16, 4}, 8);
  EXPECT_LE(RelErr(MlpForward(**grown, x), MlpForward(*a, x)), 1e-12);
  EXPECT_EQ(report["self_fusion"], true);
  EXPECT_EQ(report["config"]["widths"], nlohmann::json({4, 12, 10, 3}));
}

TEST_F(GrowTest,
       NoiseFillsBothOffDiagonalBlocksOnlyDeterministicallyAndIsReported) {
  const SafetensorsReader* a = Write("a", Mlp(4, 6, 5, 3, 40));
  const SafetensorsReader* b = Write("b", Mlp(4, 6, 5, 3, 50));
  GrowOptions options = Layout("mlp");
  options.noise_scale = 0.01;
  nlohmann::json report;
  auto grown = Grow(a, b, options, &report);
  ASSERT_TRUE(grown.ok()) << grown.status();
  const at::Tensor w = Read(**grown, "net.2.weight");
  EXPECT_TRUE(
      at::equal(w.slice(0, 0, 5).slice(1, 0, 6), Read(*a, "net.2.weight")));
  EXPECT_TRUE(at::equal(w.slice(0, 5).slice(1, 6), Read(*b, "net.2.weight")));
  // Both off-diagonal blocks hold noise, each its own.
  const at::Tensor upper = w.slice(0, 0, 5).slice(1, 6);
  const at::Tensor lower = w.slice(0, 5).slice(1, 0, 6);
  for (const at::Tensor& block : {upper, lower}) {
    EXPECT_GT(block.abs().min().item<double>(), 0) << "a zero in the noise";
    EXPECT_LT(block.std().item<double>(), 0.02);
  }
  EXPECT_FALSE(at::equal(upper, lower));
  EXPECT_EQ(report["properties"]["output_is_mean_of_inputs"], false);
  // Same inputs and options: the same bytes, noise included.
  auto again = Grow(a, b, options, &report);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(ReadFile(Path("grown0")), ReadFile(Path("grown1")));
}

TEST_F(GrowTest, AOneLayerMlpAveragesItsOnlyLayer) {
  // One Linear layer is both the first and the last: its outputs are the
  // model's, so it takes the average (the `average` role), not a
  // concatenation.
  const Tensors one_a = {
      {"net.0.weight", Dyadic(Randn({3, 4}, 90)).to(at::kFloat)},
      {"net.0.bias", Dyadic(Randn({3}, 91)).to(at::kFloat)}};
  const Tensors one_b = {
      {"net.0.weight", Dyadic(Randn({3, 4}, 92)).to(at::kFloat)},
      {"net.0.bias", Dyadic(Randn({3}, 93)).to(at::kFloat)}};
  const SafetensorsReader* a = Write("one_a", one_a);
  const SafetensorsReader* b = Write("one_b", one_b);
  nlohmann::json report;
  auto grown = Grow(a, b, Layout("mlp"), &report);
  ASSERT_TRUE(grown.ok()) << grown.status();
  EXPECT_EQ((*grown)->Find("net.0.weight")->shape,
            (std::vector<int64_t>{3, 4}));
  EXPECT_LE(RelErr(Read(**grown, "net.0.weight"),
                   (Read(*a, "net.0.weight") + Read(*b, "net.0.weight")) / 2),
            1e-12);
  EXPECT_LE(RelErr(Read(**grown, "net.0.bias"),
                   (Read(*a, "net.0.bias") + Read(*b, "net.0.bias")) / 2),
            1e-12);
}

TEST_F(GrowTest, ModelsOfOtherNamesOrDtypesAreRefusedNamingTheTensor) {
  const SafetensorsReader* a = Write("na", Mlp(4, 6, 5, 3, 94));
  Tensors renamed = Mlp(4, 6, 5, 3, 95);
  renamed[2].first = "net.3.weight";
  const SafetensorsReader* b = Write("nb", renamed);
  nlohmann::json report;
  auto names = Grow(a, b, Layout("mlp"), &report);
  EXPECT_EQ(names.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(names.status().message(),
              HasSubstr("model B has no tensor \"net.2.weight\""));
  Tensors doubled = Mlp(4, 6, 5, 3, 96);
  for (auto& [name, t] : doubled) t = t.to(at::kDouble);
  auto dtypes = Grow(a, Write("nd", doubled), Layout("mlp"), &report);
  EXPECT_EQ(dtypes.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(dtypes.status().message(), HasSubstr("is F32 in A but F64 in B"));
}

TEST_F(GrowTest, MlpErrorsNameTheTensor) {
  Tensors odd = Mlp(4, 6, 5, 3, 60);
  odd.push_back({"head.weight", Randn({2, 3}, 61).to(at::kFloat)});
  const SafetensorsReader* a = Write("odd", odd);
  nlohmann::json report;
  auto misfit = Grow(a, nullptr, Layout("mlp"), &report);
  EXPECT_EQ(misfit.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(misfit.status().message(), HasSubstr("head.weight"));

  const SafetensorsReader* x = Write("x", Mlp(4, 6, 5, 3, 70));
  const SafetensorsReader* y = Write("y", Mlp(4, 6, 5, 2, 80));
  auto outputs = Grow(x, y, Layout("mlp"), &report);
  EXPECT_EQ(outputs.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(outputs.status().message(), HasSubstr("\"net.4."));

  auto unknown = Grow(x, y, Layout("resnet"), &report);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unknown.status().message(), HasSubstr("resnet"));
}

constexpr int64_t kPositions = 8;

// A GPT-2-shaped model (Conv1D weights [in, out]) of width `d`.
Tensors Gpt2(int64_t d, uint64_t seed) {
  constexpr int64_t kVocab = 11;
  Tensors t = {
      {"wte.weight", Randn({kVocab, d}, seed)},
      {"wpe.weight", Randn({kPositions, d}, seed + 1)},
      {"ln_f.weight", Rand({d}, seed + 2) + 0.5},
      {"ln_f.bias", Randn({d}, seed + 3)},
      {"lm_head.weight", Randn({kVocab, d}, seed + 4)},
  };
  for (int l = 0; l < 2; ++l) {
    const std::string p = absl::StrCat("h.", l, ".");
    const uint64_t s = seed + 10 * (l + 1);
    t.push_back({p + "ln_1.weight", Rand({d}, s) + 0.5});
    t.push_back({p + "ln_1.bias", Randn({d}, s + 1)});
    t.push_back({p + "attn.c_attn.weight", Randn({d, 3 * d}, s + 2) / 3});
    t.push_back({p + "attn.c_attn.bias", Randn({3 * d}, s + 3)});
    t.push_back({p + "attn.c_proj.weight", Randn({d, d}, s + 4) / 3});
    t.push_back({p + "attn.c_proj.bias", Randn({d}, s + 5)});
    t.push_back({p + "ln_2.weight", Rand({d}, s + 6) + 0.5});
    t.push_back({p + "ln_2.bias", Randn({d}, s + 7)});
    t.push_back({p + "mlp.c_fc.weight", Randn({d, 4 * d}, s + 8) / 3});
    t.push_back({p + "mlp.c_fc.bias", Randn({4 * d}, s + 9)});
    t.push_back({p + "mlp.c_proj.weight", Randn({4 * d, d}, s + 10) / 6});
    t.push_back({p + "mlp.c_proj.bias", Randn({d}, s + 11)});
  }
  for (auto& [name, tensor] : t) tensor = tensor.to(at::kFloat);
  return t;
}

// The same model as GPT2LMHeadModel's state dict holds it: "transformer."
// before every name but lm_head's, and each layer's attention buffers
// (the causal mask `attn.bias`, [1, 1, positions, positions], and the scalar
// `attn.masked_bias`), which no forward pass here reads.
Tensors Gpt2HuggingFaceLayout(int64_t d, uint64_t seed) {
  Tensors t;
  for (auto& [name, tensor] : Gpt2(d, seed)) {
    t.push_back(
        {name == "lm_head.weight" ? name : "transformer." + name, tensor});
  }
  for (int l = 0; l < 2; ++l) {
    const std::string p = absl::StrCat("transformer.h.", l, ".attn.");
    t.push_back({p + "bias", at::ones({kPositions, kPositions}, at::kFloat)
                                 .tril()
                                 .view({1, 1, kPositions, kPositions})});
    t.push_back({p + "masked_bias", at::full({}, -1e4, at::kFloat)});
  }
  return t;
}

// GPT-2 logits for token ids `ids` with `heads` heads (head size 4), in
// float64; LayerNorm is identity unless `layer_norm`. Every name but
// lm_head's is read with `prefix` before it.
at::Tensor Gpt2Forward(const SafetensorsReader& m, const at::Tensor& ids,
                       int64_t heads, bool layer_norm,
                       const std::string& prefix = "") {
  auto w = [&](const std::string& name) {
    return TensorFilesTest::Read(
        m, name == "lm_head.weight" ? name : prefix + name);
  };
  auto norm = [&](const at::Tensor& x, const std::string& p) {
    if (!layer_norm) return x;
    return at::layer_norm(x, {x.size(-1)}, w(p + ".weight"), w(p + ".bias"));
  };
  const int64_t T = ids.size(0);
  at::Tensor x =
      w("wte.weight").index_select(0, ids) + w("wpe.weight").slice(0, 0, T);
  const int64_t d = x.size(1), hd = d / heads;
  const at::Tensor mask =
      at::ones({T, T}, at::kBool).triu(1);  // true above the diagonal
  for (int l = 0; l < 2; ++l) {
    const std::string p = absl::StrCat("h.", l, ".");
    at::Tensor h = norm(x, p + "ln_1");
    at::Tensor qkv =
        at::matmul(h, w(p + "attn.c_attn.weight")) + w(p + "attn.c_attn.bias");
    std::vector<at::Tensor> parts = qkv.split(d, 1);
    auto split = [&](const at::Tensor& t) {
      return t.reshape({T, heads, hd}).transpose(0, 1);  // heads, T, hd
    };
    at::Tensor att =
        at::matmul(split(parts[0]), split(parts[1]).transpose(1, 2)) /
        std::sqrt(static_cast<double>(hd));
    att = at::softmax(att.masked_fill(mask, -INFINITY), -1);
    at::Tensor o =
        at::matmul(att, split(parts[2])).transpose(0, 1).reshape({T, d});
    x = x + at::matmul(o, w(p + "attn.c_proj.weight")) +
        w(p + "attn.c_proj.bias");
    h = norm(x, p + "ln_2");
    at::Tensor f = at::gelu(at::matmul(h, w(p + "mlp.c_fc.weight")) +
                            w(p + "mlp.c_fc.bias"));
    x = x + at::matmul(f, w(p + "mlp.c_proj.weight")) +
        w(p + "mlp.c_proj.bias");
  }
  return at::matmul(norm(x, "ln_f"), w("lm_head.weight").t());
}

TEST_F(GrowTest, Gpt2WithoutLayerNormComputesTheMeanOfItsParents) {
  // A: 2 heads of size 4; B: 3 heads of size 4; grown: 5 heads.
  const SafetensorsReader* a = Write("a", Gpt2(8, 100), {{"n_head", "2"}});
  const SafetensorsReader* b = Write("b", Gpt2(12, 200), {{"n_head", "3"}});
  nlohmann::json report;
  auto grown = Grow(a, b, Layout("gpt2"), &report);
  ASSERT_TRUE(grown.ok()) << grown.status();
  EXPECT_EQ((*grown)->Find("h.0.attn.c_attn.weight")->shape,
            (std::vector<int64_t>{20, 60}));
  EXPECT_EQ((*grown)->Find("wte.weight")->shape,
            (std::vector<int64_t>{11, 20}));
  EXPECT_EQ(report["config"]["n_embd"], 20);
  EXPECT_EQ(report["config"]["n_layer"], 2);
  EXPECT_EQ(report["config"]["n_head"], 5);

  const at::Tensor ids = at::tensor({3, 1, 4, 1, 5, 9, 2}, at::kLong);
  const at::Tensor want =
      (Gpt2Forward(*a, ids, 2, false) + Gpt2Forward(*b, ids, 3, false)) / 2;
  EXPECT_LE(RelErr(Gpt2Forward(**grown, ids, 5, false), want), 1e-10);
  EXPECT_EQ(report["properties"]["output_is_mean_of_inputs_without_layernorm"],
            true);
  // With LayerNorm the property does not hold, and the report says so.
  const at::Tensor with_norm =
      (Gpt2Forward(*a, ids, 2, true) + Gpt2Forward(*b, ids, 3, true)) / 2;
  EXPECT_GT(RelErr(Gpt2Forward(**grown, ids, 5, true), with_norm), 1e-3);
  EXPECT_EQ(report["properties"]["output_is_mean_of_inputs"], false);
  EXPECT_THAT(report["caveats"][0].get<std::string>(), HasSubstr("LayerNorm"));
}

// The built-in layout reads Hugging Face's names: the "transformer." prefix,
// and the attention buffers copied from A byte for byte.
TEST_F(GrowTest, Gpt2InTheHuggingFaceLayoutKeepsItsNamesAndCopiesItsBuffers) {
  const SafetensorsReader* a =
      Write("a", Gpt2HuggingFaceLayout(8, 100), {{"n_head", "2"}});
  const SafetensorsReader* b =
      Write("b", Gpt2HuggingFaceLayout(12, 200), {{"n_head", "3"}});
  nlohmann::json report;
  auto grown = Grow(a, b, Layout("gpt2"), &report);
  ASSERT_TRUE(grown.ok()) << grown.status();
  const SafetensorsReader& g = **grown;
  ASSERT_EQ(g.tensors().size(), a->tensors().size());
  for (const TensorInfo& t : a->tensors()) {
    const TensorInfo* out = g.Find(t.name);
    ASSERT_NE(out, nullptr) << t.name << " is missing from the grown model";
    if (absl::EndsWith(t.name, ".attn.bias") ||
        absl::EndsWith(t.name, ".attn.masked_bias")) {
      EXPECT_EQ(out->shape, t.shape) << t.name;
      EXPECT_TRUE(std::equal(g.Data(*out).begin(), g.Data(*out).end(),
                             a->Data(t).begin(), a->Data(t).end()))
          << t.name << " is not A's";
    }
  }
  EXPECT_EQ(g.Find("transformer.h.1.attn.c_attn.weight")->shape,
            (std::vector<int64_t>{20, 60}));
  EXPECT_EQ(g.Find("transformer.h.0.attn.bias")->shape,
            (std::vector<int64_t>{1, 1, kPositions, kPositions}));
  EXPECT_EQ(report["config"]["n_embd"], 20);
  EXPECT_EQ(report["config"]["n_head"], 5);

  const at::Tensor ids = at::tensor({3, 1, 4, 1, 5, 9, 2}, at::kLong);
  const std::string p = "transformer.";
  const at::Tensor want =
      (Gpt2Forward(*a, ids, 2, false, p) + Gpt2Forward(*b, ids, 3, false, p)) /
      2;
  EXPECT_LE(RelErr(Gpt2Forward(g, ids, 5, false, p), want), 1e-10);
}

// A BERT-shaped model (Hugging Face names, one layer) of width `d`.
Tensors Bert(int64_t d, uint64_t seed) {
  Tensors t = {
      {"bert.embeddings.word_embeddings.weight", Randn({13, d}, seed + 1)},
      {"bert.embeddings.position_embeddings.weight", Randn({6, d}, seed + 2)},
      {"bert.embeddings.token_type_embeddings.weight", Randn({2, d}, seed + 3)},
      {"bert.embeddings.LayerNorm.weight", Rand({d}, seed)},
      {"bert.embeddings.LayerNorm.bias", Randn({d}, seed)},
      {"bert.pooler.dense.weight", Randn({d, d}, seed + 4) / 3},
      {"bert.pooler.dense.bias", Randn({d}, seed)},
      {"classifier.weight", Randn({3, d}, seed + 5)},
      {"classifier.bias", Dyadic(Randn({3}, seed + 6))},
  };
  const std::string p = "bert.encoder.layer.0.";
  for (const char* m : {"query", "key", "value"}) {
    t.push_back({p + "attention.self." + m + ".weight",
                 Randn({d, d}, seed + 7 + m[0]) / 3});
    t.push_back(
        {p + "attention.self." + m + ".bias", Randn({d}, seed + 8 + m[0])});
  }
  t.push_back(
      {p + "attention.output.dense.weight", Randn({d, d}, seed + 9) / 3});
  t.push_back({p + "attention.output.dense.bias", Randn({d}, seed)});
  t.push_back({p + "attention.output.LayerNorm.weight", Rand({d}, seed)});
  t.push_back({p + "attention.output.LayerNorm.bias", Randn({d}, seed)});
  t.push_back(
      {p + "intermediate.dense.weight", Randn({4 * d, d}, seed + 10) / 3});
  t.push_back({p + "intermediate.dense.bias", Randn({4 * d}, seed)});
  t.push_back({p + "output.dense.weight", Randn({d, 4 * d}, seed + 11) / 6});
  t.push_back({p + "output.dense.bias", Randn({d}, seed)});
  t.push_back({p + "output.LayerNorm.weight", Rand({d}, seed)});
  t.push_back({p + "output.LayerNorm.bias", Randn({d}, seed)});
  for (auto& [name, tensor] : t) tensor = tensor.to(at::kFloat);
  return t;
}

// BERT logits for `ids` (segment 0) with `heads` heads of size 4, float64;
// LayerNorm is the identity.
at::Tensor BertForward(const SafetensorsReader& m, const at::Tensor& ids,
                       int64_t heads) {
  auto w = [&](const std::string& name) {
    return TensorFilesTest::Read(m, name);
  };
  auto linear = [&](const at::Tensor& x, const std::string& p) {
    return at::matmul(x, w(p + ".weight").t()) + w(p + ".bias");
  };
  const int64_t T = ids.size(0);
  const std::string e = "bert.embeddings.";
  at::Tensor x = w(e + "word_embeddings.weight").index_select(0, ids) +
                 w(e + "position_embeddings.weight").slice(0, 0, T) +
                 w(e + "token_type_embeddings.weight")[0];
  const int64_t d = x.size(1), hd = d / heads;
  const std::string p = "bert.encoder.layer.0.";
  auto split = [&](const at::Tensor& t) {
    return t.reshape({T, heads, hd}).transpose(0, 1);
  };
  at::Tensor att = at::softmax(
      at::matmul(split(linear(x, p + "attention.self.query")),
                 split(linear(x, p + "attention.self.key")).transpose(1, 2)) /
          std::sqrt(static_cast<double>(hd)),
      -1);
  at::Tensor context =
      at::matmul(att, split(linear(x, p + "attention.self.value")))
          .transpose(0, 1)
          .reshape({T, d});
  x = x + linear(context, p + "attention.output.dense");
  x = x +
      linear(at::gelu(linear(x, p + "intermediate.dense")), p + "output.dense");
  const at::Tensor pooled = at::tanh(linear(x[0], "bert.pooler.dense"));
  return linear(pooled, "classifier");
}

TEST_F(GrowTest, BertWithoutLayerNormComputesTheMeanOfItsParents) {
  const SafetensorsReader* a = Write("a", Bert(8, 300));   // 2 heads
  const SafetensorsReader* b = Write("b", Bert(12, 400));  // 3 heads
  nlohmann::json report;
  auto grown = Grow(a, b, Layout("bert"), &report);
  ASSERT_TRUE(grown.ok()) << grown.status();
  const at::Tensor ids = at::tensor({2, 7, 1, 8, 2}, at::kLong);
  const at::Tensor want =
      (BertForward(*a, ids, 2) + BertForward(*b, ids, 3)) / 2;
  EXPECT_LE(RelErr(BertForward(**grown, ids, 5), want), 1e-10);
  EXPECT_EQ(report["properties"]["output_is_mean_of_inputs_without_layernorm"],
            true);
}

TEST_F(GrowTest, BertShapesAndConfig) {
  const SafetensorsReader* a = Write("a", Bert(8, 1));
  nlohmann::json report;
  auto grown = Grow(a, nullptr, Layout("bert"), &report);
  ASSERT_TRUE(grown.ok()) << grown.status();
  auto shape = [&](const std::string& name) {
    return (*grown)->Find(name)->shape;
  };
  using Shape = std::vector<int64_t>;
  EXPECT_EQ(shape("bert.embeddings.word_embeddings.weight"), (Shape{13, 16}));
  EXPECT_EQ(shape("bert.encoder.layer.0.attention.self.query.weight"),
            (Shape{16, 16}));
  EXPECT_EQ(shape("bert.encoder.layer.0.intermediate.dense.weight"),
            (Shape{64, 16}));
  EXPECT_EQ(shape("bert.encoder.layer.0.output.LayerNorm.weight"), (Shape{16}));
  EXPECT_EQ(shape("classifier.weight"), (Shape{3, 16}));
  EXPECT_EQ(shape("classifier.bias"), (Shape{3}));
  EXPECT_TRUE(
      at::equal(Read(**grown, "classifier.bias"), Read(*a, "classifier.bias")));
  EXPECT_EQ(report["config"]["hidden_size"], 16);
  EXPECT_EQ(report["config"]["num_hidden_layers"], 1);
  EXPECT_TRUE(report["config"]["num_attention_heads"].is_null());
  EXPECT_EQ(report["properties"]["output_is_mean_of_inputs"], false);
}

TEST_F(GrowTest, UserRulesAssignRoles) {
  const SafetensorsReader* a = Write("a", Mlp(4, 6, 5, 3, 90));
  const SafetensorsReader* b = Write("b", Mlp(4, 3, 2, 3, 91));
  GrowOptions options = Layout("rules");
  options.rules =
      "# the same roles as the mlp layout\n"
      "net\\.0\\.weight input\n"
      "net\\.2\\.weight hidden\n"
      "net\\.4\\.weight output\n"
      "net\\.4\\.bias   average\n"
      "net\\.\\d\\.bias concat\n";
  nlohmann::json report;
  auto grown = Grow(a, b, options, &report);
  ASSERT_TRUE(grown.ok()) << grown.status();
  const at::Tensor x = Randn({8, 4}, 9);
  EXPECT_LE(RelErr(MlpForward(**grown, x),
                   (MlpForward(*a, x) + MlpForward(*b, x)) / 2),
            1e-10);

  options.rules = "net\\.0\\..* input\n";
  auto unmatched = Grow(a, b, options, &report);
  EXPECT_EQ(unmatched.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unmatched.status().message(), HasSubstr("net.2.bias"));
  options.rules = ".* widen\n";
  auto bad_role = Grow(a, b, options, &report);
  EXPECT_EQ(bad_role.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_role.status().message(), HasSubstr("widen"));
}

}  // namespace
}  // namespace amalgam::core
