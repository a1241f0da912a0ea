#!/usr/bin/env bash
# Builds the container image with podman and runs it as a deployment would:
# a token file, a named volume, the image's own command and HEALTHCHECK. Then
# uploads two models and their Grams with the host's CLI, merges them with
# RegMean and checks the result against a float64 reference, scrapes
# /metrics, stops the container with SIGTERM (it must drain and exit 0), and
# downloads the result again from a new container on the same volume.
#
# No registry is reachable here, so the base image is bootstrapped from
# Debian's archive (debootstrap, then podman import) once and kept.
#   scripts/container-test.sh            (after scripts/build.sh; as root)
# Env: AMALGAM (default build/bin/amalgam), PYTHON (default /usr/bin/python3),
#      DEBIAN_MIRROR (default: the host's, from /etc/apt/sources.list.d),
#      AMALGAM_CONTAINER_KEEP=1 keeps the temporary directory and volume.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
AMALGAM=${AMALGAM:-$ROOT/build/bin/amalgam}
PYTHON=${PYTHON:-/usr/bin/python3}
WORK=$ROOT/build-container
BASE=localhost/debian:bookworm
IMAGE=localhost/amalgam:test
TAG=amalgam-ct-$$
GRPC=127.0.0.1:50051
METRICS=127.0.0.1:9464

step() { echo "== container: $*"; }
fail() {
  echo "container-test: FAIL: $*" >&2
  exit 1
}
skip() {
  echo "container-test: SKIPPED: $* (the container image was not tested)"
  exit 0
}

# --- can podman run here? ------------------------------------------------------
[ "$(id -u)" -eq 0 ] || skip "needs root for rootful podman and debootstrap"
command -v podman >/dev/null || skip "podman is not installed (scripts/setup.sh installs it)"
command -v debootstrap >/dev/null || skip "debootstrap is not installed"
[ -x "$AMALGAM" ] || fail "$AMALGAM is missing: run scripts/build.sh first"
mkdir -p "$WORK"
# crun fails on setrlimit and on hybrid cgroup layouts here: runc, cgroupfs.
cat >"$WORK/containers.conf" <<'CONF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
export CONTAINERS_CONF=$WORK/containers.conf
podman info >"$WORK/podman-info.txt" 2>&1 ||
  skip "podman cannot run on this machine: $(tail -n 1 "$WORK/podman-info.txt")"

for address in "$GRPC" "$METRICS"; do
  if (exec 3<>"/dev/tcp/${address%:*}/${address#*:}") 2>/dev/null; then
    fail "port ${address#*:} is in use; the container (host network) needs it"
  fi
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/amalgam-container.XXXXXX")
cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    for c in "$TAG-1" "$TAG-2"; do
      podman logs "$c" >"$TMP/$c.log" 2>&1 &&
        { echo "--- last lines of $c's log ---" >&2; tail -n 30 "$TMP/$c.log" >&2; }
    done
  fi
  podman rm -f -t 0 "$TAG-1" "$TAG-2" >/dev/null 2>&1 || true
  if [ "${AMALGAM_CONTAINER_KEEP:-0}" = 1 ]; then
    echo "kept $TMP and volume $TAG" >&2
  else
    podman volume rm -f "$TAG" >/dev/null 2>&1 || true
    rm -rf "$TMP"
  fi
  exit $rc
}
trap cleanup EXIT

# --- images ----------------------------------------------------------------------
if ! podman image exists "$BASE"; then
  step "bootstrap $BASE from Debian's archive"
  rm -rf "$WORK/rootfs"
  # The host's own Debian mirror (the only registry reachable), else the default.
  mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' \
    /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)}
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "${mirror:-http://deb.debian.org/debian}" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -n 20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed"; }
  tar -C "$WORK/rootfs" -c . | podman import - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
fi
step "build $IMAGE"
start=$SECONDS
# --format docker keeps the HEALTHCHECK (the OCI format has none).
podman build --format docker --network host --build-arg DEBIAN="$BASE" -t "$IMAGE" . \
  >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; fail "podman build failed"; }
echo "   built in $((SECONDS - start)) s"
for tool in g++ cmake ninja; do
  if podman run --rm --entrypoint sh "$IMAGE" -c "command -v $tool" >/dev/null 2>&1; then
    fail "the runtime image holds the build tool $tool"
  fi
done

# --- run it as compose and Kubernetes do -------------------------------------------
TOKEN=container-test-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
printf '# TOKEN ORGANISATION\n%s org-ct\n' "$TOKEN" >"$TMP/tokens"
chown 10001 "$TMP/tokens"
chmod 600 "$TMP/tokens"
podman volume create "$TAG" >/dev/null

# Without systemd, podman cannot add timers for the HEALTHCHECK and says so on
# stderr; wait_healthy runs the check itself.
run_container() {
  podman run -d --name "$1" --network host \
    -v "$TAG:/var/lib/amalgam" -v "$TMP/tokens:/etc/amalgam/tokens:ro" "$IMAGE" \
    >/dev/null 2>>"$TMP/podman.err" || { cat "$TMP/podman.err" >&2; fail "podman run $1 failed"; }
}

wait_healthy() {
  local deadline=$((SECONDS + 120))
  until podman healthcheck run "$1" >/dev/null 2>&1; do
    [ "$(podman inspect -f '{{.State.Running}}' "$1")" = true ] ||
      fail "$1 exited with status $(podman inspect -f '{{.State.ExitCode}}' "$1") before it was healthy"
    [ $SECONDS -lt $deadline ] || fail "$1's HEALTHCHECK did not pass within 120 s"
    sleep 0.5
  done
  echo "   $1 is healthy"
}

cli() { "$AMALGAM" --server "$GRPC" --token "$TOKEN" "$@"; }

step "start the first container"
run_container "$TAG-1"
wait_healthy "$TAG-1"
podman exec "$TAG-1" sh -c 'ldd /usr/local/bin/amalgamd /usr/local/bin/amalgam | grep "not found"' &&
  fail "libraries are missing in the image"

step "upload two models and their Grams, merge with RegMean"
"$PYTHON" scripts/make_demo_models.py "$TMP/demo" --count 2 --seed 11 >/dev/null
W=() G=()
for i in 0 1; do
  W[i]=$(cli upload weights "$TMP/demo/model_$i.safetensors" 2>/dev/null | tail -n 1)
  G[i]=$(cli upload gram "$TMP/demo/gram_$i.safetensors" --for "${W[i]}" 2>/dev/null | tail -n 1)
done
job=$(cli merge --method regmean --model "${W[0]}" --model "${W[1]}" \
  --gram "${G[0]}" --gram "${G[1]}" --out "$TMP/regmean.safetensors" 2>"$TMP/merge.err" |
  tail -n 1) || { cat "$TMP/merge.err" >&2; fail "merge failed"; }
"$PYTHON" tests/fixtures/check_merge.py "$TMP/demo" "$TMP/regmean.safetensors" regmean 1 1 ||
  fail "the container's RegMean result differs from the float64 reference"
result=$(cli watch "$job" 2>/dev/null | tail -n 1)

step "scrape /metrics"
"$PYTHON" - "http://$METRICS/metrics" <<'PY' || fail "/metrics lacks what a dashboard needs"
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
for needle in ("amalgam_build_info", 'amalgam_jobs_total{kind="merge",method="regmean",state="succeeded"} 1',
               "amalgam_received_bytes_total"):
    if needle not in text:
        sys.exit(f"/metrics has no {needle!r}")
print(f"   {len(text)} bytes of metrics")
PY

step "SIGTERM drains and exits 0"
podman stop -t 60 "$TAG-1" >/dev/null 2>>"$TMP/podman.err"
status=$(podman inspect -f '{{.State.ExitCode}}' "$TAG-1")
[ "$status" -eq 0 ] || fail "amalgamd exited with status $status on SIGTERM, want 0"
podman logs "$TAG-1" 2>&1 | grep -q "event=stopped" || fail "amalgamd logged no event=stopped"

step "a new container on the same volume serves the earlier result"
run_container "$TAG-2"
wait_healthy "$TAG-2"
cli download "$result" --out "$TMP/again.safetensors" 2>/dev/null
cmp "$TMP/regmean.safetensors" "$TMP/again.safetensors" ||
  fail "the result downloaded from the second container differs from the first"
podman stop -t 60 "$TAG-2" >/dev/null 2>>"$TMP/podman.err"
echo "container-test: PASS"
