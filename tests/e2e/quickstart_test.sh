#!/usr/bin/env bash
# End-to-end quickstart: starts the real amalgamd on a free loopback port, uploads
# demo models and their statistics with the amalgam CLI, runs merges (regmean,
# average, weighted, fisher) and checks each result against a float64 numpy
# reference computed from the same files. Also checks that bad requests fail with
# the server's message and that usage errors exit 2.
#
# usage: quickstart_test.sh AMALGAMD AMALGAM
# Env: PYTHON (default /usr/bin/python3), AMALGAM_E2E_DEVICE (default cpu),
#      AMALGAM_E2E_KEEP=1 keeps the temporary directory.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 AMALGAMD AMALGAM" >&2
  exit 2
fi
AMALGAMD=$1
AMALGAM=$2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-/usr/bin/python3}
DEVICE=${AMALGAM_E2E_DEVICE:-cpu}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/amalgam-e2e.XXXXXX")
SERVER_PID=""

cleanup() {
  local rc=$?
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [ $rc -ne 0 ] && [ -f "$TMP/server.log" ]; then
    echo "--- last lines of the server log ---" >&2
    tail -n 40 "$TMP/server.log" >&2
  fi
  if [ "${AMALGAM_E2E_KEEP:-0}" = 1 ]; then
    echo "kept $TMP" >&2
  else
    rm -rf "$TMP"
  fi
  exit $rc
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

step() { echo "== $*"; }

# Runs the CLI; stdout in $TMP/out, stderr in $TMP/err, exit status in $RC.
cli() {
  set +e
  "$AMALGAM" --server "127.0.0.1:$PORT" "$@" >"$TMP/out" 2>"$TMP/err"
  RC=$?
  set -e
}

# Runs the CLI and fails the test unless it exits 0; echoes the last stdout line.
cli_ok() {
  cli "$@"
  if [ "$RC" -ne 0 ]; then
    cat "$TMP/err" >&2
    fail "amalgam $* exited $RC"
  fi
  tail -n 1 "$TMP/out"
}

# Expects the last CLI call to have failed with exit 1 and `amalgam: error: CODE: msg`.
expect_error() {
  local code=$1 what=$2
  [ "$RC" -eq 1 ] || fail "$what: exit status $RC, want 1 (stderr: $(cat "$TMP/err"))"
  grep -Eq "^amalgam: error: $code: .+" "$TMP/err" ||
    fail "$what: stderr is '$(cat "$TMP/err")', want 'amalgam: error: $code: <message>'"
  echo "   got: $(head -n 1 "$TMP/err")"
}

is_id() { [[ $1 =~ ^[A-Za-z0-9_.:-]+$ ]]; }

# --- start the server -------------------------------------------------------
step "start amalgamd"
"$AMALGAMD" --listen 127.0.0.1:0 --data-dir "$TMP/data" --port-file "$TMP/port" \
  --metrics-listen 127.0.0.1:0 --device "$DEVICE" >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
deadline=$((SECONDS + 60))
PORT=""
while :; do
  if [ -s "$TMP/port" ]; then
    PORT=$(head -n 1 "$TMP/port" | tr -d '[:space:]')
    [[ $PORT =~ ^[0-9]+$ ]] && [ "$PORT" -gt 0 ] && break
  fi
  kill -0 "$SERVER_PID" 2>/dev/null || fail "amalgamd exited before writing its port file"
  [ $SECONDS -lt $deadline ] || fail "amalgamd wrote no port file within 60 s"
  sleep 0.05
done
echo "   listening on port $PORT"

# --- demo data ---------------------------------------------------------------
step "make demo models"
"$PYTHON" "$ROOT/scripts/make_demo_models.py" "$TMP/demo" --count 3 --seed 7

# --- uploads -----------------------------------------------------------------
step "upload 3 models with grams and fishers"
W=() G=() F=()
for i in 0 1 2; do
  W[i]=$(cli_ok upload weights "$TMP/demo/model_$i.safetensors" --name "demo-$i")
  is_id "${W[i]}" || fail "upload printed '${W[i]}' as its last line, not an id"
  G[i]=$(cli_ok upload gram "$TMP/demo/gram_$i.safetensors" --for "${W[i]}")
  is_id "${G[i]}" || fail "upload printed '${G[i]}' as its last line, not an id"
  F[i]=$(cli_ok upload fisher "$TMP/demo/fisher_$i.safetensors" --for "${W[i]}" \
    --name "fisher-$i")
  is_id "${F[i]}" || fail "upload printed '${F[i]}' as its last line, not an id"
done
echo "   weights ${W[*]}"

step "ls and show"
cli_ok ls >/dev/null
for id in "${W[@]}" "${G[@]}" "${F[@]}"; do
  grep -q -- "$id" "$TMP/out" || fail "ls does not list $id"
done
grep -q "demo-1" "$TMP/out" || fail "ls does not show the name demo-1"
cli_ok show "${W[0]}" >/dev/null
grep -q "0.weight" "$TMP/out" || fail "show lists no tensor 0.weight"
grep -q "\[32, 16\]" "$TMP/out" || fail "show gives no shape [32, 16]"
want_sha=$(sha256sum "$TMP/demo/model_0.safetensors" | cut -d' ' -f1)
grep -q "$want_sha" "$TMP/out" || fail "show does not give the file's sha256 $want_sha"
cli_ok show "${G[0]}" >/dev/null
grep -q "reduction: sum" "$TMP/out" || fail "show of a gram gives no metadata reduction"
grep -q "num_examples: 256" "$TMP/out" || fail "show of a gram gives no num_examples"
grep -q "${W[0]}" "$TMP/out" || fail "show of a gram does not name the weights it describes"

# --- reference checker ---------------------------------------------------------
check() { "$PYTHON" "$ROOT/tests/fixtures/check_merge.py" "$TMP/demo" "$@" || fail "result of $2 differs from the reference"; }

# --- merges ----------------------------------------------------------------------
step "merge regmean --out"
job=$(cli_ok merge --method regmean --model "${W[0]}" --model "${W[1]}" --model "${W[2]}" \
  --gram "${G[0]}" --gram "${G[1]}" --gram "${G[2]}" --name regmean-demo \
  --out "$TMP/regmean.safetensors")
is_id "$job" || fail "merge printed '$job' as its last line, not a job id"
[ -f "$TMP/regmean.safetensors" ] || fail "merge --out wrote no file"
[ ! -e "$TMP/regmean.safetensors.tmp" ] || fail "merge --out left its temporary file"
check "$TMP/regmean.safetensors" regmean

step "merge regmean naming no grams: the ones uploaded for the models"
cli_ok merge --method regmean --model "${W[0]}" --model "${W[1]}" --model "${W[2]}" \
  --out "$TMP/regmean-linked.safetensors" >/dev/null
cmp -s "$TMP/regmean.safetensors" "$TMP/regmean-linked.safetensors" ||
  fail "regmean with the linked grams differs from the one naming them"

step "merge average --watch, then watch + download"
avg_job=$(cli_ok merge --method average --model "${W[0]}" --model "${W[1]}" \
  --model "${W[2]}" --watch)
is_id "$avg_job" || fail "merge printed '$avg_job' as its last line, not a job id"
grep -q "succeeded" "$TMP/err" || fail "merge --watch showed no final state on stderr"
result=$(cli_ok watch "$avg_job")
is_id "$result" || fail "watch printed '$result', not a result id"
cli_ok download "$result" --out "$TMP/average.safetensors" >/dev/null
check "$TMP/average.safetensors" average
cli_ok show "$result" >/dev/null
grep -q "$(sha256sum "$TMP/average.safetensors" | cut -d' ' -f1)" "$TMP/out" ||
  fail "downloaded file's sha256 differs from the artifact's"
cli_ok jobs >/dev/null
grep -q "$avg_job" "$TMP/out" || fail "jobs does not list $avg_job"
grep -q "$job" "$TMP/out" || fail "jobs does not list $job"

step "merge weighted and fisher"
cli_ok merge --method weighted --model "${W[0]}:1" --model "${W[1]}:2" \
  --model "${W[2]}:3" --out "$TMP/weighted.safetensors" >/dev/null
check "$TMP/weighted.safetensors" weighted 1 2 3
cli_ok merge --method fisher --model "${W[0]}" --model "${W[1]}" --model "${W[2]}" \
  --fisher "${F[0]}" --fisher "${F[1]}" --fisher "${F[2]}" \
  --out "$TMP/fisher.safetensors" >/dev/null
check "$TMP/fisher.safetensors" fisher

# --- bad requests ------------------------------------------------------------------
step "bad requests fail with the server's message"
cli show no-such-artifact
expect_error NOT_FOUND "show of an unknown id"
grep -q "no-such-artifact" "$TMP/err" || fail "NOT_FOUND message does not name the id"
cli merge --method average --model "${W[0]}" --model no-such-artifact
expect_error NOT_FOUND "merge with an unknown model"
cli merge --method average --model "${W[0]}"
expect_error INVALID_ARGUMENT "merge of one model"
# Weights of the same shapes that no Gram was uploaded for.
"$PYTHON" "$ROOT/scripts/make_demo_models.py" "$TMP/other" --count 1 --seed 8 >/dev/null
other=$(cli_ok upload weights "$TMP/other/model_0.safetensors")
cli merge --method regmean --model "${W[0]}" --model "$other"
expect_error FAILED_PRECONDITION "regmean of a model without grams"
grep -q "$other" "$TMP/err" || fail "the refusal does not name the model without grams"
[ ! -s "$TMP/out" ] || fail "a refused merge printed '$(cat "$TMP/out")' on stdout"

step "usage errors exit 2"
cli merge --method nonsense --model "${W[0]}"
[ "$RC" -eq 2 ] || fail "unknown method: exit status $RC, want 2"
grep -q "^usage: " "$TMP/err" || fail "usage error printed no usage line"
cli frobnicate
[ "$RC" -eq 2 ] || fail "unknown command: exit status $RC, want 2"

step "every command of the help text answers --help with its usage"
cli help
[ "$RC" -eq 0 ] || fail "help exited $RC"
commands=$(sed -n '/^Commands:/,$p' "$TMP/out" | grep -oE '^  [a-z]+' | tr -d ' ')
[ "$(echo "$commands" | wc -w)" -ge 14 ] || fail "help lists only: $commands"
for command in $commands; do
  cli "$command" --help
  [ "$RC" -eq 0 ] || fail "amalgam $command --help exited $RC (stderr: $(cat "$TMP/err"))"
  grep -q "^usage: amalgam $command" "$TMP/out" || fail "amalgam $command --help printed no usage"
done

echo "PASS"
