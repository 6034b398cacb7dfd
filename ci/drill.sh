#!/usr/bin/env bash
# The README's main job: the failover drill on this one machine.
# Installs what is needed (idempotently), builds tandem and the guest image,
# then runs `tandem drill`: first the cluster steps (a tandem-manager in its
# own namespace, both hosts joined, a distributed switch change committed,
# and a bad one that the canary host rolls back by itself while the guest
# serves, then the guest migrated to the other host under the client's
# load with its disk copied), then the failover rounds: two hosts and a client in network
# namespaces, a protected guest under a durable client workload, host A
# killed at random (its QEMU, its network, its tandemd — one round each),
# and the invariants checked. Extra arguments go to `tandem drill` (e.g. --rounds 6 --seed 42),
# which runs the `tandem-lab` binary built beside `tandem`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/setup-host.sh
bash images/build.sh
echo "[drill] building tandem, tandemd, tandem-manager and tandem-lab (release)"
cargo build --release --locked -q -p tandemd -p tandem-cli -p tandem-manager -p tandem-lab
exec target/release/tandem drill --rounds 3 "$@"
