#!/usr/bin/env bash
# A throwaway PostgreSQL 15 for tests, on a Unix socket only (no TCP port).
#   scripts/postgres.sh start DIR   initialises DIR and starts the server; the
#                                   socket is in DIR/sock, the superuser is
#                                   "amalgam", database "amalgam":
#                                   postgresql://amalgam@/amalgam?host=DIR/sock
#   scripts/postgres.sh stop DIR    stops it (DIR is left for the caller)
#   scripts/postgres.sh resume DIR  starts a stopped one again
# fsync is off (a throwaway server); PG_FSYNC=on keeps it, for benchmarks.
# As root the server runs as the "postgres" user (PostgreSQL refuses root).
set -euo pipefail
action=${1:?start or stop}
dir=${2:?directory}
bin=/usr/lib/postgresql/15/bin
as_owner=()
if [ "$(id -u)" -eq 0 ]; then as_owner=(runuser -u postgres --); fi

case "$action" in
  start)
    mkdir -p "$dir/sock"
    if [ "$(id -u)" -eq 0 ]; then chown -R postgres "$dir"; fi
    "${as_owner[@]}" "$bin/initdb" -D "$dir/data" -A trust -U amalgam >"$dir/initdb.log" 2>&1 ||
      { cat "$dir/initdb.log" >&2; exit 1; }
    "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w start \
      -o "-k $dir/sock -c listen_addresses='' -c fsync=${PG_FSYNC:-off}" >/dev/null ||
      { cat "$dir/log" >&2; exit 1; }
    "${as_owner[@]}" "$bin/createdb" -h "$dir/sock" -U amalgam amalgam
    ;;
  resume)
    "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w start \
      -o "-k $dir/sock -c listen_addresses='' -c fsync=${PG_FSYNC:-off}" >/dev/null
    ;;
  stop)
    "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
  *)
    echo "usage: $0 start|stop|resume DIR" >&2
    exit 2
    ;;
esac
