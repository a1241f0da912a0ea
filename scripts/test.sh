#!/usr/bin/env bash
# Sets up, builds and runs every test: formatting, unit, integration (real
# amalgamd over gRPC on loopback), end-to-end (the CLI against the server),
# pytest (integration and pytest a second time on a throwaway PostgreSQL), the
# CPU parts of the GPU check, a short run of each libFuzzer target, and the
# container image built and run with podman.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh

echo "== clang-format check"
git ls-files '*.cc' '*.h' '*.proto' | xargs clang-format --dry-run --Werror

# A throwaway PostgreSQL: the catalog tests run on it, and the integration and
# Python suites run a second time with it as every server's catalog.
pg_dir=$(mktemp -d /tmp/amalgam-pg.XXXXXX)
chmod 755 "$pg_dir"
trap 'bash scripts/postgres.sh stop "$pg_dir" || true; rm -rf "$pg_dir"' EXIT
bash scripts/postgres.sh start "$pg_dir"
export AMALGAM_TEST_POSTGRES="$pg_dir/sock" AMALGAM_REQUIRE_POSTGRES=1

echo "== ctest"
ctest --preset release -j2
# ctest shows a passing test's output nowhere: say what pytest ran and skipped.
/usr/bin/python3 - build/pytest-results.xml <<'PY'
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot().find("testsuite")
skipped = [c.get("classname") + "::" + c.get("name") for c in suite.iter("testcase")
           if c.find("skipped") is not None]
print(f"pytest: {suite.get('tests')} tests, {suite.get('failures')} failed, "
      f"{suite.get('errors')} errors, {len(skipped)} skipped")
for name in skipped:
    print(f"  skipped: {name}")
PY

echo "== integration and Python suites on the PostgreSQL catalog"
# (ClusterTest runs its replicas on PostgreSQL in the first run already.)
AMALGAM_TEST_CATALOG=postgres ctest --preset release -j2 -L 'integration|python' \
  -E '^ClusterTest\.'

# 256 MiB for the process plus 3 tensors per input file: holding the 3 x 64
# MiB of models (and Fishers) in memory at once would exceed it.
echo "== merge memory bound (bench/merge_rss, 3 x 64 MiB; exits 3 over the bound)"
for method in average fisher; do
  build/bin/merge_rss --dir build/bench-small --models 3 --model-gib 0.0625 \
    --tensor-mib 8 --method "$method" --runs 1 --base-mib 256
done
# Its 4 shards of 2 tensors written by 2 threads at once, as 2 workers do.
build/bin/merge_rss --dir build/bench-small --models 3 --model-gib 0.0625 \
  --tensor-mib 8 --runs 1 --base-mib 256 --shard-size 16777216 --workers 2

# What scripts/gpu-check.sh does on a GPU machine, on the CPU with Debian's
# LibTorch: core built alone against the unpacked .debs, its unit tests, the
# RegMean bench (1 layer).
echo "== GPU check, its CPU parts (scripts/gpu-check.sh)"
bash scripts/gpu-check.sh fetch build/gpu-debs
TORCH_PREFIX=/usr/lib/x86_64-linux-gnu/cmake/Torch PYTHON=/usr/bin/python3 \
  LAYERS=1 bash scripts/gpu-check.sh run build/gpu-debs build/gpu-check.log cpu

echo "== fuzz (short run)"
bash scripts/fuzz.sh 30

echo "== container image (podman)"
bash scripts/container-test.sh
