// SqlConnection over an SQLite database file.

#include <sqlite3.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "server/sql.h"

namespace amalgam::server {

namespace {

class SqliteConnection : public SqlConnection {
 public:
  explicit SqliteConnection(sqlite3* db) : db_(db) {}
  ~SqliteConnection() override { sqlite3_close(db_); }

  absl::StatusOr<SqlResult> Run(const std::string& sql,
                                const std::vector<SqlValue>& params) override {
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &stmt, nullptr) != SQLITE_OK) {
      return Error(sql);
    }
    struct Finalize {
      sqlite3_stmt* stmt;
      ~Finalize() { sqlite3_finalize(stmt); }
    } finalize{stmt};
    for (size_t i = 0; i < params.size(); ++i) {
      const SqlValue& p = params[i];
      const int index = static_cast<int>(i + 1);
      int rc = SQLITE_OK;
      switch (p.type) {
        case SqlValue::Type::kNull:
          rc = sqlite3_bind_null(stmt, index);
          break;
        case SqlValue::Type::kInt:
          rc = sqlite3_bind_int64(stmt, index, p.number);
          break;
        case SqlValue::Type::kText:
          rc = sqlite3_bind_text(stmt, index, p.text.data(),
                                 static_cast<int>(p.text.size()),
                                 SQLITE_TRANSIENT);
          break;
        case SqlValue::Type::kBytes:
          rc = sqlite3_bind_blob(stmt, index, p.text.data(),
                                 static_cast<int>(p.text.size()),
                                 SQLITE_TRANSIENT);
          break;
      }
      if (rc != SQLITE_OK) return Error(sql);
    }
    SqlResult result;
    int rc;
    while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
      SqlRow row;
      for (int c = 0; c < sqlite3_column_count(stmt); ++c) {
        switch (sqlite3_column_type(stmt, c)) {
          case SQLITE_INTEGER:
            row.push_back(SqlValue::Int(sqlite3_column_int64(stmt, c)));
            break;
          case SQLITE_TEXT:
            row.push_back(SqlValue::Text(std::string(
                reinterpret_cast<const char*>(sqlite3_column_text(stmt, c)),
                sqlite3_column_bytes(stmt, c))));
            break;
          case SQLITE_BLOB: {
            const auto* data =
                static_cast<const char*>(sqlite3_column_blob(stmt, c));
            row.push_back(SqlValue::Bytes(
                data == nullptr
                    ? std::string()
                    : std::string(data, sqlite3_column_bytes(stmt, c))));
            break;
          }
          default:
            row.push_back(SqlValue());
        }
      }
      result.rows.push_back(std::move(row));
    }
    if (rc != SQLITE_DONE) return Error(sql);
    result.changed = sqlite3_changes(db_);
    return result;
  }

  const char* Begin() const override { return "BEGIN IMMEDIATE"; }
  const char* ForUpdate() const override { return ""; }
  const char* BytesType() const override { return "BLOB"; }
  const char* InsertionColumn() const override { return ""; }
  const char* InsertionOrder() const override { return "rowid"; }

  absl::StatusOr<int64_t> SchemaVersion() override {
    AMALGAM_ASSIGN_OR_RETURN(SqlResult result, Run("PRAGMA user_version", {}));
    if (result.rows.empty() || result.rows[0].empty()) {
      return absl::InternalError("catalog: no schema version");
    }
    return result.rows[0][0].number;
  }

  absl::Status SetSchemaVersion(int64_t version) override {
    return Run(absl::StrCat("PRAGMA user_version = ", version), {}).status();
  }

  // BEGIN IMMEDIATE has taken the database's write lock already.
  absl::Status TransactionLock(int64_t) override { return absl::OkStatus(); }
  const char* ForShare() const override { return ""; }
  const char* SkipLocked() const override { return ""; }
  bool Shared() const override { return false; }
  const char* NotifyJob() const override { return ""; }

 private:
  // RESOURCE_EXHAUSTED when the disk is full, ALREADY_EXISTS for a
  // constraint, INTERNAL otherwise.
  absl::Status Error(const std::string& sql) const {
    std::string message = absl::StrCat("catalog: ", sqlite3_errmsg(db_),
                                       " (in: ", sql.substr(0, 80), ")");
    switch (sqlite3_errcode(db_)) {
      case SQLITE_FULL:
        return absl::ResourceExhaustedError(std::move(message));
      case SQLITE_CONSTRAINT:
        return absl::AlreadyExistsError(std::move(message));
      default:
        return absl::InternalError(std::move(message));
    }
  }

  sqlite3* db_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<SqlConnection>> OpenSqlite(
    const std::string& path) {
  sqlite3* db = nullptr;
  if (sqlite3_open(path.c_str(), &db) != SQLITE_OK) {
    absl::Status status = absl::InternalError(
        absl::StrCat("catalog: cannot open ", path, ": ", sqlite3_errmsg(db)));
    sqlite3_close(db);
    return status;
  }
  sqlite3_busy_timeout(db, 5000);
  auto connection = std::make_unique<SqliteConnection>(db);
  AMALGAM_RETURN_IF_ERROR(
      connection->Run("PRAGMA journal_mode=WAL", {}).status());
  AMALGAM_RETURN_IF_ERROR(
      connection->Run("PRAGMA synchronous=FULL", {}).status());
  return connection;
}

}  // namespace amalgam::server
