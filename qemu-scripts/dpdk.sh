#!/usr/bin/env bash
# DPDK's testpmd for `tandem bench switch-pps`, idempotently.
#
#   qemu-scripts/dpdk.sh up STATE_FILE [PAGES]
#       installs Debian's dpdk-testpmd (package dpdk-dev) if it is missing,
#       makes at least PAGES (default 512) 2 MiB hugepages available and
#       mounts hugetlbfs on /dev/hugepages if nothing is mounted there;
#       what it changed is written to STATE_FILE.
#   qemu-scripts/dpdk.sh down STATE_FILE
#       puts back the hugepage count and unmounts what `up` mounted.
#
# Needs root. Only Debian packages are installed.
set -euo pipefail

log() { printf '[dpdk] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "dpdk.sh must run as root" >&2; exit 1; }
cmd=${1:-}
state=${2:-}
[ -n "$cmd" ] && [ -n "$state" ] || { echo "usage: $0 up|down STATE_FILE [PAGES]" >&2; exit 2; }
nr=/proc/sys/vm/nr_hugepages

case "$cmd" in
up)
  pages=${3:-512}
  if ! command -v dpdk-testpmd >/dev/null; then
    log "installing dpdk-dev (dpdk-testpmd) from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpdk dpdk-dev >/dev/null
  fi
  command -v dpdk-testpmd >/dev/null || { echo "dpdk-testpmd still missing after install" >&2; exit 1; }
  prev=$(cat "$nr")
  mounted=0
  if [ "$prev" -lt "$pages" ]; then
    echo "$pages" >"$nr"
  fi
  got=$(cat "$nr")
  if [ "$got" -lt "$pages" ]; then
    echo "$prev" >"$nr"
    echo "only $got of $pages hugepages could be reserved (memory too fragmented?)" >&2
    exit 1
  fi
  if ! grep -qs ' /dev/hugepages hugetlbfs ' /proc/mounts; then
    mkdir -p /dev/hugepages
    mount -t hugetlbfs nodev /dev/hugepages
    mounted=1
  fi
  printf 'prev=%s\nmounted=%s\n' "$prev" "$mounted" >"$state"
  log "hugepages: $got (were $prev), hugetlbfs on /dev/hugepages"
  ;;
down)
  [ -f "$state" ] || exit 0
  prev=$(sed -n 's/^prev=//p' "$state")
  mounted=$(sed -n 's/^mounted=//p' "$state")
  # Files testpmd left behind hold pages; remove only its own (rtemap_*).
  find /dev/hugepages -maxdepth 1 -name 'tpps*map_*' -delete 2>/dev/null || true
  if [ "$mounted" = 1 ]; then
    umount /dev/hugepages 2>/dev/null || log "could not unmount /dev/hugepages"
  fi
  if [ -n "$prev" ]; then
    echo "$prev" >"$nr"
  fi
  rm -f "$state"
  log "hugepages restored to $(cat "$nr")"
  ;;
*)
  echo "usage: $0 up|down STATE_FILE [PAGES]" >&2
  exit 2
  ;;
esac
