#!/usr/bin/env bash
# Installs the host packages tandem needs, idempotently: QEMU 10.0 from
# bookworm-backports (never Debian stable's 7.2 qemu-system-x86, which would
# remove qemu-img), the Debian cloud kernel and busybox used to build guest
# images, and the network tools the tests use.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup-host.sh must run as root (it installs Debian packages)" >&2
  exit 1
fi

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

backports=/etc/apt/sources.list.d/tandem-bookworm-backports.list
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "adding bookworm-backports apt source"
  echo 'deb http://deb.debian.org/debian bookworm-backports main' >"$backports"
  apt_updated=0
fi

for p in qemu-system-x86 qemu-utils; do have "$p" || need+=("$p"); done
bp=("${need[@]}")
need=()
# libclang1-14 and linux-libc-dev: building the switch's userfaultfd
# support (vhost-user postcopy) generates its bindings from the kernel's
# header with bindgen, which loads libclang at build time.
# isc-dhcp-server and dnsmasq-base: real DHCP servers for the switch's
# DHCP snooping (ISC dhcpd answers RFC 4388 lease queries; dnsmasq does
# not, so it exercises the assisted renewal); run only inside test
# namespaces, never as services.
for p in linux-image-cloud-amd64 busybox-static cpio e2fsprogs iproute2 zstd xz-utils lz4 gzip tcpdump nftables iputils-ping libclang1-14 linux-libc-dev isc-dhcp-server dnsmasq-base; do
  have "$p" || need+=("$p")
done

if [ ${#bp[@]} -gt 0 ] || [ ${#need[@]} -gt 0 ]; then
  log "apt-get update"
  apt-get update -qq
fi
if [ ${#bp[@]} -gt 0 ]; then
  log "installing from bookworm-backports: ${bp[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports \
    --no-install-recommends "${bp[@]}" >/dev/null
fi
if [ ${#need[@]} -gt 0 ]; then
  log "installing: ${need[*]}"
  # The cloud kernel's postinst wants to build an initramfs and update a
  # bootloader this host does not boot from; tandem only reads /boot/vmlinuz-*.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

v=$(qemu-system-x86_64 --version | head -1)
log "qemu: $v"
case "$v" in
  *"version 10."*|*"version 9."*|*"version 7.2"*|*"version 8."*) ;;
  *) log "warning: untested QEMU version ($v); 10.0 is the supported baseline" ;;
esac
command -v qemu-img >/dev/null || { log "qemu-img missing (was Debian stable's qemu-system-x86 installed?)"; exit 1; }
