#!/usr/bin/env bash
# The GPU check (issue 17 §3): builds amalgam::core, its unit tests and
# bench/regmean_bert against the LibTorch of the machine's PyTorch (a CUDA
# build), runs every core unit test (the CUDA ones run where a GPU is) and the
# RegMean bench on the device, and writes one log.
#
#   scripts/gpu-check.sh fetch [DEBS]    # here: the .deb files it needs, into
#                                        # DEBS (default build/gpu-debs)
#   scripts/gpu-check.sh run [DEBS] [LOG] [DEVICE]
#                                        # there: LOG default $OUT/gpu-check.log
#                                        # (else build/gpu-check.log), DEVICE cuda
#
# `run` needs a C++17 compiler, CMake, make, Python 3 with PyTorch (its
# torch.utils.cmake_prefix_path gives LibTorch) and `ar` and `tar`; Abseil,
# nlohmann-json, RE2, GoogleTest and OpenSSL's headers come from the .deb
# files, unpacked into build/gpu-prefix (no root, no network). Environment:
# PYTHON (default python3), JOBS (default nproc), TORCH_PREFIX (default from
# PYTHON; on a machine whose Python has no PyTorch, e.g. Debian's LibTorch:
# /usr/lib/x86_64-linux-gnu/cmake/Torch/../../..), LAYERS (bench layers, 12).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian 12 packages: headers, static or shared libraries, CMake files.
readonly PACKAGES=(libabsl-dev libabsl20220623 nlohmann-json3-dev libre2-dev
  libre2-9 libgtest-dev libgmock-dev libssl-dev libssl3)

fetch() {
  local debs=${1:-build/gpu-debs}
  mkdir -p "$debs"
  (cd "$debs" && apt-get download "${PACKAGES[@]}")
  du -sh "$debs"
}

# Unpacks each .deb of $1 into $2 (a .deb is an ar archive holding
# data.tar.*).
unpack() {
  local debs prefix scratch
  debs=$(cd "$1" && pwd)
  mkdir -p "$2"
  prefix=$(cd "$2" && pwd)
  scratch=$(mktemp -d)
  for deb in "$debs"/*.deb; do
    (cd "$scratch" && rm -f data.tar.* && ar x "$deb" &&
      tar -xf data.tar.* -C "$prefix")
  done
  rm -rf "$scratch"
}

run() {
  local debs=${1:-build/gpu-debs}
  local log=${2:-${OUT:-build}/gpu-check.log} device=${3:-cuda}
  local python=${PYTHON:-python3} jobs=${JOBS:-$(nproc)}
  local prefix=build/gpu-prefix build=build/gpu status=0
  mkdir -p "$(dirname "$log")"
  exec 3>&1 4>&2 > >(tee "$log") 2>&1
  echo "== gpu-check $(date -u +%FT%TZ) on $(hostname), device $device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    2>/dev/null || echo "(no nvidia-smi)"
  local torch_prefix=${TORCH_PREFIX:-}
  if [[ -z $torch_prefix ]]; then
    torch_prefix=$("$python" -c \
      'import torch; print(torch.utils.cmake_prefix_path)') || {
      echo "no PyTorch in $python: set PYTHON or TORCH_PREFIX"; return 1; }
  fi
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda",
torch.version.cuda, "available", torch.cuda.is_available())' ||
    echo "(no PyTorch in $python)"
  echo "== unpacking $(ls "$debs"/*.deb | wc -l) packages from $debs"
  unpack "$debs" "$prefix"
  local usr=$PWD/$prefix/usr arch
  arch=$(ls "$usr/lib" | grep -m1 -- '-linux-gnu$') || {
    echo "no $usr/lib/*-linux-gnu: the .deb files did not unpack"; return 1; }
  # The Debian libraries find each other here (they carry no run path).
  export LD_LIBRARY_PATH=$usr/lib/$arch${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  # A CUDA test skipped for want of a GPU fails instead.
  if [[ $device == cuda* ]]; then export AMALGAM_REQUIRE_CUDA=1; fi

  echo "== configure (LibTorch from $torch_prefix)"
  SECONDS=0
  rm -f "$build/CMakeCache.txt"  # no paths kept from another machine or run
  # OpenSSL's configuration headers live under include/<arch>.
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DAMALGAM_CORE_ONLY=ON \
    -DCMAKE_CXX_FLAGS="-isystem $usr/include/$arch" \
    -DCMAKE_PREFIX_PATH="$torch_prefix;$usr;$usr/lib/$arch/cmake" \
    -DCMAKE_LIBRARY_PATH="$usr/lib/$arch" -DCMAKE_INCLUDE_PATH="$usr/include" \
    -DOPENSSL_ROOT_DIR="$usr" -DOPENSSL_INCLUDE_DIR="$usr/include"
  echo "== build (-j$jobs)"
  cmake --build "$build" -j"$jobs"
  echo "(configure and build: ${SECONDS} s)"

  echo "== core unit tests"
  # (safetensors_test is left out: it runs /usr/bin/python3, which may have no
  # NumPy there.)
  local tests=(merge_test runtime_test cpu_cache_test statistics_test grow_test
    task_vectors_test sha256_test shared_gram_test shard_test sketch_test)
  for t in "${tests[@]}"; do
    SECONDS=0
    if AMALGAM_TEST_TMPDIR=$PWD/$build/tmp "$build/bin/$t" \
      >"$build/$t.out" 2>&1; then
      echo "$t: passed, ${SECONDS} s"
    else
      echo "$t: FAILED"; status=1
    fi
    grep -E '^\[  (PASSED  |FAILED  |SKIPPED )\]|Failure' "$build/$t.out" |
      head -40 || true
  done

  echo "== bench/regmean_bert on $device"
  SECONDS=0
  "$build/bin/regmean_bert" --dir "$build/regmean-bert" --device "$device" \
    --layers "${LAYERS:-12}" --python "$python" || status=1
  echo "(bench: ${SECONDS} s)"
  echo "== gpu-check done: $([[ $status == 0 ]] && echo passed || echo FAILED)"
  # Let tee write the last lines before the script exits.
  exec 1>&3 2>&4
  wait
  return "$status"
}

case ${1:-} in
  fetch) shift; fetch "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 fetch [DEBS] | run [DEBS] [LOG] [DEVICE]" >&2; exit 2 ;;
esac
