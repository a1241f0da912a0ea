#!/usr/bin/env bash
# Prints the Debian packages that hold the shared libraries BINARY... load,
# one per line, sorted. Fails, naming the library, when one is "not found" or
# belongs to no package, so an image built from this list cannot lack one.
# Libraries under a directory in ALLOW_UNPACKAGED (colon-separated, e.g. the
# official CUDA LibTorch in /opt/libtorch) are copied by the caller instead.
#   scripts/runtime-packages.sh build/bin/amalgamd build/bin/amalgam
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 BINARY..." >&2; exit 2; }

missing=$(ldd "$@" | awk '/=> not found/ {print $1}' | sort -u)
if [ -n "$missing" ]; then
  echo "runtime-packages: libraries not found: $(echo $missing)" >&2
  exit 1
fi

unpackaged() {
  local dir
  IFS=: read -ra dirs <<<"${ALLOW_UNPACKAGED:-}"
  for dir in "${dirs[@]}"; do
    [ -n "$dir" ] && [[ $1 == "$dir"/* ]] && return 0
  done
  return 1
}

# Debian 12 merged /usr: ldd may print /lib/... where dpkg knows /usr/lib/...
# (or the reverse), and a symlink's target where dpkg knows the link.
owner() {
  local path=$1 real candidate
  real=$(realpath "$path")
  for candidate in "$path" "$real"; do
    for form in "$candidate" "/usr${candidate#/usr}" "${candidate#/usr}"; do
      dpkg-query -S "$form" 2>/dev/null | head -n 1 | cut -d: -f1 && return 0
    done
  done
  return 1
}

packages=()
failed=0
for lib in $(ldd "$@" | awk '/=> \// {print $3}' | sort -u); do
  unpackaged "$(realpath "$lib")" && continue
  if package=$(owner "$lib"); then
    packages+=("$package")
  else
    echo "runtime-packages: $lib belongs to no Debian package" >&2
    failed=1
  fi
done
[ "$failed" -eq 0 ] || exit 1
printf '%s\n' "${packages[@]}" | sort -u
