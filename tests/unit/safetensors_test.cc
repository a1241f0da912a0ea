#include "core/safetensors.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/model_files.h"
#include "core/model_writer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace amalgam::core {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<uint8_t>;

// Passes when `status` has `code` and its message contains `substring`.
::testing::AssertionResult HasError(const absl::Status& status,
                                    absl::StatusCode code,
                                    const std::string& substring) {
  if (status.code() == code &&
      std::string(status.message()).find(substring) != std::string::npos) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure()
         << "got " << status << "; want code " << absl::StatusCodeToString(code)
         << " and message containing \"" << substring << "\"";
}

template <typename T>
Bytes ToBytes(const std::vector<T>& values) {
  Bytes bytes(values.size() * sizeof(T));
  if (!bytes.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

template <typename T>
std::vector<T> FromBytes(absl::Span<const uint8_t> bytes) {
  std::vector<T> values(bytes.size() / sizeof(T));
  if (!values.empty()) std::memcpy(values.data(), bytes.data(), bytes.size());
  return values;
}

Bytes ToBytes(absl::Span<const uint8_t> span) {
  return Bytes(span.begin(), span.end());
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// IEEE half -> float, independent of the code under test.
float HalfToFloat(uint16_t bits) {
  const int sign = (bits >> 15) ? -1 : 1;
  const int exponent = (bits >> 10) & 0x1F;
  const int mantissa = bits & 0x3FF;
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  if (exponent == 31) {
    return mantissa ? std::numeric_limits<float>::quiet_NaN()
                    : sign * std::numeric_limits<float>::infinity();
  }
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

uint32_t FloatBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* env = std::getenv("AMALGAM_TEST_TMPDIR");
    const fs::path base = env != nullptr && *env != '\0'
                              ? fs::path(env)
                              : fs::temp_directory_path();
    fs::create_directories(base);
    std::string pattern = (base / "safetensors_test.XXXXXX").string();
    ASSERT_NE(mkdtemp(pattern.data()), nullptr) << std::strerror(errno);
    dir_ = pattern;
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }

  std::string Path(const std::string& name) const {
    return (fs::path(dir_) / name).string();
  }

  // Writes a file with an 8-byte length (`header.size()` unless
  // `declared_length` is given), `header` and `data`.
  std::string WriteRaw(const std::string& name, const std::string& header,
                       const Bytes& data = {},
                       int64_t declared_length = -1) const {
    const std::string path = Path(name);
    std::ofstream out(path, std::ios::binary);
    const uint64_t length = declared_length >= 0
                                ? static_cast<uint64_t>(declared_length)
                                : header.size();
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>(length >> (8 * i)));
    out << header;
    out.write(reinterpret_cast<const char*>(data.data()),
              static_cast<std::streamsize>(data.size()));
    return path;
  }

  // Writes `specs` with `data` (one byte vector per spec) through the writer.
  std::string Write(const std::string& name,
                    const std::vector<TensorSpec>& specs,
                    const std::vector<Bytes>& data,
                    const std::map<std::string, std::string>& metadata = {}) {
    const std::string path = Path(name);
    auto writer = SafetensorsWriter::Create(path, specs, metadata);
    EXPECT_TRUE(writer.ok()) << writer.status();
    if (!writer.ok()) return path;
    for (const Bytes& bytes : data) {
      EXPECT_TRUE((*writer)->Append(bytes).ok());
    }
    absl::Status finished = (*writer)->Finish();
    EXPECT_TRUE(finished.ok()) << finished;
    return path;
  }

  std::string dir_;
};

// --- Round trips and layout -------------------------------------------------

TEST_F(SafetensorsTest, RoundTripPreservesEveryDtypeShapeMetadataAndBytes) {
  const std::vector<TensorSpec> specs = {
      {"w.f16", DType::kF16, {2, 3}}, {"w.bf16", DType::kBF16, {4}},
      {"w.f32", DType::kF32, {3, 2}}, {"w.f64", DType::kF64, {2}},
      {"scalar", DType::kF32, {}},    {"empty", DType::kF64, {0, 5}},
  };
  const std::vector<Bytes> data = {
      ToBytes(std::vector<uint16_t>{0x3C00, 0x4000, 0xC000, 0x0001, 0x7BFF,
                                    0x8000}),
      ToBytes(std::vector<uint16_t>{0x3F80, 0x4000, 0xBF80, 0x0000}),
      ToBytes(std::vector<float>{1.5f, -2.25f, 3.f, 0.f, 1e-30f, 7.f}),
      ToBytes(std::vector<double>{3.14159, -1e300}),
      ToBytes(std::vector<float>{42.5f}),
      Bytes{},
  };
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"num_examples", "1000"}, {"reduction", "sum"}};
  const std::string path = Write("model.safetensors", specs, data, metadata);

  auto reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ((*reader)->metadata(), metadata);
  const std::vector<TensorInfo>& tensors = (*reader)->tensors();
  ASSERT_EQ(tensors.size(), specs.size());
  std::vector<std::string> names;
  for (const TensorInfo& t : tensors) names.push_back(t.name);
  EXPECT_EQ(names, (std::vector<std::string>{"empty", "scalar", "w.bf16",
                                             "w.f16", "w.f32", "w.f64"}));
  uint64_t total = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    SCOPED_TRACE(specs[i].name);
    const TensorInfo* info = (*reader)->Find(specs[i].name);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->name, specs[i].name);
    EXPECT_EQ(info->dtype, specs[i].dtype);
    EXPECT_EQ(info->shape, specs[i].shape);
    EXPECT_EQ(info->nbytes, data[i].size());
    EXPECT_EQ(info->file_index, 0);
    EXPECT_EQ(ToBytes((*reader)->Data(*info)), data[i]);
    total += data[i].size();
  }
  EXPECT_EQ((*reader)->Find("scalar")->numel, 1);
  EXPECT_EQ((*reader)->Find("empty")->numel, 0);
  EXPECT_EQ((*reader)->Find("w.f16")->numel, 6);
  EXPECT_EQ((*reader)->total_bytes(), total);
  EXPECT_EQ((*reader)->Find("missing"), nullptr);
  EXPECT_EQ((*reader)->Find(""), nullptr);
}

TEST_F(SafetensorsTest, WriterHeaderIsCompactSpacePaddedJsonInGivenOrder) {
  const std::vector<TensorSpec> specs = {{"zeta", DType::kF32, {3}},
                                         {"alpha", DType::kF16, {1}},
                                         {"mid", DType::kF64, {}}};
  const std::string path =
      Write("layout.safetensors", specs,
            {Bytes(12, 1), Bytes(2, 2), Bytes(8, 3)}, {{"k", "v"}});
  const std::string raw = ReadFile(path);
  ASSERT_GE(raw.size(), 8u);
  uint64_t length = 0;
  for (int i = 7; i >= 0; --i) {
    length = (length << 8) | static_cast<uint8_t>(raw[i]);
  }
  EXPECT_EQ(length % 8, 0u);
  ASSERT_EQ(raw.size(), 8 + length + 22);
  std::string header = raw.substr(8, length);
  const size_t json_end = header.find_last_not_of(' ') + 1;
  EXPECT_LT(header.size() - json_end, 8u);
  EXPECT_EQ(header.substr(json_end),
            std::string(header.size() - json_end, ' '));
  header.resize(json_end);
  EXPECT_EQ(
      header,
      "{\"__metadata__\":{\"k\":\"v\"},"
      "\"zeta\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},"
      "\"alpha\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[12,"
      "14]},"
      "\"mid\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[14,22]}"
      "}");
  // Compact: re-serialising the parsed JSON gives the same text.
  EXPECT_EQ(nlohmann::ordered_json::parse(header).dump(), header);
}

TEST_F(SafetensorsTest, ReaderSeesPythonValuesAndWriterMatchesPythonBytes) {
  if (::access("/usr/bin/python3", X_OK) != 0) {
    GTEST_SKIP() << "/usr/bin/python3 is not installed";
  }
  const std::string python_path = Path("python.safetensors");
  const std::string command =
      absl::StrCat("/usr/bin/python3 " AMALGAM_SOURCE_DIR
                   "/tests/fixtures/write_python_fixture.py '",
                   python_path, "'");
  ASSERT_EQ(std::system(command.c_str()), 0) << command;

  auto reader = SafetensorsReader::Open(python_path);
  ASSERT_TRUE(reader.ok()) << reader.status();
  const SafetensorsReader& r = **reader;
  EXPECT_EQ(r.metadata(), (std::map<std::string, std::string>{
                              {"format", "pt"}, {"num_examples", "128"}}));
  ASSERT_EQ(r.tensors().size(), 6u);

  const TensorInfo* a = r.Find("a.f32");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, DType::kF32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  std::vector<float> a_want;
  for (int i = 0; i < 6; ++i) a_want.push_back(i * 0.5f - 1.f);
  EXPECT_EQ(FromBytes<float>(r.Data(*a)), a_want);

  const TensorInfo* b = r.Find("b.f64");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, DType::kF64);
  std::vector<double> b_want;
  for (int i = 0; i < 4; ++i) b_want.push_back(i / 3.0);
  EXPECT_EQ(FromBytes<double>(r.Data(*b)), b_want);

  const TensorInfo* c = r.Find("c.f16");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->dtype, DType::kF16);
  EXPECT_EQ(c->shape, (std::vector<int64_t>{2, 2, 2}));
  std::vector<float> c_got;
  for (uint16_t bits : FromBytes<uint16_t>(r.Data(*c))) {
    c_got.push_back(HalfToFloat(bits));
  }
  std::vector<float> c_want;
  for (int i = -4; i < 4; ++i) c_want.push_back(i * 0.25f);
  EXPECT_EQ(c_got, c_want);

  const TensorInfo* d = r.Find("d.bf16");
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->dtype, DType::kBF16);
  std::vector<uint16_t> d_want;
  for (int i = 0; i < 5; ++i) {
    d_want.push_back(static_cast<uint16_t>(FloatBits(i + 1.f) >> 16));
  }
  EXPECT_EQ(FromBytes<uint16_t>(r.Data(*d)), d_want);

  const TensorInfo* e = r.Find("e.single");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->shape, std::vector<int64_t>{1});
  EXPECT_EQ(FromBytes<float>(r.Data(*e)), std::vector<float>{3.25f});

  const TensorInfo* f = r.Find("f.empty");
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->shape, (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(f->nbytes, 0u);

  // The same tensors written by the C++ writer in the fixture writer's order
  // (sorted by name; Hugging Face's serializer would put them by descending
  // dtype first) give the same bytes.
  std::vector<TensorSpec> specs;
  std::vector<Bytes> data;
  for (const TensorInfo& t : r.tensors()) {
    specs.push_back({t.name, t.dtype, t.shape});
    data.push_back(ToBytes(r.Data(t)));
  }
  const std::string cpp_path =
      Write("cpp.safetensors", specs, data, r.metadata());
  EXPECT_EQ(ReadFile(cpp_path), ReadFile(python_path));
}

TEST_F(SafetensorsTest, ParseReturnsTensorsInOffsetOrderWithFileOffsets) {
  const std::string json =
      R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
      R"("a":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},)"
      R"("z":{"dtype":"BF16","shape":[0],"data_offsets":[16,16]}})";
  auto header = ParseSafetensorsHeader(json, 16, 100);
  ASSERT_TRUE(header.ok()) << header.status();
  ASSERT_EQ(header->tensors.size(), 3u);
  EXPECT_EQ(header->tensors[0].name, "a");
  EXPECT_EQ(header->tensors[0].file_offset, 100u);
  EXPECT_EQ(header->tensors[1].name, "b");
  EXPECT_EQ(header->tensors[1].file_offset, 108u);
  EXPECT_EQ(header->tensors[2].name, "z");
  EXPECT_EQ(header->tensors[2].nbytes, 0u);
  EXPECT_TRUE(header->metadata.empty());
}

TEST_F(SafetensorsTest, OpensFileWithEmptyDataSection) {
  const std::string empty_header = WriteRaw("empty.safetensors", "{}");
  auto reader = SafetensorsReader::Open(empty_header);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_TRUE((*reader)->tensors().empty());
  EXPECT_EQ((*reader)->total_bytes(), 0u);

  const std::string zero_size =
      Write("zero.safetensors", {{"e", DType::kF32, {0}}}, {Bytes{}});
  reader = SafetensorsReader::Open(zero_size);
  ASSERT_TRUE(reader.ok()) << reader.status();
  ASSERT_EQ((*reader)->tensors().size(), 1u);
  EXPECT_TRUE((*reader)->Data((*reader)->tensors()[0]).empty());
  EXPECT_TRUE(CheckAllFinite(**reader).ok());
}

TEST_F(SafetensorsTest, OpensDirectoryHoldingModelSafetensors) {
  Write("model.safetensors", {{"x", DType::kF32, {1}}},
        {ToBytes(std::vector<float>{2.f})});
  auto reader = SafetensorsReader::Open(dir_);
  ASSERT_TRUE(reader.ok()) << reader.status();
  ASSERT_NE((*reader)->Find("x"), nullptr);
}

// --- Bad input
// ----------------------------------------------------------------

TEST_F(SafetensorsTest, RejectsThreeByteFile) {
  const std::string path = Path("short.safetensors");
  std::ofstream(path, std::ios::binary) << "abc";
  auto reader = SafetensorsReader::Open(path);
  EXPECT_TRUE(HasError(reader.status(), absl::StatusCode::kInvalidArgument,
                       "truncated: " + path +
                           " is 3 bytes, shorter than the "
                           "8-byte header length"));
}

TEST_F(SafetensorsTest, RejectsHeaderLengthPastEndOfFile) {
  const std::string path = WriteRaw("past.safetensors", "{}", {}, 1000);
  auto reader = SafetensorsReader::Open(path);
  EXPECT_TRUE(HasError(reader.status(), absl::StatusCode::kInvalidArgument,
                       "truncated: " + path));
  EXPECT_TRUE(HasError(reader.status(), absl::StatusCode::kInvalidArgument,
                       "header of 1000 bytes"));
}

TEST_F(SafetensorsTest, RejectsAbsurdHeaderLength) {
  // A sparse file longer than the declared header, which exceeds 100 MiB.
  const std::string path =
      WriteRaw("huge.safetensors", "{}", {}, int64_t{200} << 20);
  ASSERT_EQ(::truncate(path.c_str(), int64_t{300} << 20), 0);
  auto reader = SafetensorsReader::Open(path);
  EXPECT_TRUE(HasError(reader.status(), absl::StatusCode::kInvalidArgument,
                       path + ": header length 209715200 bytes exceeds"));
}

TEST_F(SafetensorsTest, RejectsMalformedJson) {
  const std::string path = WriteRaw("bad.safetensors", R"({"a": {"dtype": )");
  auto reader = SafetensorsReader::Open(path);
  EXPECT_TRUE(HasError(reader.status(), absl::StatusCode::kInvalidArgument,
                       path + ": malformed JSON header"));
}

TEST_F(SafetensorsTest, RejectsUnknownDtype) {
  const std::string path = WriteRaw(
      "i64.safetensors",
      R"({"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", Bytes(8));
  auto reader = SafetensorsReader::Open(path);
  EXPECT_TRUE(HasError(reader.status(), absl::StatusCode::kInvalidArgument,
                       "unknown dtype \"I64\" for tensor \"ids\""));
  EXPECT_TRUE(
      HasError(reader.status(), absl::StatusCode::kInvalidArgument, path));
  EXPECT_TRUE(HasError(
      ParseSafetensorsHeader(
          R"({"q":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})", 1, 8)
          .status(),
      absl::StatusCode::kInvalidArgument,
      "unknown dtype \"F8_E4M3\" for tensor \"q\""));
}

TEST_F(SafetensorsTest, RejectsOffsetsPastEndOfData) {
  const std::string path = WriteRaw(
      "past_data.safetensors",
      R"({"w":{"dtype":"F32","shape":[1024],"data_offsets":[0,4096]}})",
      Bytes(1024));
  auto reader = SafetensorsReader::Open(path);
  EXPECT_TRUE(HasError(reader.status(), absl::StatusCode::kInvalidArgument,
                       "tensor \"w\": data_offsets [0, 4096] ends at byte "
                       "4096, past the end of the data (1024 bytes)"));
}

TEST_F(SafetensorsTest, RejectsOffsetsThatDisagreeWithShape) {
  const std::string path =
      WriteRaw("mismatch.safetensors",
               R"({"layer.0.weight":{"dtype":"F32","shape":[2,3],)"
               R"("data_offsets":[0,40]}})",
               Bytes(40));
  auto reader = SafetensorsReader::Open(path);
  EXPECT_TRUE(HasError(
      reader.status(), absl::StatusCode::kInvalidArgument,
      "tensor \"layer.0.weight\": data_offsets [0, 40] hold 40 bytes but "
      "shape [2, 3] of F32 needs 24"));
  EXPECT_TRUE(HasError(
      ParseSafetensorsHeader(
          R"({"r":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 16, 8)
          .status(),
      absl::StatusCode::kInvalidArgument,
      "tensor \"r\": data_offsets [8, 4] end before they begin"));
}

TEST_F(SafetensorsTest, RejectsOverlappingTensors) {
  const std::string path =
      WriteRaw("overlap.safetensors",
               R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
               R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
               Bytes(24));
  auto reader = SafetensorsReader::Open(path);
  EXPECT_TRUE(HasError(reader.status(), absl::StatusCode::kInvalidArgument,
                       "tensors \"a\" and \"b\" overlap: data_offsets [0, "
                       "16] and [8, 24]"));
}

TEST_F(SafetensorsTest, RejectsNegativeDim) {
  const std::string path =
      WriteRaw("negative.safetensors",
               R"({"n":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,0]}})");
  auto reader = SafetensorsReader::Open(path);
  EXPECT_TRUE(HasError(reader.status(), absl::StatusCode::kInvalidArgument,
                       "tensor \"n\": negative dimension -1 in shape [2, -1]"));
}

TEST_F(SafetensorsTest, RejectsHeaderEntriesOfTheWrongJsonType) {
  struct Case {
    std::string json;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"[1, 2]", "the header is a JSON array, not an object"},
      {R"({"__metadata__":{"n":3}})",
       "\"__metadata__\" value of \"n\" is a JSON number, not a string"},
      {R"({"__metadata__":[]})", "\"__metadata__\" is not a JSON object"},
      {R"({"t":5})", "tensor \"t\": header entry is not a JSON object"},
      {R"({"t":{"shape":[1],"data_offsets":[0,4]}})",
       "tensor \"t\": \"dtype\" is missing or not a string"},
      {R"({"t":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})",
       "tensor \"t\": \"shape\" is missing or not an array"},
      {R"({"t":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})",
       "tensor \"t\": \"shape\" holds a JSON number, not an integer"},
      {R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0]}})",
       "tensor \"t\": \"data_offsets\" is missing or not a pair"},
      {R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})",
       "tensor \"t\": \"data_offsets\" is missing or not a pair"},
      {R"({"t":{"dtype":"F64","shape":[4294967296,4294967296],)"
       R"("data_offsets":[0,0]}})",
       "tensor \"t\": shape [4294967296, 4294967296] has too many elements"},
      {R"({"t":{"dtype":"F64","shape":[4611686018427387904],)"
       R"("data_offsets":[0,0]}})",
       "needs more bytes than fit in 64 bits"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.json);
    EXPECT_TRUE(HasError(ParseSafetensorsHeader(c.json, 64, 8).status(),
                         absl::StatusCode::kInvalidArgument, c.message));
  }
}

TEST_F(SafetensorsTest,
       RejectsShapesNestedDeeperThanTheFormatWithoutRecursing) {
  // The attack: 60 000 levels in a shape made the error message's dump()
  // recurse until the stack overflowed.
  const std::string deep = std::string(60000, '[') + std::string(60000, ']');
  const std::string header =
      R"({"t":{"dtype":"F32","shape":)" + deep + R"(,"data_offsets":[0,4]}})";
  const std::string path = WriteRaw("deep.safetensors", header);
  EXPECT_TRUE(HasError(SafetensorsReader::Open(path).status(),
                       absl::StatusCode::kInvalidArgument,
                       "the header nests JSON arrays or objects deeper than 3 "
                       "levels (at byte 29)"));
  // One level too many is refused; brackets inside strings do not count.
  EXPECT_TRUE(HasError(
      ParseSafetensorsHeader(
          R"({"t":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}})", 4, 8)
          .status(),
      absl::StatusCode::kInvalidArgument, "deeper than 3 levels"));
  auto fine = ParseSafetensorsHeader(
      R"({"__metadata__":{"k":"[[[[{{{{\"]]"},)"
      R"("t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
      4, 8);
  ASSERT_TRUE(fine.ok()) << fine.status();
  EXPECT_EQ(fine->metadata.at("k"), "[[[[{{{{\"]]");
}

TEST_F(SafetensorsTest, RejectsRepeatedNamesGapsAndControlCharacters) {
  struct Case {
    std::string json;
    uint64_t data_size;
    std::string message;
  };
  const std::vector<Case> cases = {
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
       R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
       8, "the header names \"a\" twice"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8,
       "bytes [0, 4) of the data belong to no tensor (a gap before \"a\")"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
       R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
       12, "bytes [4, 8) of the data belong to no tensor (a gap before \"b\")"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 6,
       "bytes [4, 6) at the end of the data belong to no tensor"},
      {"{\"a\\nb\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
       4,
       "tensor \"a\\x0ab\" holds the control character 0x0a at byte 1 of its "
       "name"},
      {R"({"":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4,
       "a tensor has an empty name"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.json);
    EXPECT_TRUE(
        HasError(ParseSafetensorsHeader(c.json, c.data_size, 8).status(),
                 absl::StatusCode::kInvalidArgument, c.message));
  }
  // Zero-size tensors may sit anywhere in order; the data is still covered.
  auto fine = ParseSafetensorsHeader(
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
      R"("z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
      R"("b":{"dtype":"F16","shape":[2],"data_offsets":[4,8]}})",
      8, 8);
  ASSERT_TRUE(fine.ok()) << fine.status();
  EXPECT_EQ(fine->tensors.size(), 3u);
}

TEST_F(SafetensorsTest, ATensorOver2GiBHasExactSpansAndOffsets) {
  // A sparse file: 2.5 GiB of F32 zeros after a small tensor, then 4 bytes.
  constexpr uint64_t kBig = (uint64_t{5} << 29);  // 2.5 GiB
  const std::string header = absl::StrCat(
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)",
      R"("big":{"dtype":"F32","shape":[)", kBig / 4, R"(],"data_offsets":[4,)",
      4 + kBig, "]},", R"("z":{"dtype":"F32","shape":[1],"data_offsets":[)",
      4 + kBig, ",", 8 + kBig, "]}}");
  const std::string path = WriteRaw("big.safetensors", header);
  const uint64_t data_start = 8 + header.size();
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(data_start + 8 + kBig)),
            0);
  {
    // The last tensor's bytes, written past the hole.
    std::fstream out(path, std::ios::in | std::ios::out | std::ios::binary);
    out.seekp(static_cast<std::streamoff>(data_start + 4 + kBig));
    const float value = 7.5f;
    out.write(reinterpret_cast<const char*>(&value), 4);
  }
  auto reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status();
  const TensorInfo* big = (*reader)->Find("big");
  ASSERT_NE(big, nullptr);
  EXPECT_EQ(big->nbytes, kBig);
  EXPECT_EQ(big->numel, static_cast<int64_t>(kBig / 4));
  EXPECT_EQ(big->file_offset, data_start + 4);
  const auto span = (*reader)->Data(*big);
  EXPECT_EQ(span.size(), kBig);
  EXPECT_EQ(span[kBig - 1], 0);
  const TensorInfo* z = (*reader)->Find("z");
  ASSERT_NE(z, nullptr);
  EXPECT_EQ(z->file_offset, data_start + 4 + kBig);
  EXPECT_EQ(FromBytes<float>((*reader)->Data(*z)), std::vector<float>{7.5f});
  EXPECT_EQ((*reader)->total_bytes(), 8 + kBig);
  std::remove(path.c_str());
}

TEST_F(SafetensorsTest, NonexistentFileIsNotFound) {
  const std::string path = Path("nope.safetensors");
  EXPECT_TRUE(HasError(SafetensorsReader::Open(path).status(),
                       absl::StatusCode::kNotFound, path));
  EXPECT_TRUE(HasError(SafetensorsReader::Open(dir_).status(),
                       absl::StatusCode::kNotFound,
                       "directory " + dir_ +
                           " holds neither model.safetensors.index.json nor "
                           "model.safetensors"));
}

// --- Sharded checkpoints
// ------------------------------------------------------

class ShardedTest : public SafetensorsTest {
 protected:
  void WriteShards() {
    Write("model-00001-of-00002.safetensors",
          {{"a", DType::kF32, {2}}, {"b", DType::kF16, {3}}},
          {ToBytes(std::vector<float>{1.f, 2.f}),
           ToBytes(std::vector<uint16_t>{0x3C00, 0x4000, 0x4200})},
          {{"format", "pt"}});
    Write("model-00002-of-00002.safetensors",
          {{"c", DType::kF64, {1}}, {"d", DType::kBF16, {}}},
          {ToBytes(std::vector<double>{-7.5}),
           ToBytes(std::vector<uint16_t>{0x3F80})},
          {{"format", "pt"}, {"shard", "2"}});
  }

  std::string WriteIndex(const std::map<std::string, std::string>& map) {
    nlohmann::json index = {{"metadata", {{"total_size", 38}}},
                            {"weight_map", map}};
    const std::string path = Path("model.safetensors.index.json");
    std::ofstream(path) << index.dump(2);
    return path;
  }

  const std::map<std::string, std::string> kWeightMap = {
      {"a", "model-00001-of-00002.safetensors"},
      {"b", "model-00001-of-00002.safetensors"},
      {"c", "model-00002-of-00002.safetensors"},
      {"d", "model-00002-of-00002.safetensors"}};
};

TEST_F(ShardedTest, OpensByDirectoryAndByIndexWithAllTensors) {
  WriteShards();
  const std::string index = WriteIndex(kWeightMap);
  for (const std::string& path : {dir_, index}) {
    SCOPED_TRACE(path);
    auto reader = SafetensorsReader::Open(path);
    ASSERT_TRUE(reader.ok()) << reader.status();
    const SafetensorsReader& r = **reader;
    ASSERT_EQ(r.tensors().size(), 4u);
    EXPECT_EQ(r.tensors()[0].name, "a");
    EXPECT_EQ(r.tensors()[3].name, "d");
    EXPECT_EQ(r.metadata(),
              (std::map<std::string, std::string>{{"format", "pt"}}));
    EXPECT_EQ(r.total_bytes(), 8u + 6u + 8u + 2u);
    EXPECT_EQ(r.Find("a")->file_index, 0);
    EXPECT_EQ(r.Find("c")->file_index, 1);
    EXPECT_EQ(FromBytes<float>(r.Data(*r.Find("a"))),
              (std::vector<float>{1.f, 2.f}));
    EXPECT_EQ(FromBytes<uint16_t>(r.Data(*r.Find("b"))),
              (std::vector<uint16_t>{0x3C00, 0x4000, 0x4200}));
    EXPECT_EQ(FromBytes<double>(r.Data(*r.Find("c"))),
              std::vector<double>{-7.5});
    EXPECT_EQ(FromBytes<uint16_t>(r.Data(*r.Find("d"))),
              std::vector<uint16_t>{0x3F80});
    EXPECT_TRUE(CheckAllFinite(r).ok());
  }
}

TEST_F(ShardedTest, RejectsIndexNestedDeeperThanTheFormat) {
  WriteShards();
  const std::string path = Path("model.safetensors.index.json");
  std::ofstream(path) << R"({"metadata":{"x":)" << std::string(50000, '[')
                      << std::string(50000, ']') << "}}";
  EXPECT_TRUE(HasError(SafetensorsReader::Open(dir_).status(),
                       absl::StatusCode::kInvalidArgument,
                       path + ": the index nests JSON arrays or objects "
                              "deeper than 3 levels"));
}

TEST_F(ShardedTest, RejectsWeightMapNamingTensorItsShardLacks) {
  WriteShards();
  auto map = kWeightMap;
  map["ghost"] = "model-00002-of-00002.safetensors";
  const std::string index = WriteIndex(map);
  EXPECT_TRUE(HasError(SafetensorsReader::Open(dir_).status(),
                       absl::StatusCode::kInvalidArgument,
                       index + ": the weight_map puts tensor \"ghost\" in "
                               "shard \"model-00002-of-00002.safetensors\", "
                               "which does not hold it"));
}

TEST_F(ShardedTest, RejectsShardTensorMissingFromWeightMap) {
  WriteShards();
  auto map = kWeightMap;
  map.erase("b");
  WriteIndex(map);
  EXPECT_TRUE(HasError(SafetensorsReader::Open(dir_).status(),
                       absl::StatusCode::kInvalidArgument,
                       "shard \"model-00001-of-00002.safetensors\" holds "
                       "tensor \"b\", which the weight_map does not list"));
}

TEST_F(ShardedTest, RejectsTensorInTwoShards) {
  WriteShards();
  Write("zz-extra.safetensors", {{"a", DType::kF32, {1}}}, {Bytes(4)});
  auto map = kWeightMap;
  map["z"] = "zz-extra.safetensors";
  WriteIndex(map);
  EXPECT_TRUE(HasError(SafetensorsReader::Open(dir_).status(),
                       absl::StatusCode::kInvalidArgument,
                       "tensor \"a\" is in both shard "
                       "\"model-00001-of-00002.safetensors\" and shard "
                       "\"zz-extra.safetensors\""));
}

TEST_F(ShardedTest, RejectsShardOutsideIndexDirectoryAndMissingShard) {
  WriteShards();
  auto map = kWeightMap;
  map["a"] = "../model-00001-of-00002.safetensors";
  WriteIndex(map);
  EXPECT_TRUE(HasError(SafetensorsReader::Open(dir_).status(),
                       absl::StatusCode::kInvalidArgument,
                       "not a file name inside the index's directory"));
  map = kWeightMap;
  map["a"] = "model-00009-of-00009.safetensors";
  WriteIndex(map);
  EXPECT_TRUE(HasError(SafetensorsReader::Open(dir_).status(),
                       absl::StatusCode::kNotFound,
                       "model-00009-of-00009.safetensors"));
}

// --- Model directories stored apart (OpenModel)
// ----------------------------------------------

// The files of the directory under other names (as blobs are), with the
// paths of its files renamed so that their names appear nowhere in them.
std::map<std::string, std::string> StoredApart(const std::string& dir) {
  std::map<std::string, std::string> files;
  int next = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string stored = absl::StrCat(dir, "/blob", next++);
    std::filesystem::rename(entry.path(), stored);
    files[entry.path().filename().string()] = stored;
  }
  return files;
}

TEST_F(ShardedTest, AModelStoredApartOpensByItsFileNames) {
  WriteShards();
  WriteIndex(kWeightMap);
  std::ofstream(Path("config.json")) << "{}";
  auto reader = SafetensorsReader::OpenModel(StoredApart(dir_));
  ASSERT_TRUE(reader.ok()) << reader.status();
  ASSERT_EQ((*reader)->tensors().size(), 4u);
  EXPECT_EQ(FromBytes<double>((*reader)->Data(*(*reader)->Find("c"))),
            std::vector<double>{-7.5});
  // One file, under any .safetensors name, is a model too.
  const std::string single = Write("stored", {{"x", DType::kF32, {1}}},
                                   {ToBytes(std::vector<float>{3.f})});
  auto one = SafetensorsReader::OpenModel({{"weights.safetensors", single}});
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ((*one)->tensors().size(), 1u);
}

TEST_F(ShardedTest, AModelStoredApartIsRefusedNamingTheFileAtFault) {
  WriteShards();
  WriteIndex(kWeightMap);
  std::map<std::string, std::string> files = StoredApart(dir_);
  auto refused = [&](std::map<std::string, std::string> changed,
                     const std::string& words) {
    auto reader = SafetensorsReader::OpenModel(changed);
    EXPECT_TRUE(
        HasError(reader.status(), absl::StatusCode::kInvalidArgument, words))
        << words;
    // Where the bytes are stored is never shown.
    EXPECT_EQ(reader.status().message().find(dir_), std::string::npos)
        << reader.status();
  };
  auto without = files;
  without.erase("model-00002-of-00002.safetensors");
  refused(without,
          "model.safetensors.index.json names shard "
          "\"model-00002-of-00002.safetensors\", which is not among the "
          "model's files");
  auto stray = files;
  stray["extra.safetensors"] = files["model-00001-of-00002.safetensors"];
  refused(stray,
          "file \"extra.safetensors\" is not a shard that "
          "model.safetensors.index.json names");
  auto card = files;
  card["README.md"] = files["model.safetensors.index.json"];
  refused(card, "file \"README.md\" is not part of a Hugging Face model");
  auto loose = files;
  loose.erase("model.safetensors.index.json");
  refused(loose, "several .safetensors files");
  refused({{"config.json", files["model.safetensors.index.json"]}},
          "the model has no .safetensors file");
  refused({{"a/b.safetensors", files["model-00001-of-00002.safetensors"]}},
          "is not a plain file name");
  // A truncated shard is named by its file name.
  std::filesystem::resize_file(files["model-00002-of-00002.safetensors"], 4);
  refused(files, "truncated: model-00002-of-00002.safetensors is 4 bytes");
}

TEST(ModelFilesTest, ShardNamesFollowTheHub) {
  EXPECT_EQ(ShardFileName(0, 3), "model-00001-of-00003.safetensors");
  EXPECT_EQ(ShardFileName(11, 12), "model-00012-of-00012.safetensors");
  auto layout = CheckModelFiles({"tokenizer.json", ShardFileName(1, 2),
                                 "model.safetensors.index.json",
                                 ShardFileName(0, 2), "config.json"});
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->entry, "model.safetensors.index.json");
  EXPECT_EQ(
      layout->tensor_files,
      (std::vector<std::string>{ShardFileName(0, 2), ShardFileName(1, 2)}));
  EXPECT_EQ(layout->side_files,
            (std::vector<std::string>{"config.json", "tokenizer.json"}));
  EXPECT_TRUE(HasError(CheckModelFiles({"config.json", "config.json"}).status(),
                       absl::StatusCode::kInvalidArgument,
                       "file \"config.json\" is listed twice"));
}

// --- ModelWriter
// --------------------------------------------------------------

TEST(ModelWriterTest, ShardsStartWhereTheNextTensorWouldOverflow) {
  auto spec = [](const std::string& name, int64_t floats) {
    return TensorSpec{name, DType::kF32, {floats}};
  };
  // 400, 400, 1200 (alone: over the size), 200, 200 bytes into 800.
  EXPECT_EQ(AssignShards({spec("a", 100), spec("b", 100), spec("c", 300),
                          spec("d", 50), spec("e", 50)},
                         800),
            (std::vector<int>{0, 0, 1, 2, 2}));
  EXPECT_EQ(AssignShards({spec("a", 100), spec("b", 100)}, 800),
            (std::vector<int>{0, 0}));
}

TEST_F(SafetensorsTest,
       AModelWriterShardsAndIndexesAndLeavesNothingUnfinished) {
  std::vector<float> values(10);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.5f * i;
  const std::vector<uint8_t> bytes = ToBytes(values);
  const std::vector<TensorSpec> specs = {{"a", DType::kF32, {4}},
                                         {"b", DType::kF32, {4}},
                                         {"c", DType::kF32, {2}}};
  const std::string dir = Path("model");
  auto writer = ModelWriter::Create(dir, specs, {{"format", "pt"}}, 20);
  ASSERT_TRUE(writer.ok()) << writer.status();
  // One append across all three shards.
  ASSERT_TRUE((*writer)->Append(bytes).ok());
  ASSERT_TRUE((*writer)->Finish().ok());
  EXPECT_EQ((*writer)->files(),
            (std::vector<std::string>{ShardFileName(0, 3), ShardFileName(1, 3),
                                      ShardFileName(2, 3),
                                      "model.safetensors.index.json"}));
  auto reader = SafetensorsReader::Open(dir);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ(FromBytes<float>((*reader)->Data(*(*reader)->Find("b"))),
            (std::vector<float>{2.f, 2.5f, 3.f, 3.5f}));
  EXPECT_EQ(FromBytes<float>((*reader)->Data(*(*reader)->Find("c"))),
            (std::vector<float>{4.f, 4.5f}));
  EXPECT_EQ((*reader)->metadata().at("format"), "pt");
  std::ifstream index(dir + "/model.safetensors.index.json");
  const nlohmann::json json = nlohmann::json::parse(index);
  EXPECT_EQ(json["metadata"]["total_size"], 40);
  EXPECT_EQ(json["weight_map"]["c"], ShardFileName(2, 3));

  // One shard: model.safetensors and no index.
  auto single = ModelWriter::Create(Path("single"), specs, {}, 1000);
  ASSERT_TRUE(single.ok() && (*single)->Append(bytes).ok() &&
              (*single)->Finish().ok());
  EXPECT_EQ((*single)->files(), std::vector<std::string>{"model.safetensors"});

  // Dropped half-way: nothing of it stays.
  {
    auto dropped = ModelWriter::Create(Path("dropped"), specs, {}, 20);
    ASSERT_TRUE(dropped.ok());
    ASSERT_TRUE((*dropped)->Append(absl::MakeSpan(bytes).subspan(0, 24)).ok());
  }
  EXPECT_FALSE(std::filesystem::exists(Path("dropped")));
  // Past the declared bytes.
  auto over = ModelWriter::Create(Path("over"), specs, {}, 20);
  ASSERT_TRUE(over.ok() && (*over)->Append(bytes).ok());
  EXPECT_EQ((*over)->Append(bytes).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(ModelFilesTest, AResultConfigChangesOnlyWhatItMust) {
  const std::string config = "{\"torch_dtype\": \"float32\",  \"n\": 1}";
  EXPECT_EQ(*ResultConfig(config, "float32", ""), config) << "bytes kept";
  EXPECT_EQ(
      nlohmann::json::parse(*ResultConfig(config, "bfloat16", "{\"n\": 2}")),
      nlohmann::json::parse(R"({"torch_dtype": "bfloat16", "n": 2})"));
  EXPECT_EQ(ResultConfig("[1]", "float32", "").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ResultConfig(std::string(100, '{'), "", "").status().code(),
            absl::StatusCode::kInvalidArgument);
}

// --- CheckAllFinite
// -----------------------------------------------------------

TEST_F(SafetensorsTest, CheckAllFiniteFindsNanInF32AndNamesTensor) {
  std::vector<float> values(32, 1.f);
  values[17] = std::nanf("");
  const std::string path =
      Write("nan.safetensors",
            {{"ok", DType::kF32, {2}}, {"bad.weight", DType::kF32, {4, 8}}},
            {ToBytes(std::vector<float>{1.f, 2.f}), ToBytes(values)});
  auto reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_TRUE(HasError(CheckAllFinite(**reader),
                       absl::StatusCode::kInvalidArgument,
                       "tensor \"bad.weight\" holds a NaN or infinity at "
                       "element 17"));
}

TEST_F(SafetensorsTest, CheckAllFiniteFindsInfinityInF16BF16AndNanInF64) {
  struct Case {
    DType dtype;
    Bytes data;
    std::string message;
  };
  // Past the first 4096-element block, and in a tail block.
  std::vector<uint16_t> f16(5000, 0x3C00);
  f16[4500] = 0xFC00;  // -inf
  std::vector<uint16_t> bf16(10, 0x3F80);
  bf16[3] = 0x7F80;  // +inf
  std::vector<double> f64(3, 1.0);
  f64[2] = std::nan("");
  const std::vector<Case> cases = {
      {DType::kF16, ToBytes(f16), "holds a NaN or infinity at element 4500"},
      {DType::kBF16, ToBytes(bf16), "holds a NaN or infinity at element 3"},
      {DType::kF64, ToBytes(f64), "holds a NaN or infinity at element 2"},
  };
  for (const Case& c : cases) {
    const std::string name = absl::StrCat("t.", DTypeName(c.dtype));
    SCOPED_TRACE(name);
    const int64_t count = c.data.size() / DTypeSize(c.dtype);
    const std::string path =
        Write(name + ".safetensors", {{name, c.dtype, {count}}}, {c.data});
    auto reader = SafetensorsReader::Open(path);
    ASSERT_TRUE(reader.ok()) << reader.status();
    EXPECT_TRUE(HasError(CheckAllFinite(**reader),
                         absl::StatusCode::kInvalidArgument,
                         "tensor \"" + name + "\" " + c.message));
  }
}

TEST_F(SafetensorsTest, CheckAllFinitePassesOnFiniteData) {
  const std::string path = Write(
      "finite.safetensors",
      {{"f16", DType::kF16, {5}},
       {"bf16", DType::kBF16, {4}},
       {"f32", DType::kF32, {5000}},
       {"f64", DType::kF64, {3}}},
      {// Largest finite, smallest subnormal, -0, negative largest.
       ToBytes(std::vector<uint16_t>{0x7BFF, 0x0001, 0x8000, 0xFBFF, 0x3C00}),
       ToBytes(std::vector<uint16_t>{0x7F7F, 0x0001, 0x8000, 0xFF7F}),
       ToBytes(std::vector<float>(5000, std::numeric_limits<float>::max())),
       ToBytes(std::vector<double>{std::numeric_limits<double>::max(),
                                   std::numeric_limits<double>::denorm_min(),
                                   -0.0})});
  auto reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_TRUE(CheckAllFinite(**reader).ok()) << CheckAllFinite(**reader);
}

// --- Writer
// -------------------------------------------------------------------

TEST_F(SafetensorsTest, WriterFinishFailsWhenTooFewBytesWereWritten) {
  const std::string path = Path("short_write.safetensors");
  auto writer = SafetensorsWriter::Create(path, {{"w", DType::kF32, {4}}}, {});
  ASSERT_TRUE(writer.ok()) << writer.status();
  ASSERT_TRUE((*writer)->Append(Bytes(12)).ok());
  EXPECT_TRUE(HasError((*writer)->Finish(),
                       absl::StatusCode::kFailedPrecondition,
                       "12 of 16 declared bytes were written"));
  EXPECT_FALSE(fs::exists(path));
  // The writer is still usable: the last bytes complete it.
  ASSERT_TRUE((*writer)->Append(Bytes(4)).ok());
  EXPECT_TRUE((*writer)->Finish().ok());
  EXPECT_TRUE(fs::exists(path));
  EXPECT_TRUE(HasError((*writer)->Finish(),
                       absl::StatusCode::kFailedPrecondition,
                       "already finished"));
}

TEST_F(SafetensorsTest, WriterCreatesNoFileAtPathUntilFinish) {
  const std::string path = Path("atomic.safetensors");
  auto writer = SafetensorsWriter::Create(
      path, {{"a", DType::kF64, {2}}, {"b", DType::kBF16, {3}}}, {});
  ASSERT_TRUE(writer.ok()) << writer.status();
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(fs::exists(path + ".tmp"));
  // A tensor may arrive in several pieces, and pieces may span tensors.
  const Bytes data = ToBytes(std::vector<uint8_t>{
      0, 0, 0, 0, 0,    0,    0xF0, 0x3F, 0,    0,    0,
      0, 0, 0, 0, 0x40, 0x80, 0x3F, 0,    0x40, 0x40, 0x40});
  ASSERT_TRUE((*writer)->Append(absl::MakeSpan(data).subspan(0, 5)).ok());
  ASSERT_TRUE((*writer)->Append(absl::MakeSpan(data).subspan(5, 13)).ok());
  EXPECT_FALSE(fs::exists(path));
  ASSERT_TRUE((*writer)->Append(absl::MakeSpan(data).subspan(18)).ok());
  EXPECT_FALSE(fs::exists(path));
  ASSERT_TRUE((*writer)->Finish().ok());
  EXPECT_TRUE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  auto reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ(FromBytes<double>((*reader)->Data(*(*reader)->Find("a"))),
            (std::vector<double>{1.0, 2.0}));
}

TEST_F(SafetensorsTest, WriterAppendPastDeclaredSizeFails) {
  const std::string path = Path("long_write.safetensors");
  auto writer = SafetensorsWriter::Create(path, {{"w", DType::kF16, {2}}}, {});
  ASSERT_TRUE(writer.ok()) << writer.status();
  ASSERT_TRUE((*writer)->Append(Bytes(3)).ok());
  EXPECT_TRUE(HasError(
      (*writer)->Append(Bytes(2)), absl::StatusCode::kFailedPrecondition,
      "appending 2 bytes to " + path + " after 3 would exceed the 4 bytes"));
}

TEST_F(SafetensorsTest, UnfinishedWriterRemovesItsTempFile) {
  const std::string path = Path("abandoned.safetensors");
  {
    auto writer =
        SafetensorsWriter::Create(path, {{"w", DType::kF32, {1}}}, {});
    ASSERT_TRUE(writer.ok()) << writer.status();
    ASSERT_TRUE(fs::exists(path + ".tmp"));
  }
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  EXPECT_FALSE(fs::exists(path));
}

TEST_F(SafetensorsTest, WriterRejectsDuplicateNamesAndBadShapes) {
  const std::string path = Path("dup.safetensors");
  EXPECT_TRUE(HasError(
      SafetensorsWriter::Create(
          path, {{"w", DType::kF32, {1}}, {"w", DType::kF16, {2}}}, {})
          .status(),
      absl::StatusCode::kInvalidArgument, "tensor \"w\" is listed twice"));
  EXPECT_TRUE(HasError(
      SafetensorsWriter::Create(path, {{"n", DType::kF32, {-2}}}, {}).status(),
      absl::StatusCode::kInvalidArgument, "tensor \"n\": negative dimension"));
  EXPECT_TRUE(HasError(
      SafetensorsWriter::Create(path, {{"__metadata__", DType::kF32, {}}}, {})
          .status(),
      absl::StatusCode::kInvalidArgument, "reserved"));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

TEST_F(SafetensorsTest, WriterCreateInMissingDirectoryIsInternal) {
  const std::string path = Path("no/such/dir/x.safetensors");
  EXPECT_TRUE(HasError(
      SafetensorsWriter::Create(path, {{"w", DType::kF32, {1}}}, {}).status(),
      absl::StatusCode::kInternal,
      "cannot create " + path + ".tmp: No such file or directory"));
}

TEST(DTypeTest, ParsesNamesAndSizes) {
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32, DType::kF64}) {
    auto parsed = ParseDType(DTypeName(dtype));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, dtype);
  }
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF64), 8u);
  EXPECT_TRUE(HasError(ParseDType("f32").status(),
                       absl::StatusCode::kInvalidArgument,
                       "unknown dtype \"f32\""));
}

}  // namespace
}  // namespace amalgam::core
