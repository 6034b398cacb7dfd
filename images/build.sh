#!/usr/bin/env bash
# Builds tandem's test guest from Debian packages and this workspace:
#   vmlinux     the Debian cloud kernel, decompressed (booted via its PVH note
#               with qboot: ~1.5 s to userspace under TCG)
#   initrd.img  busybox-static + virtio modules + images/init + tandem-guest
#   data.qcow2  64 MiB ext4 data disk made with mke2fs -d
#   manifest.json  what went in (versions, hashes)
# Output: ${TANDEM_IMAGE_DIR:-/var/lib/tandem/images}. Idempotent: nothing is
# rebuilt unless an input (kernel, busybox, guest binary, this script, init)
# changed. Nothing here is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out=${TANDEM_IMAGE_DIR:-/var/lib/tandem/images}
log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }

for tool in busybox cpio mke2fs qemu-img gzip; do
  command -v "$tool" >/dev/null || die "$tool is missing: run ci/setup-host.sh"
done
kernel=$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -1)
[ -n "$kernel" ] || die "no /boot/vmlinuz-*-cloud-amd64: install linux-image-cloud-amd64 (ci/setup-host.sh)"
kver=${kernel#/boot/vmlinuz-}
moddir=/lib/modules/$kver
[ -f "$moddir/modules.dep" ] || die "$moddir/modules.dep missing"
busybox=$(command -v busybox)
file "$busybox" 2>/dev/null | grep -q dynamic && die "$busybox is dynamically linked: install busybox-static"

log "building the guest service (static)"
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$repo/target/guest" \
  cargo build --release --locked -q -p tandem-guest-service --target x86_64-unknown-linux-gnu
guest="$repo/target/guest/x86_64-unknown-linux-gnu/release/tandem-guest"
[ -x "$guest" ] || die "guest service binary not built"

stamp=$(sha256sum "$kernel" "$busybox" "$guest" images/build.sh images/init | sha256sum | cut -c1-16)
if [ -f "$out/manifest.json" ] && grep -q "\"stamp\": \"$stamp\"" "$out/manifest.json" \
   && [ -f "$out/vmlinux" ] && [ -f "$out/initrd.img" ] && [ -f "$out/data.qcow2" ]; then
  log "up to date in $out (stamp $stamp)"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# --- vmlinux: find the compressed payload inside the bzImage and unpack it.
log "extracting vmlinux from $kernel"
config=/boot/config-$kver
comp=$(grep -E '^CONFIG_KERNEL_(GZIP|LZ4|XZ|ZSTD|LZMA|BZIP2|LZO)=y' "$config" | sed 's/CONFIG_KERNEL_//;s/=y//')
case "$comp" in
  GZIP) magic='\037\213\010'; unpack='gzip -dc' ;;
  LZ4)  magic='\002\041\114\030'; unpack='lz4 -dc' ;;
  XZ)   magic='\3757zXZ\000'; unpack='xz -dc' ;;
  ZSTD) magic='\050\265\057\375'; unpack='zstd -dc' ;;
  *) die "kernel compression '$comp' not supported by this script" ;;
esac
command -v "${unpack%% *}" >/dev/null || die "${unpack%% *} missing: run ci/setup-host.sh"
found=
for off in $(LC_ALL=C grep -obaUP "$(printf "$magic" | od -An -tx1 | sed 's/ /\\x/g')" "$kernel" | cut -d: -f1); do
  tail -c +"$((off + 1))" "$kernel" | $unpack >"$work/vmlinux" 2>/dev/null || true
  if [ "$(head -c4 "$work/vmlinux" | od -An -c | tr -d ' ')" = "177ELF" ]; then found=1; break; fi
done
[ -n "$found" ] || die "could not find an ELF kernel inside $kernel"

# --- initramfs
log "assembling initramfs (busybox, modules, tandem-guest)"
root=$work/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,data,tmp,lib/modules}
cp "$busybox" "$root/bin/busybox"
cp "$guest" "$root/sbin/tandem-guest"
install -m 0755 images/init "$root/init"
# Modules and their dependencies, dependencies first.
wanted="virtio_pci virtio_blk virtio_net evdev button"
order=()
add_mod() {
  local rel deps d
  rel=$(grep -E "(^|/)$1\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | head -1 | cut -d: -f1) || true
  [ -n "$rel" ] || { log "module $1 not found (built in?)"; return 0; }
  for seen in "${order[@]}"; do [ "$seen" = "$rel" ] && return 0; done
  deps=$(grep -E "^$rel:" "$moddir/modules.dep" | cut -d: -f2)
  for d in $deps; do add_mod "$(basename "${d%%.ko*}")"; done
  order+=("$rel")
}
for m in $wanted; do add_mod "$m"; done
: >"$root/lib/modules/load-order"
for rel in "${order[@]}"; do
  name=$(basename "$rel")
  case "$name" in
    *.ko) cp "$moddir/$rel" "$root/lib/modules/$name" ;;
    *.ko.xz) xz -dc "$moddir/$rel" >"$root/lib/modules/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$moddir/$rel" >"$root/lib/modules/${name%.zst}"; name=${name%.zst} ;;
    *) die "unknown module format $name" ;;
  esac
  echo "$name" >>"$root/lib/modules/load-order"
done
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$work/initrd.img"

# --- data disk
log "making the 64 MiB ext4 data disk"
mkdir -p "$work/data"
echo "tandem guest data disk; the guest service keeps records.log here" >"$work/data/README"
mke2fs -q -F -t ext4 -L tandem-data -d "$work/data" "$work/data.raw" 64M
qemu-img convert -q -f raw -O qcow2 "$work/data.raw" "$work/data.qcow2"

cat >"$work/manifest.json" <<JSON
{
  "stamp": "$stamp",
  "kernel": "$kernel",
  "kernel_version": "$kver",
  "kernel_compression": "$comp",
  "modules": "$(tr '\n' ' ' <"$root/lib/modules/load-order" | sed 's/ $//')",
  "busybox": "$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo unknown)",
  "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
JSON
for f in vmlinux initrd.img data.qcow2 manifest.json; do
  mv -f "$work/$f" "$out/$f.tmp" && mv -f "$out/$f.tmp" "$out/$f"
done
log "built in $out (stamp $stamp): $(du -sh "$out" | cut -f1)"
