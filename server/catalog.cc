// The catalog over SQL: the same statements on SQLite and PostgreSQL (the
// connection supplies the few words that differ), records stored as
// serialised protobufs beside the indexed columns that queries filter on.

#include "server/catalog.h"

#include <sys/random.h>

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <iterator>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/model_files.h"
#include "core/status_macros.h"
#include "server/catalog_pool.h"
#include "server/sql.h"

namespace amalgam::server {

std::string NewId(const std::string& prefix) {
  // The kernel's CSPRNG: ids must not be guessable from earlier ones.
  uint64_t value = 0;
  auto* bytes = reinterpret_cast<uint8_t*>(&value);
  size_t got = 0;
  while (got < sizeof(value)) {
    const ssize_t n = ::getrandom(bytes + got, sizeof(value) - got, 0);
    if (n > 0) got += static_cast<size_t>(n);
  }
  char buffer[17];
  std::snprintf(buffer, sizeof(buffer), "%016llx",
                static_cast<unsigned long long>(value));
  return absl::StrCat(prefix, "_", buffer);
}

bool IsFinal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

std::vector<v1::ModelFile> ArtifactFiles(const v1::Artifact& artifact) {
  if (artifact.files_size() > 0) {
    return {artifact.files().begin(), artifact.files().end()};
  }
  v1::ModelFile file;
  file.set_name(core::kSingleFileName);
  file.set_size_bytes(artifact.size_bytes());
  file.set_sha256(artifact.sha256());
  return {file};
}

std::vector<std::string> JobInputs(const v1::Job& job) {
  std::vector<std::string> ids;
  for (const std::string* id :
       {&job.sweep().a_id(), &job.sweep().b_id(), &job.grow().a_id(),
        &job.grow().b_id(), &job.merge().base_id()}) {
    if (!id->empty()) ids.push_back(*id);
  }
  for (const v1::MergeModel& model : job.merge().models()) {
    for (const std::string* id :
         {&model.weights_id(), &model.gram_id(), &model.fisher_id()}) {
      if (!id->empty()) ids.push_back(*id);
    }
  }
  return ids;
}

namespace {

// The distinct contents (sha256) of an artifact's files, sorted.
std::vector<std::string> Contents(const v1::Artifact& artifact) {
  std::set<std::string> contents;
  for (const v1::ModelFile& file : ArtifactFiles(artifact)) {
    contents.insert(file.sha256());
  }
  return {contents.begin(), contents.end()};
}

int64_t Now() { return static_cast<int64_t>(std::time(nullptr)); }
int64_t NowMillis() { return absl::ToUnixMillis(absl::Now()); }

// Connections to a PostgreSQL catalog per process.
constexpr size_t kPostgresConnections = 8;

// Transaction locks ("amalgamM", "amalgamS" as integers): schema migrations,
// and submissions (so that limits hold across processes).
constexpr int64_t kMigrationLock = 0x616d616c67616d4d;
constexpr int64_t kSubmitLock = 0x616d616c67616d53;
// ("amalgamU"): openings of upload streams.
constexpr int64_t kStreamLock = 0x616d616c67616d55;

// How long a job whose run ended without finishing waits before its next
// attempt: 1 s, doubling per attempt, at most a minute.
int64_t BackoffMillis(int64_t attempt) {
  const int64_t doublings = std::clamp<int64_t>(attempt - 1, 0, 6);
  return std::min<int64_t>(int64_t{1000} << doublings, 60000);
}

constexpr int64_t kQueued = v1::JOB_STATE_QUEUED;
constexpr int64_t kRunning = v1::JOB_STATE_RUNNING;

absl::Status LostRun(const v1::Job& job) {
  return absl::FailedPreconditionError(absl::StrCat(
      "run ", job.attempt(), " of job ", job.id(),
      " no longer holds it (its lease expired and another run took it over, "
      "or it ended)"));
}

absl::Status StreamTaken(const std::string& upload_id,
                         const std::string& holder, int64_t left_ms) {
  return absl::AbortedError(absl::StrCat(
      "upload ", upload_id, " is being received on another stream (by ", holder,
      "); that stream is asked to stop, and its hold ends within ",
      (std::max<int64_t>(0, left_ms) + 999) / 1000,
      " s if its replica is gone; retry"));
}

absl::Status TooManyStreams(const std::string& owner, int64_t open) {
  return absl::ResourceExhaustedError(
      absl::StrCat("organisation ", owner, " already has ", open,
                   " uploads in progress (the limit); retry later"));
}

// The stream leases of Catalog::OpenStream in memory, for a database that one
// process owns: the same rules as the shared table, without its writes.
class StreamLeases {
 public:
  absl::Status Open(const std::string& stream, const std::string& owner,
                    const std::string& upload_id, const std::string& holder,
                    absl::Duration lease, int max_per_org) {
    absl::MutexLock lock(&mu_);
    const int64_t now = NowMillis();
    int64_t open = 0;
    for (auto it = streams_.begin(); it != streams_.end();) {
      if (it->second.until < now) {
        it = streams_.erase(it);
        continue;
      }
      Lease& other = it->second;
      if (other.owner == owner) {
        if (!upload_id.empty() && other.upload_id == upload_id) {
          other.stop = true;
          return StreamTaken(upload_id, other.holder, other.until - now);
        }
        ++open;
      }
      ++it;
    }
    if (open >= max_per_org) return TooManyStreams(owner, open);
    streams_[stream] = Lease{owner, upload_id, holder,
                             now + absl::ToInt64Milliseconds(lease), false};
    return absl::OkStatus();
  }

  absl::Status Close(const std::string& stream) {
    absl::MutexLock lock(&mu_);
    streams_.erase(stream);
    return absl::OkStatus();
  }

  absl::Status CloseAllOf(const std::string& holder) {
    absl::MutexLock lock(&mu_);
    for (auto it = streams_.begin(); it != streams_.end();) {
      it = it->second.holder == holder ? streams_.erase(it) : std::next(it);
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<std::string>> Renew(const std::string& holder,
                                                 absl::Duration lease) {
    absl::MutexLock lock(&mu_);
    const int64_t until = NowMillis() + absl::ToInt64Milliseconds(lease);
    std::vector<std::string> stop;
    for (auto& [id, held] : streams_) {
      if (held.holder != holder) continue;
      held.until = until;
      if (held.stop) stop.push_back(id);
    }
    return stop;
  }

 private:
  struct Lease {
    std::string owner, upload_id, holder;
    int64_t until;
    bool stop;
  };
  absl::Mutex mu_;
  std::map<std::string, Lease> streams_ ABSL_GUARDED_BY(mu_);
};

template <typename Message>
absl::StatusOr<Message> Parse(const SqlValue& value, const std::string& what) {
  Message message;
  if (!message.ParseFromString(value.text)) {
    return absl::DataLossError(
        absl::StrCat("catalog row of ", what, " is corrupt"));
  }
  return message;
}

// The records in the first column of every row of `result`.
template <typename Message>
absl::StatusOr<std::vector<Message>> ParseRecords(const SqlResult& result,
                                                  const std::string& what) {
  std::vector<Message> messages;
  messages.reserve(result.rows.size());
  for (const SqlRow& row : result.rows) {
    AMALGAM_ASSIGN_OR_RETURN(Message message, Parse<Message>(row[0], what));
    messages.push_back(std::move(message));
  }
  return messages;
}

class SqlCatalog : public Catalog {
 public:
  explicit SqlCatalog(std::unique_ptr<SqlConnection> db) : db_(std::move(db)) {}

  absl::Status Migrate() {
    absl::MutexLock lock(&mu_);
    // 0: the tables as the first release made them (kept as they were, so
    // that existing catalogs read unchanged).
    const std::string bytes = db_->BytesType();
    const std::string order = db_->InsertionColumn();
    for (const std::string& sql :
         {absl::StrCat("CREATE TABLE IF NOT EXISTS artifacts (id TEXT "
                       "PRIMARY KEY, created_at BIGINT NOT NULL, record ",
                       bytes, " NOT NULL", order, ")"),
          absl::StrCat("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY "
                       "KEY, created_at BIGINT NOT NULL, record ",
                       bytes, " NOT NULL", order, ")"),
          absl::StrCat("CREATE TABLE IF NOT EXISTS uploads (owner TEXT NOT "
                       "NULL, id TEXT NOT NULL, updated_at BIGINT NOT NULL, "
                       "header ",
                       bytes,
                       " NOT NULL, artifact_id TEXT NOT NULL DEFAULT '', "
                       "PRIMARY KEY (owner, id))")}) {
      AMALGAM_RETURN_IF_ERROR(Run(sql).status());
    }
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(db_->TransactionLock(kMigrationLock));
      AMALGAM_ASSIGN_OR_RETURN(const int64_t version, db_->SchemaVersion());
      if (version >= 1) return absl::OkStatus();
      // 1: owner, content and size of each artifact as indexed columns, and
      // its grants as rows, so that lists, quotas and deletes read only the
      // rows they concern instead of parsing every record.
      for (const char* sql :
           {"ALTER TABLE artifacts ADD COLUMN owner TEXT NOT NULL "
            "DEFAULT ''",
            "ALTER TABLE artifacts ADD COLUMN sha256 TEXT NOT NULL "
            "DEFAULT ''",
            "ALTER TABLE artifacts ADD COLUMN size_bytes BIGINT NOT NULL "
            "DEFAULT 0",
            "CREATE TABLE shares (artifact_id TEXT NOT NULL, organization "
            "TEXT NOT NULL, PRIMARY KEY (organization, artifact_id))",
            "CREATE INDEX artifacts_by_owner ON artifacts (owner)",
            "CREATE INDEX artifacts_by_sha256 ON artifacts (sha256)",
            "CREATE INDEX shares_by_artifact ON shares (artifact_id)"}) {
        AMALGAM_RETURN_IF_ERROR(Run(sql).status());
      }
      AMALGAM_ASSIGN_OR_RETURN(SqlResult rows,
                               Run("SELECT record FROM artifacts"));
      AMALGAM_ASSIGN_OR_RETURN(std::vector<v1::Artifact> artifacts,
                               ParseRecords<v1::Artifact>(rows, "an artifact"));
      for (const v1::Artifact& artifact : artifacts) {
        AMALGAM_RETURN_IF_ERROR(WriteArtifactColumns(artifact));
      }
      return db_->SetSchemaVersion(1);
    }));
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(db_->TransactionLock(kMigrationLock));
      AMALGAM_ASSIGN_OR_RETURN(const int64_t version, db_->SchemaVersion());
      if (version >= 2) return absl::OkStatus();
      // 2: the job queue. A job's state, owner and run (runner, attempt,
      // lease, backoff, a requested cancel, the numeric configuration it
      // runs with) as columns, and the artifacts each job reads.
      for (const char* sql :
           {"ALTER TABLE jobs ADD COLUMN state BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE jobs ADD COLUMN runner TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE jobs ADD COLUMN attempt BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN lease_until BIGINT NOT NULL "
            "DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN not_before BIGINT NOT NULL "
            "DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN cancel_requested BIGINT NOT NULL "
            "DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN config TEXT NOT NULL DEFAULT ''",
            "CREATE INDEX jobs_by_state ON jobs (state, not_before)",
            "CREATE INDEX jobs_by_owner ON jobs (owner, state)",
            "CREATE TABLE job_inputs (artifact_id TEXT NOT NULL, job_id "
            "TEXT NOT NULL, PRIMARY KEY (artifact_id, job_id))"}) {
        AMALGAM_RETURN_IF_ERROR(Run(sql).status());
      }
      AMALGAM_ASSIGN_OR_RETURN(SqlResult rows, Run("SELECT record FROM jobs"));
      AMALGAM_ASSIGN_OR_RETURN(std::vector<v1::Job> jobs,
                               ParseRecords<v1::Job>(rows, "a job"));
      for (const v1::Job& job : jobs) {
        AMALGAM_RETURN_IF_ERROR(WriteJob(job, nullptr));
        if (!IsFinal(job.state())) {
          AMALGAM_RETURN_IF_ERROR(WriteInputs(job.id(), JobInputs(job)));
        }
      }
      return db_->SetSchemaVersion(2);
    }));
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(db_->TransactionLock(kMigrationLock));
      AMALGAM_ASSIGN_OR_RETURN(const int64_t version, db_->SchemaVersion());
      if (version >= 3) return absl::OkStatus();
      // 3: the housekeeping lease (one row).
      for (const char* sql :
           {"CREATE TABLE housekeeping (id BIGINT PRIMARY KEY, holder TEXT "
            "NOT NULL, lease_until BIGINT NOT NULL)",
            "INSERT INTO housekeeping (id, holder, lease_until) VALUES (1, "
            "'', 0)"}) {
        AMALGAM_RETURN_IF_ERROR(Run(sql).status());
      }
      return db_->SetSchemaVersion(3);
    }));
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(db_->TransactionLock(kMigrationLock));
      AMALGAM_ASSIGN_OR_RETURN(const int64_t version, db_->SchemaVersion());
      if (version >= 4) return absl::OkStatus();
      // 4: the contents (blobs) of each artifact as rows, since a model
      // directory has several; until now each artifact had one.
      for (const char* sql :
           {"CREATE TABLE artifact_contents (artifact_id TEXT NOT NULL, "
            "sha256 TEXT NOT NULL, size_bytes BIGINT NOT NULL, PRIMARY KEY "
            "(artifact_id, sha256))",
            "CREATE INDEX artifact_contents_by_sha256 ON artifact_contents "
            "(sha256)",
            "INSERT INTO artifact_contents (artifact_id, sha256, size_bytes) "
            "SELECT id, sha256, size_bytes FROM artifacts"}) {
        AMALGAM_RETURN_IF_ERROR(Run(sql).status());
      }
      return db_->SetSchemaVersion(4);
    }));
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(db_->TransactionLock(kMigrationLock));
      AMALGAM_ASSIGN_OR_RETURN(const int64_t version, db_->SchemaVersion());
      if (version >= 5) return absl::OkStatus();
      // 5: the tasks of running jobs (a shard of an output model each), and
      // the blob each one wrote.
      for (const char* sql :
           {"CREATE TABLE job_tasks (job_id TEXT NOT NULL, task BIGINT NOT "
            "NULL, created_at BIGINT NOT NULL, runner TEXT NOT NULL DEFAULT "
            "'', attempt BIGINT NOT NULL DEFAULT 0, lease_until BIGINT NOT "
            "NULL DEFAULT 0, tensors_done BIGINT NOT NULL DEFAULT 0, "
            "bytes_done BIGINT NOT NULL DEFAULT 0, done BIGINT NOT NULL "
            "DEFAULT 0, sha256 TEXT NOT NULL DEFAULT '', size_bytes BIGINT "
            "NOT NULL DEFAULT 0, error_code BIGINT NOT NULL DEFAULT 0, "
            "error_message TEXT NOT NULL DEFAULT '', stops BIGINT NOT NULL "
            "DEFAULT 0, layout TEXT NOT NULL DEFAULT '', PRIMARY KEY "
            "(job_id, task))",
            "CREATE INDEX job_tasks_by_sha256 ON job_tasks (sha256)"}) {
        AMALGAM_RETURN_IF_ERROR(Run(sql).status());
      }
      return db_->SetSchemaVersion(5);
    }));
    // The leases of open upload streams, shared by the processes on the
    // catalog: not versioned, since nothing in them outlives the streams
    // (and not crash-safe: UNLOGGED). Where one process owns the database,
    // they stay in its memory (`local_streams_`).
    if (!db_->Shared()) return absl::OkStatus();
    return InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(db_->TransactionLock(kMigrationLock));
      for (const char* sql :
           {"CREATE UNLOGGED TABLE IF NOT EXISTS upload_streams (id TEXT "
            "PRIMARY KEY, owner TEXT NOT NULL, upload_id TEXT NOT NULL, "
            "holder TEXT NOT NULL, lease_until BIGINT NOT NULL, stop BIGINT "
            "NOT NULL DEFAULT 0)",
            "CREATE INDEX IF NOT EXISTS upload_streams_by_owner ON "
            "upload_streams (owner, upload_id)",
            "CREATE INDEX IF NOT EXISTS upload_streams_by_holder ON "
            "upload_streams (holder)"}) {
        AMALGAM_RETURN_IF_ERROR(Run(sql).status());
      }
      return absl::OkStatus();
    });
  }

  absl::Status Ping() override {
    absl::MutexLock lock(&mu_);
    return Run("SELECT 1").status();
  }

  absl::Status InsertArtifact(v1::Artifact* artifact,
                              const PlaceContent& place) override {
    absl::MutexLock lock(&mu_);
    return InTransaction([&] { return InsertArtifactLocked(artifact, place); });
  }

  absl::StatusOr<v1::Artifact> GetArtifact(const std::string& id) override {
    absl::MutexLock lock(&mu_);
    return ReadArtifact(id, "");
  }

  absl::StatusOr<v1::Artifact> GetSettledArtifact(
      const std::string& id) override {
    absl::MutexLock lock(&mu_);
    v1::Artifact artifact;
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_ASSIGN_OR_RETURN(artifact, ReadArtifact(id, db_->ForShare()));
      return absl::OkStatus();
    }));
    return artifact;
  }

  absl::StatusOr<std::vector<v1::Artifact>> ListArtifacts(
      const std::string& organization) override {
    absl::MutexLock lock(&mu_);
    const std::string order =
        absl::StrCat(" ORDER BY created_at, ", db_->InsertionOrder());
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result,
        organization.empty()
            ? Run("SELECT record FROM artifacts" + order)
            : Run("SELECT record FROM artifacts WHERE owner = ?1 OR id IN "
                  "(SELECT artifact_id FROM shares WHERE organization = ?1)" +
                      order,
                  {SqlValue::Text(organization)}));
    return ParseRecords<v1::Artifact>(result, "an artifact");
  }

  absl::StatusOr<std::pair<int64_t, int64_t>> Stats() override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(const int64_t count,
                             QueryInt("SELECT COUNT(*) FROM artifacts", {}));
    AMALGAM_ASSIGN_OR_RETURN(
        const int64_t bytes,
        QueryInt("SELECT COALESCE(SUM(size), 0) FROM (SELECT MAX(size_bytes) "
                 "AS size FROM artifact_contents GROUP BY sha256) AS contents",
                 {}));
    return std::make_pair(count, bytes);
  }

  absl::StatusOr<v1::Artifact> ModifyArtifact(
      const std::string& id,
      const std::function<absl::Status(v1::Artifact&)>& change) override {
    absl::MutexLock lock(&mu_);
    v1::Artifact artifact;
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_ASSIGN_OR_RETURN(artifact, ReadArtifact(id, db_->ForUpdate()));
      AMALGAM_RETURN_IF_ERROR(change(artifact));
      // An update, never an insert: a row deleted meanwhile stays deleted.
      AMALGAM_ASSIGN_OR_RETURN(
          SqlResult updated,
          Run("UPDATE artifacts SET record = ?2 WHERE id = ?1",
              {SqlValue::Text(id),
               SqlValue::Bytes(artifact.SerializeAsString())}));
      if (updated.changed == 0) return NotFound(id);
      return WriteArtifactColumns(artifact);
    }));
    return artifact;
  }

  absl::Status DeleteArtifact(
      const v1::Artifact& artifact,
      const std::function<absl::Status(const std::vector<std::string>&)>&
          remove_content) override {
    absl::MutexLock lock(&mu_);
    const SqlValue id = SqlValue::Text(artifact.id());
    return InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(ContentLocks({artifact}));
      AMALGAM_ASSIGN_OR_RETURN(v1::Artifact current,
                               ReadArtifact(artifact.id(), db_->ForUpdate()));
      AMALGAM_ASSIGN_OR_RETURN(
          SqlResult readers,
          Run("SELECT j.id, j.owner FROM job_inputs i JOIN jobs j ON j.id = "
              "i.job_id WHERE i.artifact_id = ?1 AND j.state IN (?2, ?3) "
              "ORDER BY j.created_at",
              {id, SqlValue::Int(kQueued), SqlValue::Int(kRunning)}));
      for (const SqlRow& row : readers.rows) {
        const std::string& job = row[0].text;
        const std::string& owner = row[1].text;
        const bool own = owner == current.owner();
        // A job of an organisation the artifact is no longer shared with
        // does not hold it: it fails when it starts (its inputs are opened
        // again).
        if (!own && std::find(current.shared_with().begin(),
                              current.shared_with().end(),
                              owner) == current.shared_with().end()) {
          continue;
        }
        // Another organisation's job ids are not the owner's to see.
        return absl::FailedPreconditionError(absl::StrCat(
            "artifact ", current.id(), " is an input of ",
            own ? absl::StrCat("queued or running job ", job)
                : "a queued or running job of an organisation it is shared "
                  "with; revoke the share to delete it anyway"));
      }
      std::vector<std::string> sole;
      for (const std::string& sha256 : Contents(current)) {
        AMALGAM_ASSIGN_OR_RETURN(
            const int64_t others,
            QueryInt("SELECT (SELECT COUNT(*) FROM artifact_contents WHERE "
                     "sha256 = ?1 AND artifact_id != ?2) + (SELECT COUNT(*) "
                     "FROM job_tasks WHERE sha256 = ?1)",
                     {SqlValue::Text(sha256), id}));
        if (others == 0) sole.push_back(sha256);
      }
      AMALGAM_RETURN_IF_ERROR(remove_content(sole));
      for (const char* sql :
           {"DELETE FROM shares WHERE artifact_id = ?1",
            "DELETE FROM artifact_contents WHERE artifact_id = ?1",
            "DELETE FROM artifacts WHERE id = ?1"}) {
        AMALGAM_RETURN_IF_ERROR(Run(sql, {id}).status());
      }
      return absl::OkStatus();
    });
  }

  absl::StatusOr<int64_t> OrgBytes(const std::string& owner,
                                   const std::string& except_upload) override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(
        int64_t bytes,
        QueryInt("SELECT COALESCE(SUM(size), 0) FROM (SELECT "
                 "MAX(c.size_bytes) AS size FROM artifact_contents c JOIN "
                 "artifacts a ON a.id = c.artifact_id WHERE a.owner = ?1 "
                 "GROUP BY c.sha256) AS contents",
                 {SqlValue::Text(owner)}));
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult uploads,
        Run("SELECT id, header FROM uploads WHERE owner = ?1 AND "
            "artifact_id = ''",
            {SqlValue::Text(owner)}));
    for (const SqlRow& row : uploads.rows) {
      v1::UploadHeader header;
      if (row[0].text != except_upload && header.ParseFromString(row[1].text)) {
        bytes += header.size_bytes();
      }
    }
    return bytes;
  }

  absl::StatusOr<v1::Job> PublishResults(v1::Job job,
                                         std::vector<v1::Artifact>* results,
                                         const PlaceContent& place) override {
    absl::MutexLock lock(&mu_);
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(ContentLocks(*results));
      job.clear_result_ids();
      for (v1::Artifact& artifact : *results) {
        AMALGAM_RETURN_IF_ERROR(InsertArtifactLocked(&artifact, place));
        job.add_result_ids(artifact.id());
      }
      return WriteRun(job);
    }));
    return job;
  }

  absl::StatusOr<bool> RemoveUnreferencedContent(
      const std::string& sha256,
      const std::function<absl::Status()>& remove) override {
    absl::MutexLock lock(&mu_);
    bool removed = false;
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(ContentLock(sha256));
      AMALGAM_ASSIGN_OR_RETURN(
          const int64_t references,
          QueryInt("SELECT (SELECT COUNT(*) FROM artifact_contents WHERE "
                   "sha256 = ?1) + (SELECT COUNT(*) FROM job_tasks WHERE "
                   "sha256 = ?1)",
                   {SqlValue::Text(sha256)}));
      if (references > 0) return absl::OkStatus();
      AMALGAM_RETURN_IF_ERROR(remove());
      removed = true;
      return absl::OkStatus();
    }));
    return removed;
  }

  absl::Status OpenStream(const std::string& stream, const std::string& owner,
                          const std::string& upload_id,
                          const std::string& holder, absl::Duration lease,
                          int max_per_org) override {
    if (!shared_) {
      return local_streams_.Open(stream, owner, upload_id, holder, lease,
                                 max_per_org);
    }
    absl::MutexLock lock(&mu_);
    const int64_t now = NowMillis();
    const SqlValue org = SqlValue::Text(owner);
    std::optional<SqlRow> taken;  // (holder, lease_until) of another stream
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(db_->TransactionLock(kStreamLock));
      AMALGAM_RETURN_IF_ERROR(
          Run("DELETE FROM upload_streams WHERE lease_until < ?1",
              {SqlValue::Int(now)})
              .status());
      if (!upload_id.empty()) {
        AMALGAM_ASSIGN_OR_RETURN(
            SqlResult other,
            Run("SELECT holder, lease_until FROM upload_streams WHERE owner = "
                "?1 AND upload_id = ?2",
                {org, SqlValue::Text(upload_id)}));
        if (!other.rows.empty()) {
          taken = other.rows[0];
          // Committed, so that the other stream's holder sees the request.
          return Run("UPDATE upload_streams SET stop = 1 WHERE owner = ?1 AND "
                     "upload_id = ?2",
                     {org, SqlValue::Text(upload_id)})
              .status();
        }
      }
      AMALGAM_ASSIGN_OR_RETURN(
          const int64_t open,
          QueryInt("SELECT COUNT(*) FROM upload_streams WHERE owner = ?1",
                   {org}));
      if (open >= max_per_org) return TooManyStreams(owner, open);
      return Run("INSERT INTO upload_streams (id, owner, upload_id, holder, "
                 "lease_until) VALUES (?1, ?2, ?3, ?4, ?5)",
                 {SqlValue::Text(stream), org, SqlValue::Text(upload_id),
                  SqlValue::Text(holder),
                  SqlValue::Int(now + absl::ToInt64Milliseconds(lease))})
          .status();
    }));
    if (taken.has_value()) {
      return StreamTaken(upload_id, (*taken)[0].text, (*taken)[1].number - now);
    }
    return absl::OkStatus();
  }

  absl::Status CloseStream(const std::string& stream) override {
    if (!shared_) return local_streams_.Close(stream);
    absl::MutexLock lock(&mu_);
    return Run("DELETE FROM upload_streams WHERE id = ?1",
               {SqlValue::Text(stream)})
        .status();
  }

  absl::Status CloseStreamsOf(const std::string& holder) override {
    if (!shared_) return local_streams_.CloseAllOf(holder);
    absl::MutexLock lock(&mu_);
    return Run("DELETE FROM upload_streams WHERE holder = ?1",
               {SqlValue::Text(holder)})
        .status();
  }

  absl::StatusOr<std::vector<std::string>> RenewStreams(
      const std::string& holder, absl::Duration lease) override {
    if (!shared_) return local_streams_.Renew(holder, lease);
    absl::MutexLock lock(&mu_);
    const SqlValue by = SqlValue::Text(holder);
    AMALGAM_RETURN_IF_ERROR(
        Run("UPDATE upload_streams SET lease_until = ?2 WHERE holder = ?1",
            {by, SqlValue::Int(NowMillis() + absl::ToInt64Milliseconds(lease))})
            .status());
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult asked,
        Run("SELECT id FROM upload_streams WHERE holder = ?1 AND stop = 1",
            {by}));
    std::vector<std::string> stop;
    for (const SqlRow& row : asked.rows) stop.push_back(row[0].text);
    return stop;
  }

  absl::StatusOr<bool> TryHousekeeping(const std::string& holder,
                                       absl::Duration lease) override {
    absl::MutexLock lock(&mu_);
    const int64_t now = NowMillis();
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult taken,
        Run("UPDATE housekeeping SET holder = ?1, lease_until = ?2 WHERE id "
            "= 1 AND (holder = ?1 OR lease_until < ?3)",
            {SqlValue::Text(holder),
             SqlValue::Int(now + absl::ToInt64Milliseconds(lease)),
             SqlValue::Int(now)}));
    return taken.changed > 0;
  }

  absl::StatusOr<UploadRow> FindUpload(const std::string& owner,
                                       const std::string& upload_id) override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result,
        Run("SELECT header, artifact_id FROM uploads WHERE owner = ?1 AND "
            "id = ?2",
            {SqlValue::Text(owner), SqlValue::Text(upload_id)}));
    if (result.rows.empty()) {
      return absl::NotFoundError(
          absl::StrCat("upload ", upload_id,
                       " not found (never started, finished or "
                       "expired)"));
    }
    UploadRow row;
    AMALGAM_ASSIGN_OR_RETURN(
        row.header,
        Parse<v1::UploadHeader>(result.rows[0][0], "upload " + upload_id));
    row.artifact_id = result.rows[0][1].text;
    return row;
  }

  absl::Status PutUpload(const std::string& owner,
                         const v1::UploadHeader& header) override {
    absl::MutexLock lock(&mu_);
    return Run("INSERT INTO uploads (owner, id, updated_at, header) VALUES "
               "(?1, ?2, ?3, ?4) ON CONFLICT (owner, id) DO UPDATE SET "
               "updated_at = excluded.updated_at, header = excluded.header, "
               "artifact_id = ''",
               {SqlValue::Text(owner), SqlValue::Text(header.upload_id()),
                SqlValue::Int(Now()),
                SqlValue::Bytes(header.SerializeAsString())})
        .status();
  }

  absl::Status CompleteUpload(const std::string& owner,
                              const std::string& upload_id,
                              const std::string& artifact_id) override {
    absl::MutexLock lock(&mu_);
    return Run("UPDATE uploads SET artifact_id = ?3, updated_at = ?4 WHERE "
               "owner = ?1 AND id = ?2",
               {SqlValue::Text(owner), SqlValue::Text(upload_id),
                SqlValue::Text(artifact_id), SqlValue::Int(Now())})
        .status();
  }

  absl::Status TouchUpload(const std::string& owner,
                           const std::string& upload_id) override {
    absl::MutexLock lock(&mu_);
    return Run("UPDATE uploads SET updated_at = ?3 WHERE owner = ?1 AND id = "
               "?2",
               {SqlValue::Text(owner), SqlValue::Text(upload_id),
                SqlValue::Int(Now())})
        .status();
  }

  absl::Status DeleteUpload(const std::string& owner,
                            const std::string& upload_id) override {
    absl::MutexLock lock(&mu_);
    return Run("DELETE FROM uploads WHERE owner = ?1 AND id = ?2",
               {SqlValue::Text(owner), SqlValue::Text(upload_id)})
        .status();
  }

  absl::StatusOr<bool> UploadIsStale(const std::string& owner,
                                     const std::string& upload_id,
                                     int64_t cutoff_unix_seconds) override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result,
        Run("SELECT 1 FROM uploads WHERE owner = ?1 AND id = ?2 AND "
            "updated_at < ?3",
            {SqlValue::Text(owner), SqlValue::Text(upload_id),
             SqlValue::Int(cutoff_unix_seconds)}));
    return !result.rows.empty();
  }

  absl::StatusOr<std::vector<UploadKey>> StaleUploads(
      int64_t cutoff_unix_seconds) override {
    absl::MutexLock lock(&mu_);
    return Keys(Run("SELECT owner, id FROM uploads WHERE updated_at < ?1",
                    {SqlValue::Int(cutoff_unix_seconds)}));
  }

  absl::StatusOr<std::vector<UploadKey>> UnfinishedUploads() override {
    absl::MutexLock lock(&mu_);
    return Keys(
        Run("SELECT owner, id FROM uploads WHERE artifact_id = ''", {}));
  }

  absl::Status SubmitJob(const v1::Job& job,
                         const std::vector<std::string>& inputs,
                         const JobLimits& limits) override {
    absl::MutexLock lock(&mu_);
    return InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(db_->TransactionLock(kSubmitLock));
      // An input deleted since the job was validated: see DeleteArtifact,
      // which holds the row until it is gone.
      for (const std::string& input : inputs) {
        AMALGAM_ASSIGN_OR_RETURN(
            SqlResult found,
            Run(absl::StrCat("SELECT 1 FROM artifacts WHERE id = ?1",
                             db_->ForShare()),
                {SqlValue::Text(input)}));
        if (found.rows.empty()) return NotFound(input);
      }
      AMALGAM_ASSIGN_OR_RETURN(
          const int64_t queued,
          QueryInt("SELECT COUNT(*) FROM jobs WHERE state = ?1",
                   {SqlValue::Int(kQueued)}));
      if (queued >= limits.max_queued) {
        return absl::ResourceExhaustedError(
            absl::StrCat("the job queue is full (", limits.max_queued,
                         " jobs); retry later"));
      }
      AMALGAM_ASSIGN_OR_RETURN(
          const int64_t active,
          QueryInt("SELECT COUNT(*) FROM jobs WHERE owner = ?1 AND state IN "
                   "(?2, ?3)",
                   {SqlValue::Text(job.owner()), SqlValue::Int(kQueued),
                    SqlValue::Int(kRunning)}));
      if (active >= limits.max_active_per_org) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "organisation ", job.owner(), " has ", active,
            " queued or running jobs (the limit); retry when one finishes"));
      }
      AMALGAM_RETURN_IF_ERROR(InsertRecord("jobs", job.id(), job));
      AMALGAM_RETURN_IF_ERROR(WriteJob(job, nullptr));
      return WriteInputs(job.id(), inputs);
    });
  }

  absl::StatusOr<std::optional<v1::Job>> ClaimJob(const std::string& runner,
                                                  const std::string& config,
                                                  absl::Duration lease,
                                                  int max_attempts) override {
    absl::MutexLock lock(&mu_);
    const int64_t now = NowMillis();
    const int64_t lease_ms = absl::ToInt64Milliseconds(lease);
    const std::string claimable =
        "FROM jobs WHERE state IN (?1, ?2) AND not_before <= ?3 AND (state = "
        "?1 OR lease_until < ?3) AND (config = '' OR config = ?4)";
    const std::vector<SqlValue> params = {
        SqlValue::Int(kQueued), SqlValue::Int(kRunning), SqlValue::Int(now),
        SqlValue::Text(config)};
    // A read first, outside any transaction: idle workers poll often, and
    // on SQLite a transaction would take the write lock each time.
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult any,
        Run(absl::StrCat("SELECT 1 ", claimable, " LIMIT 1"), params));
    std::optional<v1::Job> claimed;
    if (any.rows.empty()) return claimed;
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      while (true) {
        AMALGAM_ASSIGN_OR_RETURN(
            SqlResult found,
            Run(absl::StrCat("SELECT record, attempt, state, cancel_requested ",
                             claimable, " ORDER BY created_at, ",
                             db_->InsertionOrder(), " LIMIT 1",
                             db_->SkipLocked()),
                params));
        if (found.rows.empty()) return absl::OkStatus();
        const SqlRow& row = found.rows[0];
        AMALGAM_ASSIGN_OR_RETURN(v1::Job job, Parse<v1::Job>(row[0], "a job"));
        const int64_t attempt = row[1].number;
        const bool expired = row[2].number == kRunning;
        if (row[3].number != 0 || (expired && attempt >= max_attempts)) {
          // Cancelled while its runner was gone, or its runners stopped too
          // often: it ends here.
          job.set_finished_at(Now());
          if (row[3].number != 0) {
            job.set_state(v1::JOB_STATE_CANCELLED);
          } else {
            job.set_state(v1::JOB_STATE_FAILED);
            job.set_error_code(static_cast<int>(absl::StatusCode::kAborted));
            job.set_error_message(absl::StrCat(
                "the job's runner stopped (killed, or cut off from the "
                "catalog) in each of ",
                attempt, " attempts; it is not tried again (--max-attempts)"));
          }
          AMALGAM_RETURN_IF_ERROR(WriteJob(job, nullptr));
          continue;
        }
        job.set_state(v1::JOB_STATE_RUNNING);
        job.set_started_at(Now());
        job.set_runner(runner);
        job.set_attempt(attempt + 1);
        job.set_error_code(0);
        job.clear_error_message();
        job.mutable_progress()->set_tensors_done(0);
        job.mutable_progress()->set_bytes_done(0);
        AMALGAM_RETURN_IF_ERROR(WriteJob(job, nullptr));
        AMALGAM_RETURN_IF_ERROR(
            Run("UPDATE jobs SET lease_until = ?2, not_before = ?3, config = "
                "?4 WHERE id = ?1",
                {SqlValue::Text(job.id()), SqlValue::Int(now + lease_ms),
                 SqlValue::Int(now + lease_ms + BackoffMillis(attempt + 1)),
                 SqlValue::Text(config)})
                .status());
        claimed = std::move(job);
        return absl::OkStatus();
      }
    }));
    return claimed;
  }

  absl::StatusOr<bool> RenewLease(const v1::Job& job,
                                  absl::Duration lease) override {
    absl::MutexLock lock(&mu_);
    const int64_t until = NowMillis() + absl::ToInt64Milliseconds(lease);
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult renewed,
        Run("UPDATE jobs SET lease_until = ?3, not_before = ?4 WHERE id = ?1 "
            "AND attempt = ?2 AND state = ?5",
            {SqlValue::Text(job.id()), SqlValue::Int(job.attempt()),
             SqlValue::Int(until),
             SqlValue::Int(until + BackoffMillis(job.attempt())),
             SqlValue::Int(kRunning)}));
    if (renewed.changed == 0) return LostRun(job);
    AMALGAM_ASSIGN_OR_RETURN(
        const int64_t cancel,
        QueryInt("SELECT cancel_requested FROM jobs WHERE id = ?1",
                 {SqlValue::Text(job.id())}));
    return cancel != 0;
  }

  absl::Status UpdateRun(const v1::Job& job) override {
    absl::MutexLock lock(&mu_);
    return InTransaction([&] { return WriteRun(job); });
  }

  absl::Status ReleaseRun(const v1::Job& job) override {
    absl::MutexLock lock(&mu_);
    v1::Job queued = job;
    return InTransaction([&] { return Requeue(&queued, /*fenced=*/true); });
  }

  absl::StatusOr<v1::Job> CancelJob(const std::string& id,
                                    const std::string& owner) override {
    absl::MutexLock lock(&mu_);
    v1::Job job;
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_ASSIGN_OR_RETURN(job, ReadJob(id, db_->ForUpdate()));
      if (job.owner() != owner) return JobNotFound(id);
      if (job.state() == v1::JOB_STATE_QUEUED) {
        job.set_state(v1::JOB_STATE_CANCELLED);
        job.set_finished_at(Now());
        return WriteJob(job, nullptr);
      }
      if (job.state() != v1::JOB_STATE_RUNNING) return absl::OkStatus();
      return Run("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1",
                 {SqlValue::Text(id)})
          .status();
    }));
    return job;
  }

  absl::StatusOr<std::vector<v1::Job>> RequeueRunsOf(const std::string& runner,
                                                     bool every) override {
    absl::MutexLock lock(&mu_);
    std::vector<v1::Job> requeued;
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_ASSIGN_OR_RETURN(
          SqlResult rows,
          Run("SELECT record FROM jobs WHERE state = ?1 AND (runner = ?2 OR "
              "?3 = 1)",
              {SqlValue::Int(kRunning), SqlValue::Text(runner),
               SqlValue::Int(every ? 1 : 0)}));
      AMALGAM_ASSIGN_OR_RETURN(requeued, ParseRecords<v1::Job>(rows, "a job"));
      for (v1::Job& job : requeued) {
        AMALGAM_RETURN_IF_ERROR(Requeue(&job, /*fenced=*/false));
      }
      return Run("UPDATE job_tasks SET runner = '', lease_until = 0 WHERE "
                 "done = 0 AND (runner = ?1 OR ?2 = 1)",
                 {SqlValue::Text(runner), SqlValue::Int(every ? 1 : 0)})
          .status();
    }));
    return requeued;
  }

  absl::Status AddTasks(const v1::Job& job, int count,
                        const std::string& layout) override {
    absl::MutexLock lock(&mu_);
    return InTransaction([&]() -> absl::Status {
      AMALGAM_ASSIGN_OR_RETURN(
          SqlResult held,
          Run(absl::StrCat("SELECT 1 FROM jobs WHERE id = ?1 AND attempt = ?2 "
                           "AND state = ?3",
                           db_->ForShare()),
              {SqlValue::Text(job.id()), SqlValue::Int(job.attempt()),
               SqlValue::Int(kRunning)}));
      if (held.rows.empty()) return LostRun(job);
      AMALGAM_RETURN_IF_ERROR(
          Run("DELETE FROM job_tasks WHERE job_id = ?1 AND layout != ?2",
              {SqlValue::Text(job.id()), SqlValue::Text(layout)})
              .status());
      const int64_t now = NowMillis();
      for (int task = 0; task < count; ++task) {
        AMALGAM_RETURN_IF_ERROR(
            Run("INSERT INTO job_tasks (job_id, task, created_at, layout) "
                "VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                {SqlValue::Text(job.id()), SqlValue::Int(task),
                 SqlValue::Int(now), SqlValue::Text(layout)})
                .status());
      }
      return Notify(job.id());
    });
  }

  absl::StatusOr<std::optional<JobTask>> ClaimTask(const std::string& runner,
                                                   const std::string& config,
                                                   const std::string& job_id,
                                                   absl::Duration lease,
                                                   int max_attempts,
                                                   v1::Job* job) override {
    absl::MutexLock lock(&mu_);
    const int64_t now = NowMillis();
    std::string claimable =
        "FROM job_tasks WHERE done = 0 AND lease_until < ?1 AND stops + "
        "(CASE WHEN runner = '' THEN 0 ELSE 1 END) < ?2 AND job_id IN "
        "(SELECT id FROM jobs WHERE state = ?3 AND cancel_requested = 0 AND "
        "config = ?4) AND NOT EXISTS (SELECT 1 FROM job_tasks f WHERE "
        "f.job_id = job_tasks.job_id AND f.error_code != 0)";
    std::vector<SqlValue> params = {
        SqlValue::Int(now), SqlValue::Int(max_attempts),
        SqlValue::Int(kRunning), SqlValue::Text(config)};
    if (!job_id.empty()) {
      claimable += " AND job_id = ?5";
      params.push_back(SqlValue::Text(job_id));
    }
    // A read first, outside any transaction (as ClaimJob).
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult any,
        Run(absl::StrCat("SELECT 1 ", claimable, " LIMIT 1"), params));
    std::optional<JobTask> claimed;
    if (any.rows.empty()) return claimed;
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_ASSIGN_OR_RETURN(
          SqlResult found,
          Run(absl::StrCat("SELECT job_id, task, attempt ", claimable,
                           " ORDER BY created_at, job_id, task LIMIT 1",
                           db_->SkipLocked()),
              params));
      if (found.rows.empty()) return absl::OkStatus();
      JobTask task;
      task.job_id = found.rows[0][0].text;
      task.task = static_cast<int>(found.rows[0][1].number);
      task.attempt = static_cast<int>(found.rows[0][2].number) + 1;
      task.runner = runner;
      task.lease_until_ms = now + absl::ToInt64Milliseconds(lease);
      AMALGAM_RETURN_IF_ERROR(
          Run("UPDATE job_tasks SET stops = stops + (CASE WHEN runner = '' "
              "THEN 0 ELSE 1 END), runner = ?3, attempt = ?4, lease_until = "
              "?5, tensors_done = 0, bytes_done = 0 WHERE job_id = ?1 AND "
              "task = ?2",
              {SqlValue::Text(task.job_id), SqlValue::Int(task.task),
               SqlValue::Text(runner), SqlValue::Int(task.attempt),
               SqlValue::Int(task.lease_until_ms)})
              .status());
      AMALGAM_ASSIGN_OR_RETURN(*job, ReadJob(task.job_id, ""));
      claimed = std::move(task);
      return absl::OkStatus();
    }));
    return claimed;
  }

  absl::StatusOr<bool> RenewTask(const JobTask& task,
                                 absl::Duration lease) override {
    absl::MutexLock lock(&mu_);
    AMALGAM_RETURN_IF_ERROR(WriteTask(
        task, "lease_until = ?5",
        {SqlValue::Int(NowMillis() + absl::ToInt64Milliseconds(lease))}));
    AMALGAM_ASSIGN_OR_RETURN(
        const int64_t stop,
        QueryInt("SELECT (SELECT COALESCE(MAX(cancel_requested), 0) FROM jobs "
                 "WHERE id = ?1) + (SELECT COUNT(*) FROM job_tasks WHERE "
                 "job_id = ?1 AND error_code != 0)",
                 {SqlValue::Text(task.job_id)}));
    return stop != 0;
  }

  absl::Status UpdateTask(const JobTask& task) override {
    absl::MutexLock lock(&mu_);
    return InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(WriteTask(
          task,
          "tensors_done = ?5, bytes_done = ?6, error_code = ?7, error_message "
          "= ?8",
          {SqlValue::Int(task.tensors_done), SqlValue::Int(task.bytes_done),
           SqlValue::Int(task.error_code),
           SqlValue::Text(task.error_message)}));
      return task.error_code != 0 ? Notify(task.job_id) : absl::OkStatus();
    });
  }

  absl::Status CompleteTask(
      const JobTask& task,
      const std::function<absl::Status()>& place) override {
    absl::MutexLock lock(&mu_);
    return InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(ContentLock(task.sha256));
      AMALGAM_RETURN_IF_ERROR(place());
      AMALGAM_RETURN_IF_ERROR(WriteTask(
          task,
          "done = 1, sha256 = ?5, size_bytes = ?6, tensors_done = ?7, "
          "bytes_done = ?8",
          {SqlValue::Text(task.sha256), SqlValue::Int(task.size_bytes),
           SqlValue::Int(task.tensors_done), SqlValue::Int(task.bytes_done)}));
      return Notify(task.job_id);
    });
  }

  absl::Status ReleaseTask(const JobTask& task) override {
    absl::MutexLock lock(&mu_);
    return WriteTask(task, "runner = '', lease_until = 0", {});
  }

  absl::StatusOr<std::vector<JobTask>> ListTasks(
      const std::string& job_id) override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult rows,
        Run("SELECT task, runner, attempt, lease_until, tensors_done, "
            "bytes_done, done, sha256, size_bytes, error_code, error_message, "
            "stops FROM job_tasks WHERE job_id = ?1 ORDER BY task",
            {SqlValue::Text(job_id)}));
    std::vector<JobTask> tasks;
    for (const SqlRow& row : rows.rows) {
      JobTask task;
      task.job_id = job_id;
      task.task = static_cast<int>(row[0].number);
      task.runner = row[1].text;
      task.attempt = static_cast<int>(row[2].number);
      task.lease_until_ms = row[3].number;
      task.tensors_done = row[4].number;
      task.bytes_done = row[5].number;
      task.done = row[6].number != 0;
      task.sha256 = row[7].text;
      task.size_bytes = row[8].number;
      task.error_code = static_cast<int>(row[9].number);
      task.error_message = row[10].text;
      task.stops = static_cast<int>(row[11].number);
      tasks.push_back(std::move(task));
    }
    return tasks;
  }

  absl::Status FailJob(const v1::Job& job) override {
    absl::MutexLock lock(&mu_);
    return InTransaction([&] { return WriteJob(job, nullptr); });
  }

  absl::StatusOr<v1::Job> GetJob(const std::string& id) override {
    absl::MutexLock lock(&mu_);
    return ReadJob(id, "");
  }

  absl::StatusOr<std::vector<v1::Job>> ListJobs(
      const std::string& owner) override {
    absl::MutexLock lock(&mu_);
    const std::string order =
        absl::StrCat(" ORDER BY created_at, ", db_->InsertionOrder());
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result,
        owner.empty() ? Run("SELECT record FROM jobs" + order)
                      : Run("SELECT record FROM jobs WHERE owner = ?1" + order,
                            {SqlValue::Text(owner)}));
    return ParseRecords<v1::Job>(result, "a job");
  }

  absl::StatusOr<std::pair<int64_t, int64_t>> JobCounts() override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result,
        Run("SELECT state, COUNT(*) FROM jobs WHERE state IN (?1, ?2) GROUP "
            "BY state",
            {SqlValue::Int(kQueued), SqlValue::Int(kRunning)}));
    std::pair<int64_t, int64_t> counts{0, 0};
    for (const SqlRow& row : result.rows) {
      (row[0].number == kQueued ? counts.first : counts.second) = row[1].number;
    }
    return counts;
  }

  absl::StatusOr<int64_t> PendingOutputBytes(
      const std::string& owner) override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result,
        Run("SELECT record FROM jobs WHERE owner = ?1 AND state IN (?2, ?3)",
            {SqlValue::Text(owner), SqlValue::Int(kQueued),
             SqlValue::Int(kRunning)}));
    AMALGAM_ASSIGN_OR_RETURN(std::vector<v1::Job> jobs,
                             ParseRecords<v1::Job>(result, "a job"));
    int64_t bytes = 0;
    for (const v1::Job& job : jobs) bytes += job.progress().bytes_total();
    return bytes;
  }

 private:
  static absl::Status NotFound(const std::string& id) {
    return absl::NotFoundError(absl::StrCat("artifact ", id, " not found"));
  }
  static absl::Status JobNotFound(const std::string& id) {
    return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  }

  absl::StatusOr<v1::Job> ReadJob(const std::string& id,
                                  const std::string& lock)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    AMALGAM_ASSIGN_OR_RETURN(SqlResult result,
                             Run("SELECT record FROM jobs WHERE id = ?1" + lock,
                                 {SqlValue::Text(id)}));
    if (result.rows.empty()) return JobNotFound(id);
    return Parse<v1::Job>(result.rows[0][0], id);
  }

  // Writes the job's record and columns; with `fence`, only if the run
  // job.attempt() still holds it (RUNNING): else `*fence` is set false.
  // A job that ended no longer holds its inputs.
  absl::Status WriteJob(const v1::Job& job, bool* fence)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::string sql =
        "UPDATE jobs SET record = ?2, state = ?3, owner = ?4, runner = ?5, "
        "attempt = ?6 WHERE id = ?1";
    std::vector<SqlValue> params = {
        SqlValue::Text(job.id()),     SqlValue::Bytes(job.SerializeAsString()),
        SqlValue::Int(job.state()),   SqlValue::Text(job.owner()),
        SqlValue::Text(job.runner()), SqlValue::Int(job.attempt())};
    if (fence != nullptr) {
      sql += " AND attempt = ?6 AND state = ?7";
      params.push_back(SqlValue::Int(kRunning));
    }
    AMALGAM_ASSIGN_OR_RETURN(SqlResult written, Run(sql, params));
    if (fence != nullptr) *fence = written.changed > 0;
    if (written.changed > 0) AMALGAM_RETURN_IF_ERROR(Notify(job.id()));
    if (IsFinal(job.state()) && (fence == nullptr || *fence)) {
      for (const char* sql : {"DELETE FROM job_inputs WHERE job_id = ?1",
                              "DELETE FROM job_tasks WHERE job_id = ?1"}) {
        AMALGAM_RETURN_IF_ERROR(Run(sql, {SqlValue::Text(job.id())}).status());
      }
    }
    return absl::OkStatus();
  }

  // Sets `columns` (parameters from ?5, `values`) of the task's row if its
  // run still holds it (the row is gone once its job ended):
  // FAILED_PRECONDITION otherwise.
  absl::Status WriteTask(const JobTask& task, const std::string& columns,
                         std::vector<SqlValue> values)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<SqlValue> params = {
        SqlValue::Text(task.job_id), SqlValue::Int(task.task),
        SqlValue::Int(task.attempt), SqlValue::Text(task.runner)};
    params.insert(params.end(), values.begin(), values.end());
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult written,
        Run(absl::StrCat("UPDATE job_tasks SET ", columns,
                         " WHERE job_id = ?1 AND task = ?2 AND attempt = ?3 "
                         "AND runner = ?4 AND done = 0"),
            params));
    if (written.changed > 0) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(
        "run ", task.attempt, " of task ", task.task, " of job ", task.job_id,
        " no longer holds it (its lease expired and another run took it "
        "over, or the job ended)"));
  }

  // Tells listeners in other processes, at commit, that job `id` changed.
  absl::Status Notify(const std::string& id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (*db_->NotifyJob() == '\0') return absl::OkStatus();
    return Run(db_->NotifyJob(), {SqlValue::Text(id)}).status();
  }

  // WriteJob fenced: FAILED_PRECONDITION when the run lost the job.
  absl::Status WriteRun(const v1::Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    bool held = false;
    AMALGAM_RETURN_IF_ERROR(WriteJob(job, &held));
    return held ? absl::OkStatus() : LostRun(job);
  }

  // Makes `job` QUEUED again, progress cleared and claimable at once
  // (`fenced`: only if its run job.attempt() still holds it).
  absl::Status Requeue(v1::Job* job, bool fenced)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    job->set_state(v1::JOB_STATE_QUEUED);
    job->mutable_progress()->set_tensors_done(0);
    job->mutable_progress()->set_bytes_done(0);
    AMALGAM_RETURN_IF_ERROR(fenced ? WriteRun(*job) : WriteJob(*job, nullptr));
    return Run("UPDATE jobs SET lease_until = 0, not_before = 0 WHERE id = ?1",
               {SqlValue::Text(job->id())})
        .status();
  }

  absl::Status WriteInputs(const std::string& job_id,
                           const std::vector<std::string>& inputs)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const std::string& input : inputs) {
      AMALGAM_RETURN_IF_ERROR(
          Run("INSERT INTO job_inputs (artifact_id, job_id) VALUES (?1, ?2) "
              "ON CONFLICT DO NOTHING",
              {SqlValue::Text(input), SqlValue::Text(job_id)})
              .status());
    }
    return absl::OkStatus();
  }

  absl::StatusOr<SqlResult> Run(const std::string& sql,
                                const std::vector<SqlValue>& params = {})
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return db_->Run(sql, params);
  }

  absl::StatusOr<int64_t> QueryInt(const std::string& sql,
                                   const std::vector<SqlValue>& params)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    AMALGAM_ASSIGN_OR_RETURN(SqlResult result, Run(sql, params));
    if (result.rows.empty() || result.rows[0].empty()) {
      return absl::InternalError("catalog: a count returned no row");
    }
    return result.rows[0][0].number;
  }

  static absl::StatusOr<std::vector<UploadKey>> Keys(
      absl::StatusOr<SqlResult> result) {
    if (!result.ok()) return result.status();
    std::vector<UploadKey> keys;
    for (const SqlRow& row : result->rows) {
      keys.emplace_back(row[0].text, row[1].text);
    }
    return keys;
  }

  // Runs `body` in one transaction, rolled back if it fails.
  absl::Status InTransaction(const std::function<absl::Status()>& body)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    AMALGAM_RETURN_IF_ERROR(Run(db_->Begin()).status());
    absl::Status status = body();
    if (status.ok()) status = Run("COMMIT").status();
    if (!status.ok()) Run("ROLLBACK").IgnoreError();
    return status;
  }

  // `lock` is appended to the SELECT (FOR UPDATE inside a transaction).
  absl::StatusOr<v1::Artifact> ReadArtifact(const std::string& id,
                                            const std::string& lock)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result,
        Run("SELECT record FROM artifacts WHERE id = ?1" + lock,
            {SqlValue::Text(id)}));
    if (result.rows.empty()) return NotFound(id);
    return Parse<v1::Artifact>(result.rows[0][0], id);
  }

  // Inside a transaction: holds the content locks of every file of
  // `artifacts`, taken in one order (of their keys) so that two
  // transactions never wait for each other's.
  absl::Status ContentLocks(const std::vector<v1::Artifact>& artifacts)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::set<int64_t> keys;
    for (const v1::Artifact& artifact : artifacts) {
      for (const std::string& sha256 : Contents(artifact)) {
        keys.insert(ContentKey(sha256));
      }
    }
    for (const int64_t key : keys) {
      AMALGAM_RETURN_IF_ERROR(db_->TransactionLock(key));
    }
    return absl::OkStatus();
  }

  // Inside a transaction: holds the content lock of `sha256` until it ends
  // (see Catalog).
  absl::Status ContentLock(const std::string& sha256)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return db_->TransactionLock(ContentKey(sha256));
  }

  // A content lock's key: the first 60 bits of the digest; two contents
  // sharing a key only wait for each other.
  static int64_t ContentKey(const std::string& sha256) {
    int64_t key = 0;
    for (const char c : sha256.substr(0, 15)) {
      const int digit = c >= '0' && c <= '9'   ? c - '0'
                        : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                               : 0;
      key = (key << 4) | digit;
    }
    return key;
  }

  absl::Status InsertArtifactLocked(v1::Artifact* artifact,
                                    const PlaceContent& place)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    AMALGAM_RETURN_IF_ERROR(ContentLocks({*artifact}));
    AMALGAM_RETURN_IF_ERROR(place(*artifact));
    artifact->set_created_at(Now());
    artifact->clear_tensors();
    absl::Status inserted;
    do {
      artifact->set_id(NewId("art"));
      inserted = InsertRecord("artifacts", artifact->id(), *artifact);
    } while (absl::IsAlreadyExists(inserted));
    AMALGAM_RETURN_IF_ERROR(inserted);
    AMALGAM_RETURN_IF_ERROR(WriteArtifactContents(*artifact));
    return WriteArtifactColumns(*artifact);
  }

  // Writes the content rows of a new artifact: one per distinct blob.
  absl::Status WriteArtifactContents(const v1::Artifact& artifact)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const v1::ModelFile& file : ArtifactFiles(artifact)) {
      AMALGAM_RETURN_IF_ERROR(
          Run("INSERT INTO artifact_contents (artifact_id, sha256, "
              "size_bytes) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
              {SqlValue::Text(artifact.id()), SqlValue::Text(file.sha256()),
               SqlValue::Int(file.size_bytes())})
              .status());
    }
    return absl::OkStatus();
  }

  // Writes the indexed columns and share rows of `artifact` from its record.
  absl::Status WriteArtifactColumns(const v1::Artifact& artifact)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const SqlValue id = SqlValue::Text(artifact.id());
    AMALGAM_RETURN_IF_ERROR(
        Run("UPDATE artifacts SET owner = ?2, sha256 = ?3, size_bytes = ?4 "
            "WHERE id = ?1",
            {id, SqlValue::Text(artifact.owner()),
             SqlValue::Text(artifact.sha256()),
             SqlValue::Int(artifact.size_bytes())})
            .status());
    AMALGAM_RETURN_IF_ERROR(
        Run("DELETE FROM shares WHERE artifact_id = ?1", {id}).status());
    for (const std::string& org : artifact.shared_with()) {
      AMALGAM_RETURN_IF_ERROR(
          Run("INSERT INTO shares (artifact_id, organization) VALUES (?1, "
              "?2) ON CONFLICT DO NOTHING",
              {id, SqlValue::Text(org)})
              .status());
    }
    return absl::OkStatus();
  }

  // A plain insert: ALREADY_EXISTS, writing nothing, if `id` is taken.
  absl::Status InsertRecord(const char* table, const std::string& id,
                            const google::protobuf::Message& record)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    absl::Status status =
        Run(absl::StrCat("INSERT INTO ", table,
                         " (id, created_at, record) VALUES (?1, ?2, ?3)"),
            {SqlValue::Text(id), SqlValue::Int(Now()),
             SqlValue::Bytes(record.SerializeAsString())})
            .status();
    if (absl::IsAlreadyExists(status)) {
      return absl::AlreadyExistsError(
          absl::StrCat(table, " row ", id, " exists already"));
    }
    return status;
  }

  absl::Mutex mu_;
  const std::unique_ptr<SqlConnection> db_ ABSL_PT_GUARDED_BY(mu_);
  const bool shared_ = db_->Shared();
  // The stream leases where this process owns the database.
  StreamLeases local_streams_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Catalog>> OpenCatalog(
    const std::string& uri, const std::string& data_dir) {
  std::unique_ptr<SqlConnection> db;
  if (uri == "sqlite") {
    AMALGAM_ASSIGN_OR_RETURN(
        db,
        OpenSqlite((std::filesystem::path(data_dir) / "catalog.db").string()));
  } else if (absl::StartsWith(uri, "postgresql://") ||
             absl::StartsWith(uri, "postgres://")) {
    AMALGAM_ASSIGN_OR_RETURN(db, OpenPostgres(uri));
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "--catalog must be \"sqlite\" or a postgresql:// URI, not \"", uri,
        "\""));
  }
  auto catalog = std::make_unique<SqlCatalog>(std::move(db));
  AMALGAM_RETURN_IF_ERROR(catalog->Migrate());
  if (uri == "sqlite") return catalog;
  // PostgreSQL serves many connections at once: a pool of them, so that the
  // RPC threads, workers and heartbeat of a replica do not wait on each
  // other's round trips.
  std::vector<std::unique_ptr<Catalog>> members;
  members.push_back(std::move(catalog));
  while (members.size() < kPostgresConnections) {
    AMALGAM_ASSIGN_OR_RETURN(std::unique_ptr<SqlConnection> more,
                             OpenPostgres(uri));
    members.push_back(std::make_unique<SqlCatalog>(std::move(more)));
  }
  return PoolOf(std::move(members));
}

}  // namespace amalgam::server
