// Removes the directories MakeTempDir made (servers' data and logs) when
// every test of the process passed; a failure keeps them for a look. Linked
// into each integration test binary (ctest runs one test per process).
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <system_error>

#include "tests/integration/server_process.h"

namespace amalgam::testing {
namespace {

class RemoveTempDirsIfAllPassed : public ::testing::Environment {
 public:
  // After every test suite's TearDownTestSuite: the servers have stopped.
  void TearDown() override {
    if (!::testing::UnitTest::GetInstance()->Passed()) return;
    for (const std::string& dir : MadeTempDirs()) {
      std::error_code ignored;
      std::filesystem::remove_all(dir, ignored);
      // A server whose data directory this is logs and writes its port
      // beside it.
      std::filesystem::remove(dir + ".log", ignored);
      std::filesystem::remove(dir + ".port", ignored);
    }
  }
};

::testing::Environment* const registered =
    ::testing::AddGlobalTestEnvironment(new RemoveTempDirsIfAllPassed);

}  // namespace
}  // namespace amalgam::testing
