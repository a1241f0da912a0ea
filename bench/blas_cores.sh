#!/usr/bin/env bash
# The BLAS kernels and thread counts amalgamd may run with, measured in one
# run: regmean_bert (our merge only) and merge_rss under OpenBLAS's generic
# Prescott kernels (what Debian 12's OpenBLAS 0.3.21 falls back to on Sapphire
# and Emerald Rapids), SkylakeX (what amalgamd's --blas-core auto then asks
# for) and the kernels OpenBLAS detects here, each with LibTorch's default of
# 1 intra-op thread and with the 2 usable CPUs amalgamd now gives one worker.
#   bench/blas_cores.sh [BUILD_DIR]   (after scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build}/bin
detected=$({ OPENBLAS_VERBOSE=2 "$bin/regmean_bert" --help 2>&1 || true; } | sed -n 's/^Core: //p' | head -n 1)
echo "OpenBLAS detects: ${detected:-unknown}; CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo

run() {  # CORE THREADS COMMAND...: the command with OPENBLAS_CORETYPE=CORE (or unset)
  local core=$1 threads=$2
  shift 2
  if [ "$core" = detected ]; then
    env -u OPENBLAS_CORETYPE "$@" --threads "$threads"
  else
    OPENBLAS_CORETYPE=$core "$@" --threads "$threads"
  fi
}

echo "regmean_bert (3 BERT-base-shaped models, RegMean):"
echo
first=1
for core in Prescott SkylakeX detected; do
  for threads in 1 2; do
    out=$(run "$core" "$threads" "$bin/regmean_bert" --reference=false)
    if [ $first = 1 ]; then echo "$out" | sed -n '1,2p'; first=0; fi
    echo "$out" | grep '^| amalgam'
  done
done
echo
echo "merge_rss (3 x 1 GiB, result on disk, median of 3):"
echo
echo "| method | models | tensors | peak RSS (MiB) | bound (MiB) | under bound | seconds (median) | CPU user / system s | input GiB/s | memcpy GiB/s | share of memcpy | result written alone (s) | ceiling GiB/s | write alone / merge | BLAS core, intra-op threads |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for method in average fisher; do
  for core in Prescott detected; do
    for threads in 1 2; do
      run "$core" "$threads" "$bin/merge_rss" --dir build/bench-data --method "$method" \
        --queue-depth 2 --runs 3
    done
  done
done
