#!/usr/bin/env bash
# Boots tandem's test guest directly under QEMU, without tandemd: the
# reference command line for debugging the image or QEMU itself. The serial
# console is on stdio; Ctrl-A X quits. The guest service is forwarded to
# 127.0.0.1:${PORT:-17070}.
#   qemu-scripts/run-guest.sh [extra QEMU args...]
set -euo pipefail
img=${TANDEM_IMAGE_DIR:-/var/lib/tandem/images}
for f in vmlinux initrd.img data.qcow2; do
  [ -f "$img/$f" ] || { echo "missing $img/$f: run images/build.sh" >&2; exit 1; }
done
disk=$(mktemp --suffix=.qcow2)
trap 'rm -f "$disk"' EXIT
cp "$img/data.qcow2" "$disk"
exec qemu-system-x86_64 -accel "${ACCEL:-tcg}" -machine pc -m "${MEM:-256}" \
  -nodefaults -no-user-config -display none \
  -bios /usr/share/qemu/qboot.rom -kernel "$img/vmlinux" -initrd "$img/initrd.img" \
  -append "console=ttyS0 loglevel=4 tandem.ip=10.0.2.15/24 tandem.gw=10.0.2.2" \
  -serial mon:stdio \
  -blockdev "{\"driver\":\"qcow2\",\"node-name\":\"data\",\"file\":{\"driver\":\"file\",\"filename\":\"$disk\"}}" \
  -device virtio-blk-pci,drive=data \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:${PORT:-17070}-:7070" -device virtio-net-pci,netdev=n0 \
  "$@"
