#pragma once

// Test helpers for core unit tests: tensors written to and read from
// safetensors files in a per-test temporary directory, and random tensors.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <stdlib.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/safetensors.h"
#include "core/torch_util.h"  // ScalarTypeOf
#include "gtest/gtest.h"

namespace amalgam::core::testutil {

using Tensors = std::vector<std::pair<std::string, at::Tensor>>;

inline DType DTypeOf(at::ScalarType type) {
  switch (type) {
    case at::kHalf:
      return DType::kF16;
    case at::kBFloat16:
      return DType::kBF16;
    case at::kDouble:
      return DType::kF64;
    default:
      return DType::kF32;
  }
}

// Whether AMALGAM_REQUIRE_CUDA=1: set on a GPU machine, where a CUDA test
// that skips would hide a LibTorch built without CUDA.
inline bool CudaRequired() {
  const char* value = std::getenv("AMALGAM_REQUIRE_CUDA");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

// Skips a CUDA test where no CUDA device is usable, or fails it where
// AMALGAM_REQUIRE_CUDA=1.
#define AMALGAM_SKIP_WITHOUT_CUDA()                                      \
  do {                                                                   \
    if (!at::hasCUDA()) {                                                \
      if (::amalgam::core::testutil::CudaRequired()) {                   \
        FAIL() << "AMALGAM_REQUIRE_CUDA=1 but no CUDA device is usable"; \
      }                                                                  \
      GTEST_SKIP() << "no CUDA device";                                  \
    }                                                                    \
  } while (false)

inline at::Generator Gen(uint64_t seed) {
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

inline at::Tensor Randn(std::vector<int64_t> shape, uint64_t seed) {
  return at::randn(shape, Gen(seed), at::TensorOptions().dtype(at::kDouble));
}

inline at::Tensor Rand(std::vector<int64_t> shape, uint64_t seed) {
  return at::rand(shape, Gen(seed), at::TensorOptions().dtype(at::kDouble));
}

// The float64 value of `t` after rounding to `type` (what a file holds).
inline at::Tensor Rounded(const at::Tensor& t, at::ScalarType type) {
  return t.to(type).to(at::kDouble);
}

// max |a - b| / max |b|.
inline double RelErr(const at::Tensor& a, const at::Tensor& b) {
  const double scale = b.abs().max().item<double>();
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>() /
         (scale > 0 ? scale : 1.0);
}

// The bytes of the file at `path`, or of the model.safetensors of the
// (one-shard) model directory at `path` that a merge or grow writes.
inline std::string ReadFile(const std::string& path) {
  std::ifstream in(
      std::filesystem::is_directory(path) ? path + "/model.safetensors" : path,
      std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

class TensorFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string base;
    if (const char* env = std::getenv("AMALGAM_TEST_TMPDIR")) base = env;
    if (base.empty()) base = std::filesystem::temp_directory_path().string();
    std::filesystem::create_directories(base);
    std::string pattern = base + "/core_test.XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    readers_.clear();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  // Writes `tensors` (in their own dtypes) with core's writer and opens the
  // file; the reader lives as long as the test.
  const SafetensorsReader* Write(
      const std::string& name, const Tensors& tensors,
      const std::map<std::string, std::string>& metadata = {}) {
    std::vector<TensorSpec> specs;
    for (const auto& [tensor_name, t] : tensors) {
      specs.push_back(
          TensorSpec{tensor_name, DTypeOf(t.scalar_type()), t.sizes().vec()});
    }
    auto writer = SafetensorsWriter::Create(Path(name), specs, metadata);
    EXPECT_TRUE(writer.ok()) << writer.status();
    if (!writer.ok()) return nullptr;
    for (const auto& [tensor_name, t] : tensors) {
      at::Tensor c = t.contiguous();
      absl::Status s = (*writer)->Append(
          absl::Span<const uint8_t>(static_cast<const uint8_t*>(c.data_ptr()),
                                    c.numel() * c.element_size()));
      EXPECT_TRUE(s.ok()) << s;
    }
    absl::Status s = (*writer)->Finish();
    EXPECT_TRUE(s.ok()) << s;
    return Open(Path(name));
  }

  const SafetensorsReader* Open(const std::string& path) {
    auto reader = SafetensorsReader::Open(path);
    EXPECT_TRUE(reader.ok()) << reader.status();
    if (!reader.ok()) return nullptr;
    readers_.push_back(std::move(reader).value());
    return readers_.back().get();
  }

 public:
  // The tensor `name` of a file, as a float64 tensor (and its stored dtype).
  static at::Tensor Read(const SafetensorsReader& reader,
                         const std::string& name, DType* dtype = nullptr) {
    const TensorInfo* info = reader.Find(name);
    EXPECT_NE(info, nullptr) << name;
    if (info == nullptr) return at::Tensor();
    if (dtype != nullptr) *dtype = info->dtype;
    at::Tensor t = at::empty(info->shape, ScalarTypeOf(info->dtype));
    auto bytes = reader.Data(*info);
    EXPECT_EQ(bytes.size(), static_cast<size_t>(t.numel() * t.element_size()));
    if (!bytes.empty()) std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
    return t.to(at::kDouble);
  }

 protected:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsReader>> readers_;
};

}  // namespace amalgam::core::testutil
