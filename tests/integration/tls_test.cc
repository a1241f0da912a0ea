// TLS and mutual TLS with the real amalgamd and certificates made by openssl
// in the test.
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "client/cpp/client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/server_process.h"

namespace amalgam {
namespace {

using ::testing::HasSubstr;

class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(testing::MakeTempDir("tls-test"));
    const std::string d = *dir_;
    // A CA, a server certificate for 127.0.0.1 and a client certificate.
    std::ofstream(d + "/make_certs.sh")
        << "set -e\n"
        << "cd '" << d << "'\n"
        << "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key "
           "-out ca.pem -days 1 -subj /CN=amalgam-test-ca 2>/dev/null\n"
        << "for who in server client; do\n"
        << "  openssl req -newkey rsa:2048 -nodes -keyout $who.key "
           "-out $who.csr -subj /CN=$who 2>/dev/null\n"
        << "  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' "
           "> $who.ext\n"
        << "  openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key "
           "-CAcreateserial -out $who.pem -days 1 -extfile $who.ext "
           "2>/dev/null\n"
        << "done\n";
    ASSERT_EQ(std::system(("bash '" + d + "/make_certs.sh'").c_str()), 0);
  }
  static void TearDownTestSuite() { delete dir_; }

  static std::string File(const std::string& name) {
    return *dir_ + "/" + name;
  }

  std::unique_ptr<testing::ServerProcess> StartServer(
      std::vector<std::string> args) {
    auto server = std::make_unique<testing::ServerProcess>(
        AMALGAMD_PATH, testing::MakeTempDir("tls-data"), std::move(args));
    EXPECT_TRUE(server->Start()) << "log: " << server->log_path();
    return server;
  }

  static absl::Status List(const std::string& address, const std::string& ca,
                           const std::string& cert = "",
                           const std::string& key = "") {
    client::ClientOptions options;
    options.address = address;
    options.tls_ca = ca;
    options.tls_cert = cert;
    options.tls_key = key;
    options.unary_deadline = absl::Seconds(10);
    auto client = client::Client::Create(options);
    if (!client.ok()) return client.status();
    return (*client)->ListArtifacts().status();
  }

  static std::string* dir_;
};

std::string* TlsTest::dir_ = nullptr;

TEST_F(TlsTest, TlsClientConnectsAndPlaintextIsRefused) {
  auto server = StartServer(
      {"--tls-cert", File("server.pem"), "--tls-key", File("server.key")});
  EXPECT_TRUE(List(server->address(), File("ca.pem")).ok());
  EXPECT_EQ(List(server->address(), "").code(), absl::StatusCode::kUnavailable);
}

TEST_F(TlsTest, MutualTlsRequiresAClientCertificate) {
  auto server =
      StartServer({"--tls-cert", File("server.pem"), "--tls-key",
                   File("server.key"), "--tls-client-ca", File("ca.pem")});
  EXPECT_EQ(List(server->address(), File("ca.pem")).code(),
            absl::StatusCode::kUnavailable);
  absl::Status with_cert = List(server->address(), File("ca.pem"),
                                File("client.pem"), File("client.key"));
  EXPECT_TRUE(with_cert.ok()) << with_cert;
}

TEST_F(TlsTest, IncompleteTlsFlagsAreRefused) {
  testing::ServerProcess server(AMALGAMD_PATH, testing::MakeTempDir("tls-bad"));
  EXPECT_EQ(
      server.RunToExit({"--listen", "127.0.0.1:0", "--data-dir",
                        File("bad-data"), "--tls-cert", File("server.pem")}),
      1);
  std::ifstream log(server.log_path());
  std::string text((std::istreambuf_iterator<char>(log)),
                   std::istreambuf_iterator<char>());
  EXPECT_THAT(text, HasSubstr("--tls-cert and --tls-key go together"));
}

}  // namespace
}  // namespace amalgam
