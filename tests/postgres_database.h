#pragma once

// A fresh PostgreSQL database for one test or one test server, on the
// throwaway server that scripts/test.sh starts (scripts/postgres.sh). Its
// socket directory comes from AMALGAM_TEST_POSTGRES; without it there is no
// PostgreSQL to test against.

#include <cstdlib>
#include <functional>
#include <string>

namespace amalgam::testing {

// The socket directory of the test PostgreSQL, or "" if none.
inline std::string TestPostgresSocket() {
  const char* socket = std::getenv("AMALGAM_TEST_POSTGRES");
  return socket != nullptr ? socket : "";
}

// Whether AMALGAM_REQUIRE_POSTGRES=1: scripts/test.sh sets it, so a missing
// PostgreSQL fails the run instead of skipping its tests.
inline bool PostgresRequired() {
  const char* value = std::getenv("AMALGAM_REQUIRE_POSTGRES");
  return value != nullptr && std::string(value) == "1";
}

// In a test (or its SetUp): skips it without a test PostgreSQL, or fails it
// where AMALGAM_REQUIRE_POSTGRES=1.
#define AMALGAM_SKIP_WITHOUT_POSTGRES()                                      \
  do {                                                                       \
    if (::amalgam::testing::TestPostgresSocket().empty()) {                  \
      if (::amalgam::testing::PostgresRequired()) {                          \
        FAIL() << "AMALGAM_REQUIRE_POSTGRES=1 but AMALGAM_TEST_POSTGRES is " \
                  "not set";                                                 \
      }                                                                      \
      GTEST_SKIP() << "no test PostgreSQL (AMALGAM_TEST_POSTGRES)";          \
    }                                                                        \
  } while (false)

// Creates the database for `key` (the same key gives the same database, so a
// restarted server finds its catalog) and returns its URI; "" without a test
// PostgreSQL or if it cannot be created.
inline std::string PostgresDatabaseFor(const std::string& key) {
  const std::string socket = TestPostgresSocket();
  if (socket.empty()) return "";
  const std::string name = "t_" + std::to_string(std::hash<std::string>()(key));
  // template0 takes no connections, so concurrent creations do not collide.
  // An existing database (a restart) is kept: psql's error is ignored.
  const std::string command = "psql -q -h '" + socket +
                              "' -U amalgam -d amalgam -c 'CREATE DATABASE " +
                              name + " TEMPLATE template0' >/dev/null 2>&1";
  static_cast<void>(std::system(command.c_str()));
  return "postgresql://amalgam@/" + name + "?host=" + socket;
}

}  // namespace amalgam::testing
