#!/usr/bin/env bash
# A guided tour of the VM lifecycle: on this one machine,
# install what is needed, build tandem and the guest image, start a private
# tandemd, boot a guest through it and drive it with the `tandem` CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

bash ci/setup-host.sh
bash images/build.sh
echo "[demo] building tandem (release)"
cargo build --release --locked -q -p tandemd -p tandem-cli
bin=$repo/target/release
images=${TANDEM_IMAGE_DIR:-/var/lib/tandem/images}

work=$(mktemp -d /tmp/tandem-demo.XXXXXX)
ramdir=/dev/shm/tandem-demo-$$
daemon_pid=
cleanup() {
  if [ -n "$daemon_pid" ]; then
    "$bin/tandem" --socket "$work/tandemd.sock" vm destroy demo >/dev/null 2>&1 || true
    kill "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
  fi
  rm -rf "$work" "$ramdir"
}
trap cleanup EXIT INT TERM

export TANDEM_SOCKET=$work/tandemd.sock
"$bin/tandemd" --state-dir "$work/state" --socket "$TANDEM_SOCKET" --ram-dir "$ramdir" \
  --image-dir "$images" 2>"$work/tandemd.log" &
daemon_pid=$!
for _ in $(seq 100); do [ -S "$TANDEM_SOCKET" ] && break; sleep 0.1; done
[ -S "$TANDEM_SOCKET" ] || { cat "$work/tandemd.log"; exit 1; }

cp "$images/data.qcow2" "$work/demo-data.qcow2"
cat >"$work/demo.toml" <<SPEC
name = "demo"
memory_mib = 256
accelerator = "auto"

[boot]
kernel = "$images/vmlinux"
initrd = "$images/initrd.img"
cmdline = "console=ttyS0 loglevel=4 tandem.ip=10.0.2.15/24 tandem.gw=10.0.2.2"

[[disks]]
name = "data"
path = "$work/demo-data.qcow2"

[[nics]]
name = "eth0"
mac = "52:54:00:de:00:01"
backend = "user"
host_forwards = [{ host_port = 17070, guest_port = 7070 }]
SPEC

run() { printf '\n$ %s\n' "$*"; "$@"; }
run "$bin/tandem" host info
run "$bin/tandem" vm create "$work/demo.toml"
t0=$(date +%s%N)
run "$bin/tandem" vm start demo
run "$bin/tandem" vm console demo --until TANDEM-GUEST-READY --timeout 120 >/dev/null
echo "guest ready $(( ($(date +%s%N) - t0) / 1000000 )) ms after start"
run "$bin/tandem" vm info demo
run "$bin/tandem" vm list
run "$bin/tandem" vm pause demo
run "$bin/tandem" vm resume demo
printf '\n$ (guest service on 127.0.0.1:17070) PUT hello\n'
exec 3<>/dev/tcp/127.0.0.1/17070 && echo "PUT hello from the demo" >&3 && timeout 10 head -n1 <&3 && exec 3>&-
run "$bin/tandem" vm console demo | tail -n 5
run "$bin/tandem" vm stop demo
run "$bin/tandem" vm destroy demo
echo
echo "demo finished: a guest booted, was paused, resumed and stopped through tandemd"
