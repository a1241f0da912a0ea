#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

namespace amalgam::testing {

// A real amalgamd child process on 127.0.0.1:0 with its own data directory.
// Start() waits (with a deadline, no fixed sleeps) until the port file
// appears. The destructor sends SIGTERM and reaps the process.
class ServerProcess {
 public:
  // `data_dir` is created if missing; `extra_args` are appended. `replica`
  // names the process (--replica-name, and its port and log files), so that
  // several may share one data directory; by default the directory's name.
  ServerProcess(std::string binary, std::string data_dir,
                std::vector<std::string> extra_args = {},
                std::string replica = "");
  ~ServerProcess();

  // False if the server exited or did not serve within 60 s.
  bool Start();
  // SIGKILL, no clean-up: for crash tests.
  void Kill();
  // SIGTERM and wait; returns the exit status.
  int Stop();
  // Sends `signal` (e.g. SIGHUP) without waiting.
  void Signal(int signal);
  // Runs the binary with `args` to completion; returns its exit status and
  // appends its output to the log.
  int RunToExit(const std::vector<std::string>& args);

  std::string address() const;
  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  const std::string& data_dir() const { return data_dir_; }
  const std::string& log_path() const { return log_path_; }
  const std::string& replica() const { return replica_; }

 private:
  const std::string binary_;
  const std::string data_dir_;
  const std::vector<std::string> extra_args_;
  const std::string replica_;
  std::string log_path_;
  pid_t pid_ = -1;
  int port_ = 0;
  int metrics_port_ = 0;
};

// A fresh directory under $AMALGAM_TEST_TMPDIR (or /tmp).
std::string MakeTempDir(const std::string& prefix);

// Every directory MakeTempDir made in this process, oldest first (the
// integration tests remove them when all their tests passed: see
// temp_dirs.cc).
std::vector<std::string> MadeTempDirs();

}  // namespace amalgam::testing
