#!/usr/bin/env bash
# Runs every fuzz target of the top-level fuzz workspace (fuzz/: the
# switch's, output commit's and the replication link's; libFuzzer via
# cargo-fuzz) for a bounded time each. cargo-fuzz needs nightly's sanitizer
# flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them, so no
# second toolchain is needed.
#   bash ci/fuzz.sh [SECONDS_PER_TARGET]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-30}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "[fuzz] installing cargo-fuzz from crates.io" >&2
  cargo install cargo-fuzz --locked --quiet
fi
# The switch parses what guests and the wire send it (ingress, vhost_tx,
# offload, and lldp: what an uplink's neighbour says) and clamps
# acknowledgements (outcommit); replication parses what the replication
# link delivers (replication_stream); snooping parses DHCP and IGMP from
# guests and servers (dhcp, igmp); association parses VDP (vdp).
for t in ingress vhost_tx offload lldp outcommit replication_stream dhcp igmp vdp; do
  echo "[fuzz] $t for ${secs}s" >&2
  mkdir -p "corpus/$t"
  log=$(mktemp)
  if ! RUSTC_BOOTSTRAP=1 cargo fuzz run --release "$t" "corpus/$t" -- \
    -max_total_time="$secs" -max_len=8192 -print_final_stats=1 >"$log" 2>&1; then
    # A build error or a crash: show all of it, not just the statistics.
    cat "$log"
    rm -f "$log"
    echo "[fuzz] $t failed" >&2
    exit 1
  fi
  tail -n 12 "$log"
  rm -f "$log"
done
