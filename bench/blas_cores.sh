#!/usr/bin/env bash
# The BLAS kernels and thread counts amalgamd may run with, measured in one
# run: regmean_bert (our merge only) and merge_rss under OpenBLAS's generic
# Prescott kernels (what Debian 12's OpenBLAS 0.3.21 falls back to on Sapphire
# and Emerald Rapids), SkylakeX (what amalgamd's --blas-core auto then asks
# for) and the kernels OpenBLAS detects here; each with LibTorch's default of
# 1 intra-op thread (amalgamd before), with the 2 usable CPUs under OpenMP's
# default (spinning) wait policy, and with 2 and OMP_WAIT_POLICY=PASSIVE
# (amalgamd now).
#   bench/blas_cores.sh [BUILD_DIR]   (after scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build}/bin
detected=$({ OPENBLAS_VERBOSE=2 "$bin/regmean_bert" --help 2>&1 || true; } |
  sed -n 's/^Core: //p' | head -n 1)
echo "OpenBLAS detects: ${detected:-unknown}; CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo

# run CORE THREADS POLICY COMMAND...: COMMAND --threads THREADS with
# OPENBLAS_CORETYPE=CORE (unset for "detected") and OMP_WAIT_POLICY=POLICY
# (unset for "default").
run() {
  local core=$1 threads=$2 policy=$3
  shift 3
  local env=(env -u OPENBLAS_CORETYPE -u OMP_WAIT_POLICY)
  [ "$core" = detected ] || env+=("OPENBLAS_CORETYPE=$core")
  [ "$policy" = default ] || env+=("OMP_WAIT_POLICY=$policy")
  "${env[@]}" "$@" --threads "$threads"
}

configs=("1 default" "2 default" "2 PASSIVE")

echo "regmean_bert (3 BERT-base-shaped models, RegMean); the last column adds OMP_WAIT_POLICY:"
echo
first=1
for core in Prescott SkylakeX detected; do
  for config in "${configs[@]}"; do
    read -r threads policy <<<"$config"
    out=$(run "$core" "$threads" "$policy" "$bin/regmean_bert" --reference=false)
    if [ $first = 1 ]; then
      echo "$out" | sed -n '1p' | sed -E 's/ \| *$/ | OMP_WAIT_POLICY |/;
        s/share of f64 matmul \([^)]*\)/share of f64 matmul (measured with the same settings)/'
      echo "$out" | sed -n '2p' | sed 's/$/---|/'
      first=0
    fi
    echo "$out" | grep '^| amalgam' | sed "s/ |\$/ | $policy |/"
  done
done
echo
echo "merge_rss (3 x 1 GiB, result on disk, median of 3); the last column adds OMP_WAIT_POLICY:"
echo
echo "| method | models | tensors | peak RSS (MiB) | bound (MiB) | under bound | seconds (median) | CPU user / system s | input GiB/s | memcpy GiB/s | share of memcpy | result written alone (s) | ceiling GiB/s | write alone / merge | BLAS core, intra-op threads | OMP_WAIT_POLICY |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for method in average fisher; do
  for core in Prescott detected; do
    for config in "${configs[@]}"; do
      read -r threads policy <<<"$config"
      run "$core" "$threads" "$policy" "$bin/merge_rss" --dir build/bench-data \
        --method "$method" --queue-depth 2 --runs 3 | sed "s/ |\$/ | $policy |/"
    done
  done
done
