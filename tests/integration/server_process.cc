#include "tests/integration/server_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "tests/postgres_database.h"

namespace amalgam::testing {

namespace {

std::mutex made_mu;
std::vector<std::string>* const made_dirs = new std::vector<std::string>;

}  // namespace

std::string MakeTempDir(const std::string& prefix) {
  const char* base = std::getenv("AMALGAM_TEST_TMPDIR");
  std::filesystem::path root = base != nullptr ? base : "/tmp";
  std::filesystem::create_directories(root);
  std::string pattern = (root / (prefix + "-XXXXXX")).string();
  char* made = ::mkdtemp(pattern.data());
  if (made == nullptr) return std::string();
  std::lock_guard<std::mutex> lock(made_mu);
  made_dirs->push_back(made);
  return made;
}

std::vector<std::string> MadeTempDirs() {
  std::lock_guard<std::mutex> lock(made_mu);
  return *made_dirs;
}

ServerProcess::ServerProcess(std::string binary, std::string data_dir,
                             std::vector<std::string> extra_args,
                             std::string replica)
    : binary_(std::move(binary)),
      data_dir_(std::move(data_dir)),
      extra_args_(std::move(extra_args)),
      replica_(replica.empty()
                   ? std::filesystem::path(data_dir_).filename().string()
                   : std::move(replica)),
      log_path_(replica.empty() ? data_dir_ + ".log"
                                : data_dir_ + "." + replica_ + ".log") {}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) Stop();
}

bool ServerProcess::Start() {
  std::filesystem::create_directories(data_dir_);
  const std::string port_file =
      log_path_.substr(0, log_path_.size() - 4) + ".port";
  std::filesystem::remove(port_file);
  // The device the suite runs on: AMALGAM_TEST_DEVICE (a GPU machine sets
  // "cuda"), by default the CPU.
  const char* device = std::getenv("AMALGAM_TEST_DEVICE");
  std::vector<std::string> args = {binary_,
                                   "--listen",
                                   "127.0.0.1:0",
                                   "--data-dir",
                                   data_dir_,
                                   "--port-file",
                                   port_file,
                                   "--device",
                                   device != nullptr ? device : "cpu",
                                   "--metrics-listen",
                                   "127.0.0.1:0",
                                   "--replica-name",
                                   replica_};
  // With AMALGAM_TEST_CATALOG=postgres, the catalog is a PostgreSQL database
  // of this data directory's own (the same one after a restart).
  const char* catalog_kind = std::getenv("AMALGAM_TEST_CATALOG");
  const std::string catalog =
      catalog_kind != nullptr && std::string(catalog_kind) == "postgres"
          ? PostgresDatabaseFor(data_dir_)
          : "";
  if (!catalog.empty()) {
    args.push_back("--catalog");
    args.push_back(catalog);
  }
  args.insert(args.end(), extra_args_.begin(), extra_args_.end());
  // Everything the child needs is prepared before fork: the test process
  // has threads, so the child may only make async-signal-safe calls.
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  const int log = ::open(log_path_.c_str(),
                         O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  pid_ = ::fork();
  if (pid_ == 0) {
    ::dup2(log, STDOUT_FILENO);
    ::dup2(log, STDERR_FILENO);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(log);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream in(port_file);
    if (in >> port_ >> metrics_port_ && port_ > 0) return true;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

void ServerProcess::Kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

int ServerProcess::Stop() {
  if (pid_ <= 0) return -1;
  ::kill(pid_, SIGTERM);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  return status;
}

void ServerProcess::Signal(int signal) {
  if (pid_ > 0) ::kill(pid_, signal);
}

int ServerProcess::RunToExit(const std::vector<std::string>& args) {
  std::string command = binary_;
  for (const std::string& arg : args) command += " '" + arg + "'";
  command += " >>'" + log_path_ + "' 2>&1";
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string ServerProcess::address() const {
  return "127.0.0.1:" + std::to_string(port_);
}

}  // namespace amalgam::testing
