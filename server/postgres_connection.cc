// SqlConnection over PostgreSQL with libpq. Parameters go as text, except
// bytes, which go binary; results come as text, bytea unescaped.

#include <libpq-fe.h>
#include <poll.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "core/status_macros.h"
#include "server/sql.h"

namespace amalgam::server {
namespace {

// Type OIDs of the results the catalog reads (pg_type.h).
constexpr Oid kBytea = 17, kInt8 = 20, kInt2 = 21, kInt4 = 23, kNumeric = 1700;

// Owns a PGresult.
struct Result {
  PGresult* result;
  explicit Result(PGresult* r) : result(r) {}
  ~Result() { PQclear(result); }
  Result(const Result&) = delete;
  Result& operator=(const Result&) = delete;
};

// "?N" placeholders as PostgreSQL's "$N" (outside quoted literals).
std::string Placeholders(const std::string& sql) {
  std::string out;
  out.reserve(sql.size());
  bool quoted = false;
  for (size_t i = 0; i < sql.size(); ++i) {
    const char c = sql[i];
    if (c == '\'') quoted = !quoted;
    const bool number_follows =
        i + 1 < sql.size() &&
        std::isdigit(static_cast<unsigned char>(sql[i + 1]));
    out.push_back(c == '?' && !quoted && number_follows ? '$' : c);
  }
  return out;
}

class PostgresConnection : public SqlConnection {
 public:
  explicit PostgresConnection(std::string uri) : uri_(std::move(uri)) {}
  ~PostgresConnection() override {
    if (conn_ != nullptr) PQfinish(conn_);
  }

  // Connects; UNAVAILABLE if the server cannot be reached.
  absl::Status Connect() {
    if (conn_ != nullptr) PQfinish(conn_);
    conn_ = PQconnectdb(uri_.c_str());
    if (PQstatus(conn_) != CONNECTION_OK) {
      return absl::UnavailableError(
          absl::StrCat("catalog: cannot connect to PostgreSQL (", Redacted(),
                       "): ", Message()));
    }
    Result notices(PQexec(conn_, "SET client_min_messages = warning"));
    return absl::OkStatus();
  }

  absl::StatusOr<SqlResult> Run(const std::string& sql,
                                const std::vector<SqlValue>& params) override {
    AMALGAM_RETURN_IF_ERROR(EnsureConnected());
    std::vector<std::string> texts(params.size());
    std::vector<const char*> values(params.size(), nullptr);
    std::vector<int> lengths(params.size(), 0), formats(params.size(), 0);
    for (size_t i = 0; i < params.size(); ++i) {
      const SqlValue& p = params[i];
      switch (p.type) {
        case SqlValue::Type::kNull:
          break;
        case SqlValue::Type::kInt:
          texts[i] = std::to_string(p.number);
          values[i] = texts[i].c_str();
          break;
        case SqlValue::Type::kText:
          values[i] = p.text.c_str();
          break;
        case SqlValue::Type::kBytes:
          values[i] = p.text.data();
          lengths[i] = static_cast<int>(p.text.size());
          formats[i] = 1;
          break;
      }
    }
    Result result(PQexecParams(
        conn_, Placeholders(sql).c_str(), static_cast<int>(params.size()),
        nullptr, values.data(), lengths.data(), formats.data(), 0));
    const ExecStatusType status = PQresultStatus(result.result);
    if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
      return Error(result.result, sql);
    }
    SqlResult out;
    const int columns = PQnfields(result.result);
    for (int r = 0; r < PQntuples(result.result); ++r) {
      SqlRow row;
      for (int c = 0; c < columns; ++c) {
        if (PQgetisnull(result.result, r, c)) {
          row.push_back(SqlValue());
          continue;
        }
        const char* text = PQgetvalue(result.result, r, c);
        switch (PQftype(result.result, c)) {
          case kInt2:
          case kInt4:
          case kInt8:
          case kNumeric:  // SUM over BIGINT: an integer
            row.push_back(SqlValue::Int(std::strtoll(text, nullptr, 10)));
            break;
          case kBytea: {
            size_t length = 0;
            unsigned char* bytes = PQunescapeBytea(
                reinterpret_cast<const unsigned char*>(text), &length);
            if (bytes == nullptr) {
              return absl::ResourceExhaustedError(
                  "catalog: out of memory reading a row");
            }
            row.push_back(SqlValue::Bytes(
                std::string(reinterpret_cast<const char*>(bytes), length)));
            PQfreemem(bytes);
            break;
          }
          default:
            row.push_back(SqlValue::Text(
                std::string(text, PQgetlength(result.result, r, c))));
        }
      }
      out.rows.push_back(std::move(row));
    }
    const char* changed = PQcmdTuples(result.result);
    out.changed = changed != nullptr ? std::strtoll(changed, nullptr, 10) : 0;
    return out;
  }

  const char* Begin() const override { return "BEGIN"; }
  const char* ForUpdate() const override { return " FOR UPDATE"; }
  const char* BytesType() const override { return "BYTEA"; }
  const char* InsertionColumn() const override { return ", seq BIGSERIAL"; }
  const char* InsertionOrder() const override { return "seq"; }

  absl::StatusOr<int64_t> SchemaVersion() override {
    AMALGAM_RETURN_IF_ERROR(
        Run("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT "
            "NULL)",
            {})
            .status());
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result, Run("SELECT MAX(version) FROM schema_version", {}));
    return result.rows.empty() ? 0 : result.rows[0][0].number;
  }

  absl::Status SetSchemaVersion(int64_t version) override {
    AMALGAM_RETURN_IF_ERROR(Run("DELETE FROM schema_version", {}).status());
    return Run("INSERT INTO schema_version (version) VALUES (?1)",
               {SqlValue::Int(version)})
        .status();
  }

  // Released at the transaction's end.
  absl::Status TransactionLock(int64_t key) override {
    return Run("SELECT pg_advisory_xact_lock(?1)", {SqlValue::Int(key)})
        .status();
  }
  const char* ForShare() const override { return " FOR SHARE"; }
  const char* SkipLocked() const override { return " FOR UPDATE SKIP LOCKED"; }
  bool Shared() const override { return true; }
  const char* NotifyJob() const override {
    return "SELECT pg_notify('amalgam_jobs', ?1)";
  }

 private:
  // Reconnects a lost connection, at most once per backoff interval
  // (doubling from 100 ms to 10 s while it keeps failing).
  absl::Status EnsureConnected() {
    if (conn_ != nullptr && PQstatus(conn_) == CONNECTION_OK) {
      return absl::OkStatus();
    }
    const auto now = std::chrono::steady_clock::now();
    if (now < next_attempt_) {
      return absl::UnavailableError(
          absl::StrCat("catalog: PostgreSQL is unreachable (", Redacted(),
                       "): ", last_error_));
    }
    absl::Status status = Connect();
    if (status.ok()) {
      backoff_ = std::chrono::milliseconds(100);
      return status;
    }
    last_error_ = std::string(status.message());
    next_attempt_ = now + backoff_;
    backoff_ = std::min(backoff_ * 2, std::chrono::milliseconds(10000));
    return status;
  }

  absl::Status Error(PGresult* result, const std::string& sql) const {
    const char* state = PQresultErrorField(result, PG_DIAG_SQLSTATE);
    const std::string code = state != nullptr ? state : "";
    std::string message =
        absl::StrCat("catalog: ", Message(), " (in: ", sql.substr(0, 80), ")");
    if (code == "23505") return absl::AlreadyExistsError(std::move(message));
    if (code == "53100") {
      return absl::ResourceExhaustedError(std::move(message));
    }
    if (PQstatus(conn_) != CONNECTION_OK || code.rfind("08", 0) == 0 ||
        code.rfind("57P", 0) == 0) {
      return absl::UnavailableError(std::move(message));
    }
    return absl::InternalError(std::move(message));
  }

  std::string Message() const {
    std::string message = conn_ != nullptr ? PQerrorMessage(conn_) : "";
    while (!message.empty() &&
           std::isspace(static_cast<unsigned char>(message.back()))) {
      message.pop_back();
    }
    return message;
  }

  // The URI without a password.
  std::string Redacted() const {
    const size_t scheme = uri_.find("://");
    const size_t at = uri_.find('@');
    if (scheme == std::string::npos || at == std::string::npos) return uri_;
    const size_t colon = uri_.find(':', scheme + 3);
    if (colon == std::string::npos || colon > at) return uri_;
    return absl::StrCat(uri_.substr(0, colon), ":***", uri_.substr(at));
  }

  const std::string uri_;
  PGconn* conn_ = nullptr;
  std::chrono::steady_clock::time_point next_attempt_;
  std::chrono::milliseconds backoff_{100};
  std::string last_error_;
};

// LISTEN amalgam_jobs on a connection of its own, waited on with poll(2).
class PostgresJobChanges : public JobChanges {
 public:
  explicit PostgresJobChanges(std::string uri) : uri_(std::move(uri)) {}
  ~PostgresJobChanges() override {
    if (conn_ != nullptr) PQfinish(conn_);
  }

  absl::Status Connect() {
    if (conn_ != nullptr) PQfinish(conn_);
    conn_ = PQconnectdb(uri_.c_str());
    if (PQstatus(conn_) == CONNECTION_OK) {
      Result listen(PQexec(conn_, "LISTEN amalgam_jobs"));
      if (PQresultStatus(listen.result) == PGRES_COMMAND_OK) {
        backoff_ = absl::Milliseconds(100);
        return absl::OkStatus();
      }
    }
    const std::string error = PQerrorMessage(conn_);
    PQfinish(conn_);
    conn_ = nullptr;
    next_attempt_ = absl::Now() + backoff_;
    backoff_ = std::min(backoff_ * 2, absl::Seconds(10));
    return absl::UnavailableError(
        absl::StrCat("catalog: cannot listen for job changes: ", error));
  }

  absl::StatusOr<std::vector<std::string>> Wait(
      absl::Duration timeout) override {
    if (conn_ == nullptr) {
      const absl::Time now = absl::Now();
      if (now < next_attempt_) {
        absl::SleepFor(std::min(timeout, next_attempt_ - now));
        return absl::UnavailableError(
            "catalog: not listening for job changes (reconnecting)");
      }
      AMALGAM_RETURN_IF_ERROR(Connect());
    }
    std::vector<std::string> changed = Drain();
    if (!changed.empty()) return changed;
    pollfd socket = {PQsocket(conn_), POLLIN, 0};
    const int ready = ::poll(
        &socket, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout)));
    if (ready < 0 && errno != EINTR) {
      return absl::InternalError(
          absl::StrCat("catalog: poll: ", std::strerror(errno)));
    }
    if (PQconsumeInput(conn_) == 0 || PQstatus(conn_) != CONNECTION_OK) {
      const std::string error = PQerrorMessage(conn_);
      PQfinish(conn_);
      conn_ = nullptr;
      next_attempt_ = absl::Now();
      return absl::UnavailableError(
          absl::StrCat("catalog: lost the job-change listener: ", error));
    }
    return Drain();
  }

 private:
  std::vector<std::string> Drain() {
    std::vector<std::string> changed;
    while (PGnotify* notify = PQnotifies(conn_)) {
      changed.emplace_back(notify->extra);
      PQfreemem(notify);
    }
    return changed;
  }

  const std::string uri_;
  PGconn* conn_ = nullptr;
  absl::Time next_attempt_ = absl::InfinitePast();
  absl::Duration backoff_ = absl::Milliseconds(100);
};

}  // namespace

absl::StatusOr<std::unique_ptr<JobChanges>> ListenForJobChanges(
    const std::string& uri) {
  auto changes = std::make_unique<PostgresJobChanges>(uri);
  AMALGAM_RETURN_IF_ERROR(changes->Connect());
  return changes;
}

absl::StatusOr<std::unique_ptr<SqlConnection>> OpenPostgres(
    const std::string& uri) {
  auto connection = std::make_unique<PostgresConnection>(uri);
  AMALGAM_RETURN_IF_ERROR(connection->Connect());
  return connection;
}

}  // namespace amalgam::server
