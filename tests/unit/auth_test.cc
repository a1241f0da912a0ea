// Token files and the loopback rule.
#include "server/auth.h"

#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace amalgam::server {
namespace {

using ::testing::HasSubstr;

std::string WriteTokens(const std::string& name, const std::string& text,
                        mode_t mode) {
  const char* dir = std::getenv("TMPDIR");
  const std::string path =
      std::string(dir != nullptr ? dir : "/tmp") + "/amalgam-auth-" + name;
  std::ofstream(path) << text;
  ::chmod(path.c_str(), mode);
  return path;
}

TEST(TokenStoreTest, LooksUpTheOrganisationOfEachToken) {
  auto store = TokenStore::Load(WriteTokens(
      "ok", "# comment\nalpha org-a\nbeta org-b # trailing\n", 0600));
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ(*(*store)->Lookup("alpha"), "org-a");
  EXPECT_EQ(*(*store)->Lookup("beta"), "org-b");
  EXPECT_EQ((*store)->Lookup("alph").status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ((*store)->Lookup("").status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ((*store)->size(), 2u);
}

TEST(TokenStoreTest, RefusesATokenFileOthersMayWrite) {
  for (mode_t mode : {0666, 0620, 0602}) {
    const std::string path = WriteTokens("writable", "alpha org-a\n", mode);
    auto store = TokenStore::Load(path);
    EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition)
        << std::oct << mode;
    EXPECT_THAT(store.status().message(), HasSubstr(path));
    EXPECT_THAT(store.status().message(), HasSubstr("chmod go-w"));
  }
  EXPECT_TRUE(TokenStore::Load(WriteTokens("readable", "a o\n", 0644)).ok());
}

TEST(LoopbackTest, OnlyLoopbackLiteralsAndLocalhostAreLoopback) {
  for (const char* address :
       {"127.0.0.1:50051", "127.1.2.3:0", "localhost:1", "[::1]:50051"}) {
    EXPECT_TRUE(IsLoopbackAddress(address)) << address;
  }
  for (const char* address :
       {"127.example.com:50051", "0.0.0.0:50051", "10.0.0.1:1", "[::]:1",
        "128.0.0.1:1", "127.0.0.1.nip.io:1", "localhost.evil:1", ":50051",
        "[::ffff:10.0.0.1]:1"}) {
    EXPECT_FALSE(IsLoopbackAddress(address)) << address;
  }
}

}  // namespace
}  // namespace amalgam::server
