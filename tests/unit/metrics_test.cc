// Metrics labels: only methods amalgamd serves, and every job series from 0.
#include "server/metrics.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace amalgam::server {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(MetricsTest, OnlyServedMethodsBecomeLabels) {
  EXPECT_EQ(MethodLabel("/amalgam.v1.ArtifactService/Upload"),
            "/amalgam.v1.ArtifactService/Upload");
  EXPECT_EQ(MethodLabel("/amalgam.v1.JobService/SubmitJob"),
            "/amalgam.v1.JobService/SubmitJob");
  EXPECT_EQ(MethodLabel("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check");
  EXPECT_EQ(
      MethodLabel(
          "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
      "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo");
  for (const char* method : {"/amalgam.v1.ArtifactService/Nope", "/x", "",
                             "/amalgam.v1.JobService"}) {
    EXPECT_EQ(MethodLabel(method), kUnknownMethod) << method;
  }
  EXPECT_EQ(MethodLabel(nullptr), kUnknownMethod);
}

TEST(MetricsTest, UnknownMethodsShareOneSeries) {
  Metrics metrics("cpu");
  const size_t before = metrics.Serialize().size();
  for (int i = 0; i < 200; ++i) {
    metrics.RpcDone(
        MethodLabel(("/" + std::string(4096, 'a' + i % 26)).c_str()),
        "UNIMPLEMENTED", 0.001);
  }
  const std::string text = metrics.Serialize();
  EXPECT_THAT(
      text,
      HasSubstr(
          "amalgam_rpcs_total{code=\"UNIMPLEMENTED\",method=\"unknown\"} 200"));
  EXPECT_LT(text.size(), before + 4096);
}

TEST(MetricsTest, EveryJobSeriesExistsAtZeroBeforeTheFirstJob) {
  const std::string text = Metrics("cpu").Serialize();
  for (const char* method : {"average", "weighted", "fisher", "regmean"}) {
    EXPECT_THAT(
        text,
        HasSubstr(std::string("amalgam_jobs_total{kind=\"merge\",method=\"") +
                  method + "\",state=\"succeeded\"} 0"));
  }
  EXPECT_THAT(
      text,
      HasSubstr(
          "amalgam_jobs_total{kind=\"grow\",method=\"-\",state=\"failed\"} 0"));
  EXPECT_THAT(
      text,
      HasSubstr(
          "amalgam_job_duration_seconds_count{kind=\"sweep\",method=\"-\"} 0"));
  EXPECT_THAT(text,
              HasSubstr("amalgam_job_output_bytes_total{kind=\"merge\"} 0"));
  EXPECT_THAT(text, Not(HasSubstr("method=\"unspecified\"")));
}

TEST(MetricsTest, BlasLibraryAndCoreAreExported) {
  EXPECT_THAT(Metrics("cpu").Serialize(), HasSubstr("amalgam_blas_info{"));
}

TEST(MetricsTest, OnlyWhatDiffersPerReplicaCarriesItsName) {
  Metrics metrics("cpu", "replica-7");
  metrics.RpcDone("/amalgam.v1.JobService/ListJobs", "OK", 0.01);
  metrics.SetQueue(3, 1);
  const std::string text = metrics.Serialize();
  EXPECT_THAT(text,
              HasSubstr("amalgam_rpcs_total{replica=\"replica-7\",code=\"OK\","
                        "method=\"/amalgam.v1.JobService/ListJobs\"} 1"));
  EXPECT_THAT(
      text, HasSubstr("amalgam_uploads_in_progress{replica=\"replica-7\"} 0"));
  EXPECT_THAT(text, HasSubstr("amalgam_received_bytes_total{replica="));
  // Counted in the catalog: the same on every replica.
  EXPECT_THAT(text, HasSubstr("amalgam_jobs_queued 3"));
  EXPECT_THAT(text, HasSubstr("amalgam_jobs_running 1"));
  EXPECT_THAT(text, HasSubstr("amalgam_stored_bytes 0"));
  // A single process has no replica label.
  EXPECT_THAT(Metrics("cpu").Serialize(), Not(HasSubstr("replica=")));
}

}  // namespace
}  // namespace amalgam::server
