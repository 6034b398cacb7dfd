#!/usr/bin/env bash
# Runs the fuzz targets of the switch and of the replication link
# (libFuzzer via cargo-fuzz) for a bounded time each. cargo-fuzz needs
# nightly's sanitizer flags; RUSTC_BOOTSTRAP lets the stable toolchain
# accept them, so no second toolchain is needed.
#   bash ci/fuzz.sh [SECONDS_PER_TARGET]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "[fuzz] installing cargo-fuzz from crates.io" >&2
  cargo install cargo-fuzz --locked --quiet
fi
# crate-dir:target pairs. The switch parses what guests and the wire send
# it; replication parses what the replication link delivers.
for pair in switch:ingress switch:vhost_tx switch:offload switch:outcommit \
            replication:replication_stream; do
  crate=${pair%%:*} t=${pair#*:}
  echo "[fuzz] $crate/$t for ${secs}s" >&2
  (
    cd "crates/$crate/fuzz"
    mkdir -p "corpus/$t"
    RUSTC_BOOTSTRAP=1 cargo fuzz run --release "$t" "corpus/$t" -- \
      -max_total_time="$secs" -max_len=8192 -print_final_stats=1 2>&1 | tail -n 12
  )
done
