// The log field builder: what any caller sends stays one parseable field.
#include "server/log.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace amalgam::server {
namespace {

TEST(LogFieldsTest, PlainTokensAreWrittenBare) {
  EXPECT_EQ(LogFields("upload")
                .Add("artifact", "art_12ab")
                .Add("bytes", 4096)
                .Add("method", "/amalgam.v1.ArtifactService/Upload")
                .text(),
            "event=upload artifact=art_12ab bytes=4096 "
            "method=/amalgam.v1.ArtifactService/Upload");
}

TEST(LogFieldsTest, QuotesBackslashesAndControlBytesAreEscaped) {
  EXPECT_EQ(LogFields("e").Add("org", "a\" b=c\\d\ne\x01\xff").text(),
            "event=e org=\"a\\\" b=c\\\\d\\x0ae\\x01\\xff\"");
  EXPECT_EQ(LogFields("e").Add("name", "").text(), "event=e name=\"\"");
}

TEST(LogFieldsTest, ALineCannotBeForgedIntoTwoFieldsOrLines) {
  const std::string line =
      LogFields("rpc").Add("org", "x\" code=OK\nINFO event=fake").text();
  EXPECT_EQ(line.find('\n'), std::string::npos);
  EXPECT_EQ(line, "event=rpc org=\"x\\\" code=OK\\x0aINFO event=fake\"");
}

TEST(LogFieldsTest, LongValuesAreCutAndSaySo) {
  const std::string huge(100000, 'a');
  const std::string line = LogFields("rpc").Add("path", huge).text();
  EXPECT_LT(line.size(), kMaxLogValueBytes + 64);
  EXPECT_THAT(line, ::testing::EndsWith("...(100000 bytes)\""));
}

}  // namespace
}  // namespace amalgam::server
