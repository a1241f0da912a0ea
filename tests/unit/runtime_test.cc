// Device resolution, the BLAS kernel choice, the GEMM check and thread sizing.
#include "core/runtime.h"

#include <torch/cuda.h>

#include <iostream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace amalgam::core {
namespace {

using ::testing::HasSubstr;

TEST(DeviceTest, ResolvesCpuAndAuto) {
  auto cpu = ResolveDevice("cpu");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ(*cpu, "cpu");
  auto automatic = ResolveDevice("auto");
  ASSERT_TRUE(automatic.ok()) << automatic.status();
  EXPECT_EQ(*automatic, torch::cuda::is_available() ? "cuda:0" : "cpu");
}

TEST(DeviceTest, CudaWithoutCudaIsAFailedPrecondition) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "this machine has CUDA";
  for (const char* spec : {"cuda", "cuda:0", "cuda:3"}) {
    auto device = ResolveDevice(spec);
    EXPECT_EQ(device.status().code(), absl::StatusCode::kFailedPrecondition)
        << spec;
    EXPECT_THAT(device.status().message(), HasSubstr(spec));
  }
}

TEST(DeviceTest, MalformedDeviceIsAnInvalidArgument) {
  for (const char* spec : {"", "gpu", "cuda:", "cuda:x", "cuda:-1", "CPU"}) {
    auto device = ResolveDevice(spec);
    EXPECT_EQ(device.status().code(), absl::StatusCode::kInvalidArgument)
        << spec;
  }
}

TEST(DeviceTest, RuntimeDescriptionNamesLibTorchBlasAndCuda) {
  std::string text = DescribeRuntime();
  EXPECT_THAT(text, HasSubstr("LibTorch "));
  EXPECT_THAT(text, HasSubstr("BLAS: "));
  EXPECT_THAT(text, HasSubstr("CUDA: "));
  std::cout << text << "\n";
}

TEST(DeviceTest, RuntimeDescriptionNamesTheBlasCore) {
  const BlasInfo blas = GetBlasInfo();
  if (blas.core.empty()) GTEST_SKIP() << "the BLAS is not OpenBLAS";
  EXPECT_THAT(DescribeRuntime(), HasSubstr("BLAS core: " + blas.core));
}

CpuFeatures Avx512() { return {/*avx512=*/true, /*avx2_fma=*/true}; }
CpuFeatures Avx2() { return {/*avx512=*/false, /*avx2_fma=*/true}; }

TEST(BlasCoreTest, GenericCoresAreRecognisedWhateverTheirCase) {
  for (const char* core : {"Prescott", "katmai", "CORE2", "Nehalem", "Penryn",
                           "Dunnington", "Atom"}) {
    EXPECT_TRUE(IsGenericBlasCore(core)) << core;
  }
  for (const char* core : {"SkylakeX", "Haswell", "Cooperlake", "Zen", ""}) {
    EXPECT_FALSE(IsGenericBlasCore(core)) << core;
  }
}

TEST(BlasCoreTest, AutoReplacesAGenericCoreByTheCpusBest) {
  auto choice = ChooseBlasCore("auto", "", "Prescott", Avx512());
  ASSERT_TRUE(choice.ok()) << choice.status();
  EXPECT_EQ(choice->core, "SkylakeX");
  EXPECT_THAT(choice->reason, HasSubstr("Prescott"));
  choice = ChooseBlasCore("auto", "", "Nehalem", Avx2());
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->core, "Haswell");
  choice = ChooseBlasCore("auto", "", "Core2", CpuFeatures{});
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->core, "");
}

TEST(BlasCoreTest, AutoKeepsADetectedCoreAndTheUsersVariable) {
  auto choice = ChooseBlasCore("auto", "", "Zen", Avx2());
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->core, "");
  choice = ChooseBlasCore("auto", "Prescott", "Prescott", Avx512());
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->core, "");
  EXPECT_THAT(choice->reason, HasSubstr("OPENBLAS_CORETYPE=Prescott"));
}

TEST(BlasCoreTest, KeepAndNamedCoresDoWhatTheFlagSays) {
  auto choice = ChooseBlasCore("keep", "", "Prescott", Avx512());
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->core, "");
  choice = ChooseBlasCore("Cooperlake", "", "Prescott", Avx512());
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->core, "Cooperlake");
  choice = ChooseBlasCore("prescott", "", "Prescott", Avx512());
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->core, "");
  choice = ChooseBlasCore("SkylakeX", "", "", Avx512());
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->core, "") << "not OpenBLAS: nothing to choose";
  EXPECT_EQ(ChooseBlasCore("", "", "Prescott", Avx512()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(BlasCoreTest, TheLoadedBlasPassesTheGemmCheck) {
  const absl::Status status = CheckGemm();
  EXPECT_TRUE(status.ok()) << status;
  std::cout << "BLAS core: " << GetBlasInfo().core << "\n";
}

TEST(ThreadsTest, CgroupQuotasRoundUpToWholeCpus) {
  EXPECT_EQ(CpusFromCpuMax("max 100000\n"), 0);
  EXPECT_EQ(CpusFromCpuMax("200000 100000\n"), 2);
  EXPECT_EQ(CpusFromCpuMax("150000 100000"), 2);
  EXPECT_EQ(CpusFromCpuMax("50000 100000"), 1);
  EXPECT_EQ(CpusFromCpuMax("garbage"), 0);
  EXPECT_EQ(CpusFromCgroupQuota(-1, 100000), 0);
  EXPECT_EQ(CpusFromCgroupQuota(400000, 100000), 4);
}

TEST(ThreadsTest, UsableCpusAreSharedAmongWorkers) {
  EXPECT_GE(UsableCpus(), 1);
  EXPECT_EQ(IntraOpThreadsFor(2, 1), 2);
  EXPECT_EQ(IntraOpThreadsFor(16, 4), 4);
  EXPECT_EQ(IntraOpThreadsFor(2, 3), 1);
  EXPECT_EQ(IntraOpThreadsFor(0, 0), 1);
}

}  // namespace
}  // namespace amalgam::core
