#!/usr/bin/env bash
# Prints the path of a QEMU whose COLO checkpointing works, for
# `tandem bench pause` (the QEMU COLO peer).
#
# QEMU 10.0 (the baseline, from bookworm-backports) cannot run COLO: the
# primary's migration ends in `completed` instead of entering `colo`
# (migration_completion() tests for state ACTIVE, which 10.0 has already
# moved on to DEVICE; upstream acknowledged COLO broken in 10.0/10.1). So
# the peer runs from Debian bookworm's QEMU 7.2 packages, downloaded with
# `apt-get download` and unpacked with `dpkg -x` into a private directory.
# Nothing is installed system-wide: installing bookworm's qemu-system-x86
# would remove qemu-img/qemu-nbd (10.0 from backports).
#
# QEMU 7.2 under TCG has a second COLO bug: the checkpoint's RAM sync waits
# in run_on_cpu() on a condition variable with the big QEMU lock it does not
# hold, and the primary deadlocks on its first checkpoints (details in
# qemu-scripts/colo-bql-shim.c). This script also builds that LD_PRELOAD
# shim, $dir/colo-bql-shim.so, which `tandem bench pause` loads into the
# COLO QEMUs (needs gcc).
#
# Idempotent: a complete unpacked tree is reused. Output: the binary's path
# on stdout (everything else on stderr). Use `-L "$(dirname BIN)/../share/qemu"`
# with that binary so it loads its own firmware.
#   QEMU_COLO_DIR   where to unpack (default /var/cache/tandem/qemu-7.2)
#   QEMU_COLO_VERSION  the bookworm version (default: the newest 7.2 apt knows)
set -euo pipefail
dir=${QEMU_COLO_DIR:-/var/cache/tandem/qemu-7.2}
bin=$dir/root/usr/bin/qemu-system-x86_64
stamp=$dir/root/.complete
here=$(cd "$(dirname "$0")" && pwd)
shim_src=$here/colo-bql-shim.c
shim=$dir/colo-bql-shim.so

build_shim() {
  if [ ! -f "$shim" ] || [ "$shim_src" -nt "$shim" ]; then
    command -v gcc >/dev/null || { echo "colo-qemu: gcc is needed to build $shim" >&2; exit 1; }
    mkdir -p "$dir"
    gcc -O2 -Wall -shared -fPIC -o "$shim.tmp" "$shim_src" -ldl >&2
    mv "$shim.tmp" "$shim"
  fi
}

if [ -f "$stamp" ] && [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
  build_shim
  echo "$bin"
  exit 0
fi

version=${QEMU_COLO_VERSION:-}
if [ -z "$version" ]; then
  version=$(apt-cache madison qemu-system-x86 | awk -F'|' '{gsub(/ /,"",$2); print $2}' \
    | grep '^1:7\.2' | sort -V | tail -n1 || true)
fi
if [ -z "$version" ]; then
  echo "colo-qemu: apt knows no qemu-system-x86 7.2 (is bookworm main in the apt sources? run apt-get update)" >&2
  exit 1
fi
# qemu-system-data is arch: all and has no binNMU suffix (+bN).
data_version=${version%+b[0-9]*}

rm -rf "$dir/debs.tmp" "$dir/root.tmp"
mkdir -p "$dir/debs.tmp" "$dir/root.tmp"
echo "colo-qemu: downloading qemu-system-x86 $version (unpacked privately, not installed)" >&2
(cd "$dir/debs.tmp" && apt-get download -q \
  "qemu-system-x86=$version" "qemu-system-common=$version" "qemu-system-data=$data_version" >&2)
for deb in "$dir"/debs.tmp/*.deb; do
  dpkg -x "$deb" "$dir/root.tmp"
done
missing=$(ldd "$dir/root.tmp/usr/bin/qemu-system-x86_64" | grep 'not found' || true)
if [ -n "$missing" ]; then
  echo "colo-qemu: QEMU $version needs libraries this host lacks:" >&2
  echo "$missing" >&2
  exit 1
fi
"$dir/root.tmp/usr/bin/qemu-system-x86_64" --version >&2
rm -rf "$dir/root" "$dir/debs"
mv "$dir/root.tmp" "$dir/root"
mv "$dir/debs.tmp" "$dir/debs"
touch "$stamp"
build_shim
echo "$bin"
